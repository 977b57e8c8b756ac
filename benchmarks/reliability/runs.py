"""Real `opd train` / `opd serve` processes for the reliability benchmark: kill -9 and resume, a teacher that dies.

Everything goes through the command line (`python -m opd.cli ...`), so what is measured is what a user gets:
process start-up, the checkpoint files on disk, the exit code and the one-line error.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.common.processes import ENV, Server, last_line
from opd.checkpoint import STATE_JSON, STATE_PT, find_checkpoint
from opd.lm.hf.model import load_model

COMPARED_METRICS = ("loss", "completion_tokens", "grad_norm", "total_flops", "accuracy")
"""Fields of metrics.jsonl that must repeat exactly when a step is redone (the rest are timings)."""


@dataclass(frozen=True)
class TrainSpec:
    """One small `opd train` run (on-policy reverse KL, batch 4, 8 new tokens) that only the run directory varies."""

    student: str
    teacher: str
    """A model directory (a local teacher) or a server URL."""
    steps: int
    seed: int
    save_every: int = 1
    remote_max_retries: int = 5
    """Retries of the trainer's teacher client before it stops (shorter in --quick)."""

    def command(self, out_dir: Path, resume: bool) -> list[str]:
        """The `opd train` command line for this run in `out_dir`."""
        return [
            sys.executable, "-m", "opd.cli", "train", "--student", self.student, "--teacher", self.teacher,
            "--steps", str(self.steps), "--save-every", str(self.save_every), "--seed", str(self.seed),
            "--batch-size", "4", "--train-examples", "64", "--eval-examples", "4", "--eval-every", "0",
            "--sampling.max-new-tokens", "8", "--out-dir", str(out_dir), "--no-progress",
            "--remote-max-retries", str(self.remote_max_retries),
            *(["--resume"] if resume else []),
        ]

    def start(self, out_dir: Path, resume: bool) -> subprocess.Popen:
        """Start the run in the background; its stdout and stderr are appended to out_dir/../NAME.out and .err."""
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{out_dir}.out", "ab") as out, open(f"{out_dir}.err", "ab") as err:
            return subprocess.Popen(self.command(out_dir, resume), stdout=out, stderr=err, env=ENV)


def logged_steps(run: Path) -> int:
    """Lines in run/metrics.jsonl (one per finished step, a redone step again)."""
    try:
        return (run / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 600.0) -> bool:
    """Poll `condition` until it holds (True) or `proc` exits first (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return condition()
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {proc.args[:4]}")
        time.sleep(0.005)
    return True


def finish(spec: TrainSpec, run: Path, resume: bool) -> float:
    """Run to the end in the foreground; return its wall time. A failing run raises with its last error line."""
    t0 = time.monotonic()
    proc = spec.start(run, resume)
    if proc.wait() != 0:
        raise RuntimeError(f"`opd train` in {run} exited {proc.returncode}: {last_line(Path(f'{run}.err'))}")
    return time.monotonic() - t0


def inspect_checkpoint(run: Path, writer_pid: int | None = None, old_before: bool = True) -> dict:
    """What a resume would load from `run`, and whether all of it loads: weights, optimiser, RNGs, the HF model.

    `inside_write`: process `writer_pid` died while writing a checkpoint: its temporary directory is still there, or
    the previous checkpoint is still moved aside (and was not before the process started, `old_before`).
    """
    found = find_checkpoint(run / "checkpoint")
    old_now = (run / ".checkpoint.old").exists()
    info = {"step": None, "where": None, "loadable": None, "error": None,
            "inside_write": (run / f".checkpoint.tmp-{writer_pid}").exists() or (old_now and not old_before),
            "tmp_dirs": len(list(run.glob(".checkpoint.tmp-*")))}
    if found is None:
        return info
    info["where"] = found.name
    try:
        info["step"] = json.loads((found / STATE_JSON).read_text())["step"]
        weights = load_file(found / "model.safetensors")
        torch.load(found / STATE_PT, weights_only=False)
        torch.load(found / "loop_rng.pt", weights_only=False)
        load_model(str(found))
        info["loadable"] = all(bool(torch.isfinite(w).all()) for w in weights.values())
    except Exception as e:  # a corrupt checkpoint is what this looks for: record it, whatever it raises
        info["loadable"], info["error"] = False, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return info


def compare_runs(a: Path, b: Path) -> dict:
    """Are two finished runs the same: final weights and optimiser state bit for bit, every logged step's numbers?"""
    wa, wb = load_file(a / "checkpoint" / "model.safetensors"), load_file(b / "checkpoint" / "model.safetensors")
    same_keys = wa.keys() == wb.keys()
    diffs = [(wa[k].double() - wb[k].double()).abs().max().item() for k in wa if k in wb]
    oa = torch.load(a / "checkpoint" / STATE_PT, weights_only=False)["optimizer"]["state"]
    ob = torch.load(b / "checkpoint" / STATE_PT, weights_only=False)["optimizer"]["state"]
    optimizer_equal = oa.keys() == ob.keys() and all(
        oa[i].keys() == ob[i].keys() and all(torch.equal(oa[i][k], ob[i][k]) for k in oa[i]) for i in oa)
    logs = [_metrics_by_step(run) for run in (a, b)]
    return {
        "tensors": len(wa),
        "weights_bit_exact": same_keys and all(torch.equal(wa[k], wb[k]) for k in wa),
        "max_abs_weight_diff": max(diffs, default=0.0),
        "optimizer_bit_exact": optimizer_equal,
        # Every time a step was logged (a redone step is logged again) its numbers match the uninterrupted run's.
        "metrics_match": logs[0].keys() == logs[1].keys() and all(
            all(v == logs[0][s][0] for v in logs[1][s]) and len(logs[0][s]) == 1 for s in logs[0]),
        "redone_steps": sum(len(v) - 1 for v in logs[1].values()),
        "final_step": json.loads((b / "checkpoint" / STATE_JSON).read_text())["step"],
    }


