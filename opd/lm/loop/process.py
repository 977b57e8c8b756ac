"""This process's part in a run: the accelerator (one process or many), torch threads on a CPU other jobs may share,
seeds, Ctrl-C, the flags the configuration ignores, and the libraries' own progress bars.

Shared by every loop (`opd.lm.train.distill`, `opd.lm.recipes.rl`); the run directory is `opd.lm.loop.run_dir`.
"""

from __future__ import annotations

import contextlib
import signal as signal_module
import sys
from dataclasses import dataclass
from typing import Any

import torch

from opd.config import DistillConfig, schedule_notes, unused_flags
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

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def start_process(cfg: DistillConfig) -> Process:
    """Set up this process for a distillation run, before anything loads: the accelerator (trackers included),
    the refusal of --overlap where its sampler process cannot work, warnings for ignored flags, torch threads
    (fewer when other jobs hold cores), and the seed of this process's torch RNG."""
    from accelerate import Accelerator, DistributedType

    # Without a GPU, cpu=True lets accelerate pick gloo when launched with several processes.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                              log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=cfg.out_dir)
    proc = Process(accelerator, accelerator.process_index, accelerator.num_processes, accelerator.is_main_process)
    if cfg.overlap and cfg.sampler is None and (accelerator.device.type != "cpu" or accelerator.distributed_type in (
            DistributedType.FSDP, DistributedType.DEEPSPEED)):
        raise ValueError("--overlap without --sampler samples in a local CPU process from a whole copy of the student; "
                         "on GPUs or with a sharded (FSDP/DeepSpeed) student pass --sampler URL of a server")
    for note in [*unused_flags(cfg), *schedule_notes(cfg)] if proc.main else ():
        print(f"opd: warning: {note}", file=sys.stderr)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed + proc.rank)
    return proc


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


@contextlib.contextmanager
def library_bars(enabled: bool):
    """While inside, the libraries' own progress bars (transformers loading weights and writing shards, datasets
    reading files) show only if `enabled`; their previous setting comes back afterwards."""
    import datasets
    from transformers.utils import logging as hf_logging

    were_on = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were_on[0]:
            hf_logging.enable_progress_bar()
        if were_on[1]:
            datasets.enable_progress_bars()
