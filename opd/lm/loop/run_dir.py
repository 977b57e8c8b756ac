"""A run's directory: the checkpoint it resumes from, the config it saves (and what a resume changed), the metrics
log and trackers, periodic and final checkpoints, and the checkpoint saved when a step cannot finish.

`RunDir` keeps train.py's loop to its four verbs: `distill` asks it to `restore` the loop's state, to `open` the
run (everything that must be closed again, whatever happens), to walk the `steps`, and to `log` each one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from opd.checkpoint import find_checkpoint, load_trainer_state, save_checkpoint, verify_checkpoint
from opd.config import DistillConfig, save_config, to_dict
from opd.config_notes import config_changes
from opd.lm.hf.model import unwrap
from opd.lm.loop.fsdp import full_optimizer_state, full_state_dict, is_sharded, load_optimizer_state
from opd.lm.loop.optim import resume_schedule
from opd.lm.loop.process import WANDB_RUN_ID_FILE, InterruptFlag, Process, TrainingError, any_process
from opd.lm.teachers.base import TeacherUnreachable
from opd.lm.rollouts.tools import ToolFailed


class RunDir:
    """`cfg.out_dir` as one distillation run sees it; made before the models load (it finds the checkpoint that
    `--resume` loads them from)."""

    def __init__(self, cfg: DistillConfig, proc: Process):
        self.cfg, self.proc, self.out = cfg, proc, Path(cfg.out_dir)
        self.ckpt = find_checkpoint(self.out / "checkpoint") if cfg.resume else None
        if self.ckpt:
            verify_checkpoint(self.ckpt)
        self.last: dict = {}
        self.metrics_file = self.bar = self.student = self.tokenizer = self.opt = None
        self.kept: dict = {}

    def restore(self, student, opt: torch.optim.Optimizer, sched, rng: torch.Generator,
                lr_factor: Callable[[int], float], kept: dict | None = None) -> int:
        """The step to start from (0 on a fresh run). On resume: the optimizer state, this process's loop RNG
        (`rng`: prompt order and mixture coins) and torch RNG, this config's learning rate at that step, and the state
        of each of `kept` ({file name: object with state_dict / load_state_dict}, e.g. an EMA teacher), which every
        checkpoint then saves too. Called after `Process.prepare`: a sharded (FSDP) student's optimizer takes the
        saved state shard by shard."""
        self.kept = kept or {}
        if not self.ckpt:
            return 0
        for name, thing in self.kept.items():
            if not (self.ckpt / name).exists():
                raise ValueError(f"{self.ckpt} has no {name}: it was written by a run with other settings (the "
                                 f"teacher?); resume with that run's settings, or start a new --out-dir")
            thing.load_state_dict(torch.load(self.ckpt / name))
        load = functools.partial(load_optimizer_state, student, opt)  # a state saved sharded or not, into either
        start = load_trainer_state(self.ckpt, load_optimizer=load)["step"]
        loop_rngs = torch.load(self.ckpt / "loop_rng.pt")
        if len(loop_rngs) != self.proc.world:
            raise ValueError(f"{self.ckpt} was written by {len(loop_rngs)} processes; resume it with as many, not "
                             f"{self.proc.world}")
        rng.set_state(loop_rngs[self.proc.rank][0])
        torch.set_rng_state(loop_rngs[self.proc.rank][1])
        resume_schedule(opt, sched, lr_factor, start)  # this config's schedule, not the saved one's
        return start

    def missed_eval(self, start: int) -> bool:
        """Whether a resume at `start` follows a checkpoint whose held-out evaluation was due but never logged (the
        checker raised there, and the checkpoint was saved so that nothing was lost). Every process reads the log,
        as every process reads the checkpoint: a sharded (FSDP) student evaluates on all of them together."""
        logged = self.out / "metrics.jsonl"
        if not (self.ckpt and self.cfg.eval_every and start % self.cfg.eval_every == 0 and logged.exists()):
            return False
        rows = [json.loads(line) for line in logged.read_text().splitlines()]
        return any(m.get("step") == start and "accuracy" not in m for m in rows)

    def finished(self, start: int, closing=()) -> dict:
        """A resume of a run that already reached --steps: close `closing` (a remote teacher's connections), say so,
        and return its last logged metrics."""
        close_all(closing)
        logged = self.out / "metrics.jsonl"
        lines = logged.read_text().splitlines() if logged.exists() else []
        last = next((json.loads(line) for line in reversed(lines) if json.loads(line).get("step", 0) <= start), {})
        if self.proc.main:
            print(f"opd: {self.out} is already at step {start} of --steps {self.cfg.steps}; nothing to train (raise "
                  f"--steps to go on)", file=sys.stderr)
        self.last = last
        return last

    @contextlib.contextmanager
    def open(self, start: int, student, opt, tokenizer, closing=()):
        """The run, from its config.json to its last metrics line: warns about a resume without a checkpoint or with
        changed settings, saves the config, starts trackers, trims metrics.jsonl to the checkpoint's step, and
        catches Ctrl-C (`log` saves, then stops). On the way out, whatever happened: closes `closing` (actors,
        teachers), the metrics file and trackers."""
        cfg, out, main = self.cfg, self.out, self.proc.main
        self.student, self.opt, self.tokenizer = student, opt, tokenizer
        self.interrupted = InterruptFlag()
        try:
            if main and self.ckpt:
                print(f"opd: resuming at step {start} from {self.ckpt}", file=sys.stderr)
            if main and cfg.resume and not self.ckpt:
                print(f"opd: warning: --resume found no checkpoint in {out / 'checkpoint'}; starting from step 0",
                      file=sys.stderr)
            if main and self.ckpt and (out / "config.json").exists():
                changed = config_changes(json.loads((out / "config.json").read_text()), cfg)
                if changed:  # all of them take effect from this step on (the learning rate too: `restore`)
                    print(f"opd: warning: resuming at step {start} with changed settings: {'; '.join(changed)}",
                          file=sys.stderr)
            if main:
                save_config(cfg, out)
            if cfg.report_to:  # the trackers were made with the accelerator (`trackers`), each with its own name
                self.proc.accelerator.init_trackers(out.name, config=flat_config(to_dict(cfg)))
            if main and "wandb" in cfg.report_to:  # what --resume passes back to wandb (`wandb_resume`)
                (out / WANDB_RUN_ID_FILE).write_text(self.proc.accelerator.get_tracker("wandb", unwrap=True).id + "\n")
            if main and self.ckpt:
                drop_logged_after(out / "metrics.jsonl", start)  # steps logged after the checkpoint are redone now
            self.metrics_file = (out / "metrics.jsonl").open("a") if main else None
            yield self
        finally:
            close_all(closing)
            if self.metrics_file is not None:
                self.metrics_file.close()
            if cfg.report_to:
                self.proc.accelerator.end_training()
            self.interrupted.restore()

    def steps(self, start: int, desc: str):
        """Steps `start`..cfg.steps - 1, behind the progress bar (main process only)."""
        self.bar = tqdm(range(start, self.cfg.steps), initial=start, total=self.cfg.steps,
                        disable=not (self.cfg.progress and self.proc.main), desc=desc)
        return self.bar

    def checkpoint(self, step: int, rng_states) -> None:
        """Save the student, optimizer and every process's RNGs (so a resumed multi-process run is bit-for-bit too)
        as the checkpoint of `step`; every process calls this."""
        rng_states = gather_object([rng_states])
        # A sharded (FSDP) student is gathered, weights and optimizer state, by every process into the main one: the
        # checkpoint is then a plain Hugging Face directory, as from one process.
        sharded = is_sharded(self.student)
        model_state = full_state_dict(self.student) if sharded else None
        optimizer_state = full_optimizer_state(self.student, self.opt) if sharded else None
        if self.proc.main:
            save_checkpoint(self.out / "checkpoint", unwrap(self.student), self.tokenizer, step, self.opt,
                            extra_files={"loop_rng.pt": rng_states,
                                         **{name: thing.state_dict() for name, thing in self.kept.items()}},
                            model_state=model_state,
                            optimizer_state=optimizer_state)
        self.proc.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def saved_if_unreachable(self, step: int, rng_state):
        """A teacher or sampler server that stays unreachable inside, or your --tools tool failing: save the state step `step` started from (so
        --resume redoes exactly this step), then stop with a TrainingError that says so."""
        try:
            yield
        except (TeacherUnreachable, ToolFailed) as e:
            if self.proc.world > 1:  # the other processes cannot join a save from here; the last periodic one stands
                raise TrainingError(
                    f"{e} Last checkpoint: {find_checkpoint(self.out / 'checkpoint') or 'none'}") from None
            self.checkpoint(step, rng_state)
            raise TrainingError(
                f"{e} Saved a checkpoint at step {step} in {self.out / 'checkpoint'}; run again with --resume"
            ) from None

    @contextlib.contextmanager
    def saved_if_user_code_fails(self, step: int, m: dict, rng_state):
        """Your checker or callback raising inside, after update `step`: log the step's metrics as far as they got,
        save the checkpoint of step + 1 (the update is done), and stop with a TrainingError naming the error and the
        checkpoint, so that nothing is lost and --resume continues after the fix. With several processes the others
        cannot join that save: the last periodic checkpoint stands."""
        try:
            yield
        except Exception as e:
            if isinstance(e, TrainingError) or self.proc.world > 1:
                raise
            detail = f"{type(e).__name__}: {' '.join(str(e).split())}"
            self.log(step, m, True, rng_state)
            raise TrainingError(
                f"the held-out evaluation (your checker) or a callback raised {detail} after update {step + 1}; saved "
                f"a checkpoint at step {step + 1} in {self.out / 'checkpoint'}; fix it, then run again with --resume"
            ) from e

    def eval_due(self, step: int, held_out) -> bool:
        """Whether update `step` (0-based) ends with a held-out evaluation (every eval_every and the last) on this
        process: the main one, and with a sharded (FSDP) student every process, since they gather its weights together
        and HF's `generate` runs a sharded model's processes in lockstep."""
        cfg = self.cfg
        return (self.proc.main or self.proc.fsdp) and held_out is not None and bool(cfg.eval_every) and (
            (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps)

    def log(self, step: int, m: dict, stop: bool, rng_state) -> bool:
        """Write update `step`'s metrics (metrics.jsonl, the bar, trackers), then save a checkpoint when one is due,
        asked for (`stop`, on any process) or Ctrl-C came; Ctrl-C then raises KeyboardInterrupt. True: stop now."""
        cfg, accelerator = self.cfg, self.proc.accelerator
        if self.proc.main:
            self.metrics_file.write(json.dumps(m) + "\n")
            self.metrics_file.flush()
            self.bar.set_postfix(loss=f"{m['loss']:.3f}",
                                 **({"acc": f"{m['accuracy']:.2f}"} if "accuracy" in m else {}))
        if cfg.report_to:
            accelerator.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=step + 1)
        self.last = m
        interrupt = any_process(accelerator, self.interrupted.flag)
        stop = any_process(accelerator, stop) or interrupt
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stop:
            self.checkpoint(step + 1, rng_state)  # the RNGs as step+1 starts, also when it was drawn ahead
        if interrupt:
            raise KeyboardInterrupt(f"interrupted; saved a checkpoint at step {step + 1} in {self.out / 'checkpoint'}")
        return stop


def drop_logged_after(path: Path, step: int) -> None:
    """Keep only the metrics rows of steps up to `step` (the last of each), rewritten atomically: a run killed after
    logging a step but before its checkpoint logs that step again when resumed."""
    if not path.exists():
        return
    rows: dict[int, str] = {}
    for line in path.read_text().splitlines():
        try:
            s = json.loads(line).get("step")
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if isinstance(s, int) and s <= step:
            rows[s] = line
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(rows[s] + "\n" for s in sorted(rows)))
    tmp.replace(path)


def flat_config(d: dict, prefix: str = "") -> dict:
    """A nested config as flat scalars (trackers such as TensorBoard's hparams take nothing else)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def close_all(things) -> None:
    """Close each of `things` that can be closed: an actor's processes, a remote teacher's connection pool."""
    for thing in things:
        if hasattr(thing, "close"):
            thing.close()
