"""What the speed benchmarks (`perf`, `scale`, `gpu`) measure the same way: a process's peak memory, the machine's
matmul peak that MFU is taken against, and a worker process run under a memory cap and a time limit."""

from __future__ import annotations

import contextlib
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

WATCH_S = 0.25
"""How often a watched process's memory is checked against the cap. Only the cap needs it (the reported peaks are the
processes' own high-water marks), and every check walks /proc: at 50 ms it took 3-7 % of a core from the entry."""


def max_rss_mb(pid: int | None = None) -> float:
    """Peak resident set size so far of this process (or of process `pid`, Linux only), in MB.

    Read from VmHWM, the high-water mark of the process's own memory map. Not `ru_maxrss`: Linux carries that over
    from the parent through fork + exec, so every worker would report at least the benchmark driver's RSS at the
    moment it was started (seen: all systems of the tiny pair at the driver's 854 MB)."""
    status = Path(f"/proc/{pid or 'self'}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    if pid is not None:
        raise RuntimeError(f"cannot read the peak RSS of process {pid}: no VmHWM in {status}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # elsewhere: kilobytes, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 1024)


def matmul_gflops(threads: int, n: int = 2048, repeats: int = 8, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> float:
    """Best matmul throughput of `device` at `dtype` (on a CPU with `threads` threads), GFLOP/s: the peak that MFU is
    measured against."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()  # a GPU matmul returns at once; only the synchronisation waits for it
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def rss_mb(process: psutil.Process) -> float:
    """Current RSS of `process` in MB (0 once it is gone)."""
    try:
        return process.memory_info().rss / 2**20
    except psutil.NoSuchProcess:
        return 0.0


@dataclass(frozen=True)
class Watched:
    """How a watched process ended."""

    returncode: int | None
    """Its exit status (None when it was stopped)."""
    stopped: str | None
    """Why it was stopped: `memory_cap` or `timeout`; None when it ended by itself."""
    peak_seen_mb: float
    """The largest RSS of the process and its children together that the watcher saw (sampled every `WATCH_S`)."""
    wall_s: float
    """How long it ran."""


def run_watched(argv: list[str], log: Path, env: dict, cwd: Path, cap_mb: float, timeout_s: float) -> Watched:
    """Run `argv` with its output in `log`, stopping it (children first) when it and what it started hold more than
    `cap_mb` of RSS together, or run longer than `timeout_s`: a benchmark entry must not take down a shared box."""
    peak_seen, t0 = 0.0, time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:  # the worker and what it started (a sampler process, an `opd serve`) count together
                family = [watched, *watched.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            peak_seen = max(peak_seen, sum(rss_mb(p) for p in family))
            if peak_seen > cap_mb or time.perf_counter() - t0 > timeout_s:
                for p in reversed(family):  # children first: a killed worker cannot stop its server any more
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.kill()
                proc.wait()
                return Watched(None, "memory_cap" if peak_seen > cap_mb else "timeout", peak_seen,
                               time.perf_counter() - t0)
            time.sleep(WATCH_S)
    return Watched(proc.wait(), None, peak_seen, time.perf_counter() - t0)


def current_rss_mb() -> float:
    """This process's resident set size now, in MB."""
    return psutil.Process().memory_info().rss / 2**20


def reset_peak_rss() -> bool:
    """Set this process's VmHWM (`max_rss_mb`) back to its current RSS, so the next reading is the peak of what runs
    from here on (Linux >= 4.0: `/proc/self/clear_refs`); False where that cannot be done."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker_main(run, argv: list[str], exit_at_once: bool = False) -> None:
    """A speed benchmark's worker process, `python -m benchmarks.NAME.worker SPEC.json OUT.json`: `run(spec, scratch)`
    on the spec, its result written to OUT.json, work files under OUT-scratch. `exit_at_once`: skip the interpreter's
    teardown of torch and transformers (about a second per point; nothing is kept)."""
    import json
    import os

    spec_path, out_path = Path(argv[0]), Path(argv[1])
    out = run(json.loads(spec_path.read_text()), out_path.parent / (out_path.stem + "-scratch"))
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    if exit_at_once:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
