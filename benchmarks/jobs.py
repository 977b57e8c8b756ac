"""Independent benchmark jobs run a few at a time, each in a process of its own with a fixed number of threads."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
from tqdm.auto import tqdm


def run_parallel(jobs: list, workers: int, threads: int, progress: bool = True, desc: str = "jobs") -> None:
    """Run (function, arguments) jobs, `workers` at a time in separate processes with `threads` torch threads each
    (in this process, one after the other, when `workers` <= 1). A failed job's exception is re-raised here."""
    if workers <= 1 or len(jobs) <= 1:
        for fn, fn_args in jobs:
            fn(*fn_args)
        return
    context = multiprocessing.get_context("spawn")  # fork after torch has started threads is unsafe
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_in_worker, threads, fn, fn_args) for fn, fn_args in jobs]
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc, disable=not progress):
            future.result()


def _in_worker(threads: int, fn, fn_args) -> None:
    torch.set_num_threads(threads)
    fn(*fn_args)
