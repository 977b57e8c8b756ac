"""This process's part in a run: the accelerator (one process or many, DDP or FSDP2), torch threads on a CPU other jobs
may share, seeds, Ctrl-C, the flags the configuration ignores, and the libraries' own progress bars.

Shared by every loop (`opd.lm.train.distill`, `opd.lm.recipes.rl`); the run directory is `opd.lm.loop.run_dir`.
"""

from __future__ import annotations

import importlib.util
import os
import signal as signal_module
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opd.checkpoint import find_checkpoint
from opd.config import DistillConfig
from opd.config_notes import schedule_notes, unused_flags
from opd.lm.loop.fsdp import Accelerator, broadcast_from_main, first_forward, fsdp_requested, fsdp_version, shard
from opd.threads import set_threads


class TrainingError(RuntimeError):
    """A run stopped for a reason the user must act on; the message says what happened and what to do."""


@dataclass
class Process:
    """This process in the run: the accelerator and what the loop reads of it."""

    accelerator: Any
    rank: int
    world: int
    main: bool
    fsdp: bool = False
    """Whether the student is sharded with FSDP2 (by accelerate on GPUs, by `opd.lm.loop.fsdp.shard` on CPUs)."""

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def prepare(self, student, opt):
        """The student and its optimizer, ready to train: as `accelerator.prepare` makes them (DDP, or FSDP2 on GPUs),
        or sharded here with torch's `fully_shard` where accelerate leaves FSDP out (CPUs). Restore optimizer state
        after this, not before: sharding replaces the parameters the state is keyed by."""
        from accelerate import DistributedType

        if self.fsdp and self.world > 1:
            broadcast_from_main(student)
        if self.fsdp and self.accelerator.distributed_type != DistributedType.FSDP:
            shard(student, opt, self.accelerator.mixed_precision)
            opt = self.accelerator.prepare(opt)
        else:
            student, opt = self.accelerator.prepare(student, opt)
        first_forward(student, self.device)
        return student, opt


def start_process(cfg: DistillConfig) -> Process:
    """Set up this process for a distillation run, before anything loads: the accelerator (trackers included),
    the refusal of what a sharded (FSDP) student cannot do and of --overlap where its sampler process cannot work,
    warnings for ignored flags, torch threads (fewer when other jobs hold cores), and the seed of this process's
    torch RNG."""
    from accelerate import DistributedType
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", cfg.mixed_precision) != cfg.mixed_precision:
        # An earlier run in this Python process chose another precision, and accelerate keeps that choice for the
        # process's lifetime (its state is shared): forget it, keeping the process group (PartialState) as it is.
        AcceleratorState._reset_state(reset_partial_state=False)
    # Without a GPU, cpu=True lets accelerate pick gloo when launched with several processes.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                              log_with=trackers(cfg) or None, project_dir=cfg.out_dir)
    # accelerate enables FSDP on GPUs only; on CPUs its launch config still asks for it, and opd shards there
    # (`Process.prepare`), given more than one process to shard over
    fsdp = accelerator.distributed_type == DistributedType.FSDP or (accelerator.num_processes > 1 and fsdp_requested())
    proc = Process(accelerator, accelerator.process_index, accelerator.num_processes, accelerator.is_main_process,
                   fsdp)
    if fsdp:
        check_fsdp(cfg)
    if cfg.overlap and cfg.sampler is None and (accelerator.device.type != "cpu" or fsdp
                                                or accelerator.distributed_type == DistributedType.DEEPSPEED):
        raise ValueError("--overlap without --sampler samples in a local CPU process from a whole copy of the student; "
                         "on GPUs or with a sharded (FSDP/DeepSpeed) student pass --sampler URL of a server")
    for note in [*unused_flags(cfg), *schedule_notes(cfg)] if proc.main else ():
        print(f"opd: warning: {note}", file=sys.stderr)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed + proc.rank)
    return proc


