"""Independent benchmark jobs run a few at a time, each in a process of its own with a fixed number of threads."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor, as_completed

from tqdm.auto import tqdm

# torch is imported inside the functions: the control and robotics benchmarks fork their workers from a parent that
# has not loaded it.


def run_parallel(jobs: list, workers: int, threads: int, progress: bool = True, desc: str = "jobs") -> None:
    """Run (function, arguments) jobs, `workers` at a time in separate processes with `threads` torch threads each
    (in this process, one after the other, when `workers` <= 1). A failed job's exception is re-raised here."""
    if workers <= 1 or len(jobs) <= 1:
        for fn, fn_args in jobs:
            fn(*fn_args)
        return
    context = multiprocessing.get_context("spawn")  # fork after torch has started threads is unsafe
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(in_worker, threads, fn, fn_args) for fn, fn_args in jobs]
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc, disable=not progress):
            future.result()


def in_worker(threads: int, fn, fn_args) -> None:
    """`fn(*fn_args)` on `threads` torch threads: what a worker process of `run_parallel` (or of a scheduler of its
    own, as `opd_wins` has) runs."""
    import torch

    torch.set_num_threads(threads)
    fn(*fn_args)


def one_thread() -> None:
    """One torch thread for this process: the initializer of worker pools whose jobs each take one core (and the
    first line of such a job, for when it runs in the parent)."""
    import torch

    torch.set_num_threads(1)


class _Inline:
    """An executor that runs each job at submission, in this process (one worker: no process to start)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        future = Future()
        future.set_result(fn(*args))
        return future


def pool_for(workers: int):
    """`workers` processes of one thread each, or this process alone when workers <= 1."""
    return _Inline() if workers <= 1 else ProcessPoolExecutor(workers, initializer=one_thread)
