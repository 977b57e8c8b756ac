"""Running one point of a sweep (`opd bench scale`, `opd bench gpu`): its worker process under a memory cap, and the
row it becomes. Imports neither tyro nor TRL, so `benchmarks.gpu.run` can use it where they are not installed."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from benchmarks.common.measure import run_watched
from benchmarks.common.processes import last_line
from benchmarks.scale.worker import lever_missing

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Write a long story about a lighthouse keeper who finds a map in a bottle."
"""The short real prompt in front of every fixed completion."""


def spec(system: str, pair: dict, length: int, *, warmup: int, steps: int, threads: int, device: str = "cpu",
         dtype: str = "float32", lr: float = 1e-5, batch_size: int = 1, top_k: int = 20, seed: int = 0) -> dict:
    """What the worker (`benchmarks.scale.worker`) runs for one point."""
    return {"system": system, "student": pair["student"], "teacher": pair["teacher"], "length": length,
            "prompt": PROMPT, "batch_size": batch_size, "warmup": warmup, "steps": steps, "threads": threads,
            "device": device, "dtype": dtype, "lr": lr, "top_k": top_k, "seed": seed}


def context_failure(point: dict, context: int, prompt_tokens: int) -> str | None:
    """Why `point` cannot run on models of `context` positions (None: it fits)."""
    if prompt_tokens + point["length"] > context:
        return f"length {point['length']} exceeds context {context}"
    return None


def run_point(point: dict, work: Path, name: str, cap_mb: float, timeout_s: float, peak_gflops: float) -> dict:
    """`point` in a worker process of its own, watched: the row it gives, or a row whose `failed` says why not (out of
    memory under the cap, too slow, a crash's last line, a lever this opd does not have)."""
    row = {"system": point["system"], "length": point["length"]}
    if why := lever_missing(point["system"]):
        return row | {"failed": why}
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log = work / f"{name}.spec.json", work / f"{name}.json", work / f"{name}.log"
    spec_path.write_text(json.dumps(point, indent=1))
    out_path.unlink(missing_ok=True)
    shutil.rmtree(work / f"{name}-scratch", ignore_errors=True)  # left by an earlier run
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=str(point["threads"]), PYTHONPATH=path, TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    ended = run_watched([sys.executable, "-m", "benchmarks.scale.worker", str(spec_path), str(out_path)], log, env,
                        REPO_ROOT, cap_mb, timeout_s)
    if ended.stopped == "memory_cap":
        return row | {"failed": f"out of memory under {cap_mb / 1024:g} GiB cap", "peak_rss_mb": ended.peak_seen_mb}
    if ended.stopped == "timeout":
        return row | {"failed": f"timed out after {timeout_s:.0f} s"}
    if ended.returncode != 0 or not out_path.exists():
        return row | {"failed": last_line(log) or f"exit {ended.returncode}", "log": str(log)}
    return row | summarise(json.loads(out_path.read_text()), point["warmup"], peak_gflops) | {"wall_s": ended.wall_s}


def summarise(raw: dict, warmup: int, peak_gflops: float) -> dict:
    """A point's row from its worker's numbers: means over the steps after `warmup` (sampling: over every timed
    sample), completion tokens per second, MFU against `peak_gflops`."""
    timed = raw.get("step_s", raw.get("sampling_s"))[warmup if "step_s" in raw else 0:]
    if not timed:
        raise ValueError(f"no timed steps after warmup={warmup}")
    seconds = statistics.mean(timed)
    row = {"tokens_per_s": raw["completion_tokens"] / seconds, "peak_rss_mb": raw["peak_rss_mb"],
           "mfu": raw["flops"] / seconds / (peak_gflops * 1e9), "failed": None,
           "step_s": None, "teacher_s": None, "student_s": None, "sampling_s": None,
           "step_rise_mb": max(raw["step_rise_mb"][warmup if "step_s" in raw else 0:]),
           "flops": raw["flops"], "prompt_tokens": raw["prompt_tokens"], "completion_tokens": raw["completion_tokens"],
           "timed": len(timed), "times_s": raw.get("step_s", raw.get("sampling_s"))}
    if "step_s" in raw:
        teacher = statistics.mean(raw["teacher_s"][warmup:]) if len(raw["teacher_s"]) > warmup else None
        row.update(step_s=seconds, teacher_s=teacher, student_s=None if teacher is None else seconds - teacher)
    else:
        row["sampling_s"] = seconds
    for key in ("peak_gpu_mb", "loaded_rss_mb", "grad_mb", "server_peak_rss_mb", "trainer_peak_rss_mb", "micro_batches",
                "losses"):
        if raw.get(key) is not None:
            row[key] = raw[key]
    return row