def _metrics_by_step(run: Path) -> dict[int, list[tuple]]:
    out: dict[int, list[tuple]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out.setdefault(m["step"], []).append(tuple(m.get(k) for k in COMPARED_METRICS))
    return out


def kill_and_resume(spec: TrainSpec, root: Path, kills: int, rng: random.Random, progress=None) -> dict:
    """SIGKILL a run `kills` times at random moments, resuming each time, then finish it and compare it with one run
    straight through.

    A kill lands either during start-up (a random fraction of the uninterrupted run's start-up time, cut short by
    the first step) or a random fraction of a step after 1-3 more steps were logged: inside the update, or inside
    the checkpoint write that follows the log line. After every kill the checkpoint a resume would load must load.
    """
    straight, killed = root / "uninterrupted", root / "killed"
    shutil.rmtree(root, ignore_errors=True)
    timing = _timed_run(spec, straight)
    records = []
    for i in range(kills):
        before, step_before = logged_steps(killed), inspect_checkpoint(killed)["step"] or 0
        old_before = (killed / ".checkpoint.old").exists()
        after_steps, fraction = rng.randint(0, 3), rng.random()
        t0 = time.monotonic()
        proc = spec.start(killed, resume=i > 0)
        if after_steps == 0:  # in start-up: a fraction of the uninterrupted run's, or at its first step at the latest
            wait_until(lambda: time.monotonic() - t0 >= fraction * timing["startup_s"] or logged_steps(killed) > before,
                       proc)
        elif wait_until(lambda: logged_steps(killed) >= before + after_steps, proc):
            _sleep_unless_exited(proc, fraction * timing["step_s"])
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGKILL)
        code = proc.wait()
        record = {"kill": i + 1, "after_steps": after_steps, "fraction": round(fraction, 3),
                  "seconds_alive": round(time.monotonic() - t0, 3), "killed": alive,
                  "exit_code": None if alive else code, "steps_logged": logged_steps(killed) - before,
                  **{f"checkpoint_{k}": v for k, v in inspect_checkpoint(killed, proc.pid, old_before).items()}}
        record["resume_failed"] = not alive and code != 0
        record["step_went_back"] = (record["checkpoint_step"] or 0) < step_before
        if record["resume_failed"]:
            record["error"] = last_line(Path(f"{killed}.err"))
        records.append(record)
        if progress is not None:
            progress.update(1)
        if not alive and code == 0:
            break  # the run finished before this kill: nothing left to kill
    final_s = finish(spec, killed, resume=True)
    return {"steps": spec.steps, "seed": spec.seed, "uninterrupted": timing, "final_resume_s": round(final_s, 2),
            "tmp_dirs_left_at_end": inspect_checkpoint(killed)["tmp_dirs"],
            "records": records, "comparison": compare_runs(straight, killed)}


def _sleep_unless_exited(proc: subprocess.Popen, seconds: float) -> None:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


def _timed_run(spec: TrainSpec, run: Path) -> dict:
    """Run straight through, noting when each step's line appears: start-up time and the median time per step."""
    t0 = time.monotonic()
    proc = spec.start(run, resume=False)
    seen, stamps = 0, []
    while proc.poll() is None or logged_steps(run) > seen:
        if (now := logged_steps(run)) > seen:
            stamps += [time.monotonic() - t0] * (now - seen)
            seen = now
        time.sleep(0.005)
    if proc.returncode != 0:
        raise RuntimeError(f"`opd train` in {run} exited {proc.returncode}: {last_line(Path(f'{run}.err'))}")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"wall_s": round(time.monotonic() - t0, 2), "startup_s": round(stamps[0], 2),
            "step_s": round(statistics.median(gaps), 4)}


def teacher_dies(spec: TrainSpec, root: Path, server: Server, kill_after_steps: int) -> dict:
    """Train against `server` (the teacher), SIGKILL the server mid-run, check the trainer's exit and checkpoint,
    restart the server on the same port, resume, and compare with a run against the live server straight through.

    `spec.teacher` must be `server.url`. The trainer's client retries `spec.remote_max_retries` times with back-off (0.5 s doubling) first.
    """
    straight, run = root / "uninterrupted", root / "teacher_killed"
    shutil.rmtree(root, ignore_errors=True)
    straight_s = finish(spec, straight, resume=False)
    proc = spec.start(run, resume=False)
    reached = wait_until(lambda: logged_steps(run) >= kill_after_steps, proc)
    steps_at_kill = logged_steps(run)
    t_kill = time.monotonic()
    server.kill()
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    seconds_to_exit = time.monotonic() - t_kill
    message = last_line(Path(f"{run}.err"))
    checkpoint = inspect_checkpoint(run)
    t_restart = time.monotonic()
    server.start()
    restart_s = time.monotonic() - t_restart
    resumed_s = finish(spec, run, resume=True)
    return {
        "steps": spec.steps, "kill_after_steps": kill_after_steps, "server_killed_mid_run": reached,
        "steps_logged_at_kill": steps_at_kill, "exit_code": code, "message": message,
        "message_is_one_line": message.startswith("opd: error:") and "Traceback" not in Path(f"{run}.err").read_text(),
        "message_names_checkpoint": f"checkpoint at step {checkpoint['step']}" in message and "--resume" in message,
        "seconds_kill_to_exit": round(seconds_to_exit, 2), "checkpoint": checkpoint,
        "server_restart_s": round(restart_s, 2), "resume_s": round(resumed_s, 2),
        "uninterrupted_s": round(straight_s, 2),
        "comparison": compare_runs(straight, run),
    }
