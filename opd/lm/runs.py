"""What a run shows and leaves behind besides its checkpoints: the metrics log, trackers' view of the config, and
the libraries' own progress bars."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


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
