"""Torch threads on a CPU that other jobs may share: every command that runs a model (`opd train`, `opd eval`,
`opd serve`) takes `--threads N`, and without it steps down from torch's one thread per core to the cores no other job
is running on (`opd bench shared_cpu` measured why)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def set_threads(threads: int | None) -> None:
    """`threads` torch threads if given; else torch's default, lowered to the cores no other job is running on.
    Raises a one-line ValueError for fewer than one thread."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    elif torch.get_num_threads() > 1 and (free := free_cores()) < torch.get_num_threads():
        # Other jobs hold some cores: threads waiting on each other for a busy core make every step far slower.
        print(f"opd: note: other jobs are running on this CPU; using {free} torch thread(s) instead of "
              f"{torch.get_num_threads()} (--threads N to choose)", file=sys.stderr)
        torch.set_num_threads(free)


def free_cores(samples: int = 5, interval_s: float = 0.02) -> int:
    """How many of this process's CPU cores no other job is running on right now (at least 1).

    Reads the kernel's count of runnable tasks (/proc/loadavg's fourth field, this process's own task included) a few
    times and takes the median; elsewhere the 1-minute load average. `opd bench shared_cpu` measured why this matters:
    on 2 cores next to two busy jobs, torch's default of one thread per core made steps 11× slower than on a quiet
    machine, one thread 3×, because threads that wait for each other at every parallel region lose their core.
    """
    import os
    import time

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        counts = []
        for _ in range(samples):
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
            time.sleep(interval_s)
        busy = sorted(counts)[len(counts) // 2]
    except (OSError, ValueError, IndexError):
        busy = int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, cores - max(0, busy))
