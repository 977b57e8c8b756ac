"""`opd bench shared_cpu`: how a training step slows down when other jobs share the CPU, and what helps.

The quickstart's pair (the shipped arithmetic teacher, a freshly initialised student of the quickstart's size) trains
with `opd train` in a child process, on a quiet machine and next to busy jobs (each a PyTorch process multiplying
matrices on 2 threads, as another training run would), under several settings: the defaults, OpenMP's passive wait
policy (`OMP_WAIT_POLICY=PASSIVE`: threads that wait for work sleep instead of spinning), and fewer torch threads
(`--threads 1`), against opd's default, which lowers the threads to the cores no other job is running on when the run
starts. Reports the median step time and the CPU time the run used. Writes
benchmarks/results/shared_cpu.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from benchmarks.common.results import RESULTS, write

BUSY = ("import torch; torch.set_num_threads(2); a = torch.randn(384, 384)\n"
        "while True: a @ a")
CONDITIONS = {
    # name: (busy jobs, extra environment, extra flags). "defaults": opd picks the threads (`opd.threads.free_cores`).
    "quiet, defaults": (0, {}, []),
    "quiet, --threads 2 (one per core)": (0, {}, ["--threads", "2"]),
    "quiet, OMP_WAIT_POLICY=PASSIVE": (0, {"OMP_WAIT_POLICY": "PASSIVE"}, ["--threads", "2"]),
    "quiet, --threads 1": (0, {}, ["--threads", "1"]),
    "2 busy jobs, defaults": (2, {}, []),
    "2 busy jobs, --threads 2 (one per core)": (2, {}, ["--threads", "2"]),
    "2 busy jobs, OMP_WAIT_POLICY=PASSIVE": (2, {"OMP_WAIT_POLICY": "PASSIVE"}, ["--threads", "2"]),
    "2 busy jobs, --threads 1": (2, {}, ["--threads", "1"]),
}


@dataclass(frozen=True)
class SharedCpuArgs:
    steps: int = 24
    """Updates per run; the median skips the first 4 (warm-up)."""
    batch_size: int = 32
    """Prompts per update (the quickstart's)."""
    conditions: tuple[str, ...] = tuple(CONDITIONS)
    """Which settings to run (names of CONDITIONS)."""


def models(root: Path) -> tuple[str, str]:
    """The shipped teacher and a fresh student of the quickstart's size, saved under `root`."""
    from opd.lm.recipes.supervised import get_teacher
    from opd.tasks.models import make_model

    teacher, tokenizer, _ = get_teacher()
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    make_model("student", tokenizer, seed=0).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    return str(root / "teacher"), str(root / "student")


def run(name: str, teacher: str, student: str, root: Path, args: SharedCpuArgs) -> dict:
    """One `opd train` next to the condition's busy jobs: median step seconds, wall and CPU seconds."""
    busy_jobs, env, flags = CONDITIONS[name]
    busy = [subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(busy_jobs)]
    out = run_dir(root, name)
    try:
        time.sleep(1.0 if busy else 0.0)  # let the busy jobs start spinning
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "opd.cli", "train", "--student", student, "--teacher", teacher,
                        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--sampling.max-new-tokens",
                        "56", "--eval-every", "0", "--save-every", str(10 ** 6), "--no-progress", "--out-dir",
                        str(out), *flags], check=True, capture_output=True, env={**os.environ, **env})
        wall = time.perf_counter() - t0
    finally:
        for p in busy:
            p.kill()
            p.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    steps = [json.loads(line)["step_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"median_step_s": statistics.median(steps[4:] or steps), "wall_s": round(wall, 1),
            # the killed busy jobs are children too: only the training run's CPU time is wanted
            "cpu_s": None if busy else round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)}


def run_dir(root: Path, name: str) -> Path:
    """Condition `name`'s run directory."""
    return root / name.replace(" ", "_").replace(",", "").replace("=", "-")


def shared_cpu(args: SharedCpuArgs) -> dict:
    """Run every condition one after another; returns the results."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, student = models(root)
        results = {name: run(name, teacher, student, root, args) for name in args.conditions}
        # what each run was told (the json keeps it: the run directories go with the temporary directory)
        configs = {name: json.loads((run_dir(root, name) / "config.json").read_text()) for name in args.conditions}
    base = results.get("quiet, defaults")
    if base:
        for r in results.values():
            r["slowdown"] = round(r["median_step_s"] / base["median_step_s"], 2)
    return {"conditions": results, "runs": configs, "args": {"steps": args.steps, "batch_size": args.batch_size},
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores"}


def section(results: dict) -> str:
    lines = ["## Training on a CPU that other jobs share", "",
             f"Command: `opd bench shared_cpu` (the quickstart's pair: shipped 0.86M-parameter teacher, fresh "
             f"0.12M-parameter student; `opd train`, {results['args']['steps']} updates of "
             f"{results['args']['batch_size']} prompts, 56-token completions; a busy job is a PyTorch process "
             f"multiplying 384×384 matrices on 2 threads). {results['machine']}; nothing else ran.", "",
             "| setting | median step (s) | vs quiet defaults | wall (s) | CPU time of the run (s) |", "|---|---|---|---|---|"]
    for name, r in results["conditions"].items():
        cpu = "" if r["cpu_s"] is None else f"{r['cpu_s']:.0f}"
        lines.append(f"| {name} | {r['median_step_s']:.3f} | {r.get('slowdown', float('nan')):.2f}× | "
                     f"{r['wall_s']:.0f} | {cpu} |")
    return "\n".join(lines + [""])


def main(args: SharedCpuArgs, quick: bool = False) -> dict:
    """Measure (a plumbing version with --quick) and write the results and the RESULTS.md section."""
    if quick:
        args = SharedCpuArgs(steps=5, batch_size=4, conditions=("quiet, defaults", "2 busy jobs, defaults"))
    results = shared_cpu(args)
    write("shared_cpu", results, section, quick, RESULTS)
    return results


if __name__ == "__main__":
    tyro.cli(main)