def check_fsdp(cfg: DistillConfig) -> None:
    """Refuse, before any weights load, what a sharded student cannot do (one line each, naming what to do)."""
    if fsdp_version() != 2:
        raise ValueError(f"the accelerate config asks for FSDP version {fsdp_version()}; opd shards the student with "
                         f"FSDP2 only: set fsdp_version: 2 (see configs/accelerate/fsdp2_cpu.yaml)")
    if cfg.teacher == "ema":
        raise ValueError("--teacher ema under FSDP: the teacher is a whole copy of the student that follows its "
                         "weights, which are sharded here; launch with DDP (--multi_gpu) or use --teacher self")
    if cfg.sampler and cfg.lora.r:
        raise ValueError("--sampler with --lora.r under FSDP: the weight push merges the adapters into the base "
                         "weights on the main process, which needs them unsharded; launch with DDP (--multi_gpu) "
                         "for a LoRA student with a sampler server, or drop --sampler")


def trackers(cfg: DistillConfig) -> list:
    """accelerate's trackers for --report-to, made here rather than named, so that each gets its own run name (named,
    they would share one project name, and TensorBoard's is its directory); one line for a tracker not installed,
    which accelerate would otherwise drop without a word."""
    from accelerate.tracking import TensorBoardTracker, TrackioTracker, WandBTracker

    for name in cfg.report_to:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"--report-to {name} needs the {name} package: pip install 'opd[tracking]'")
    run = Path(cfg.out_dir).resolve().name
    make = {
        "tensorboard": lambda: TensorBoardTracker("tensorboard", cfg.out_dir),  # out_dir/tensorboard
        "trackio": lambda: TrackioTracker(run),
        # wandb.init's arguments win over its environment variables: pass on the ones a user sets, else keep the
        # run's files in its directory rather than the working directory.
        "wandb": lambda: WandBTracker(os.environ.get("WANDB_PROJECT", "opd"), name=run,
                                      dir=os.environ.get("WANDB_DIR", cfg.out_dir), **wandb_resume(cfg)),
    }
    return [make[name]() for name in cfg.report_to]


WANDB_RUN_ID_FILE = "wandb_run_id"
"""The file in a run directory that holds its wandb run's id (`RunDir` writes it), so that --resume goes on logging
to the same wandb run rather than starting a second one."""


def wandb_resume(cfg: DistillConfig) -> dict:
    """wandb.init's `id` and `resume` for a run that --resume continues from a checkpoint: the id its first start saved
    (none to pass for a new run, or where the user's WANDB_RUN_ID says which run). wandb keeps a run's steps
    increasing, so the steps a crash logged after the last checkpoint stay there as first logged; `metrics.jsonl`
    holds the redone ones."""
    out = Path(cfg.out_dir)
    saved = out / WANDB_RUN_ID_FILE
    if not cfg.resume or "WANDB_RUN_ID" in os.environ or not saved.is_file():
        return {}
    if find_checkpoint(out / "checkpoint") is None:  # RunDir's own test: no checkpoint, the run starts at step 0
        return {}
    return {"id": saved.read_text().strip(), "resume": "allow"}


def all_finite(accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (all must stop together, or the others hang in all-reduce)."""
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    return bool(accelerator.reduce(ok, "min").item()) if accelerator.num_processes > 1 else bool(ok.item())


def any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` is set on any process (every process calls this at the same point)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "max").item())


class InterruptFlag:
    """Ctrl-C sets a flag instead of killing the step half-way; the loop saves a checkpoint, then stops."""

    def __init__(self):
        self.flag = False
        try:
            self._old = signal_module.signal(signal_module.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signal handling alone
            self._old = None

    def _handle(self, signum, frame):
        if self.flag:  # a second Ctrl-C means stop now
            raise KeyboardInterrupt
        self.flag = True

    def restore(self):
        if self._old is not None:
            signal_module.signal(signal_module.SIGINT, self._old)
