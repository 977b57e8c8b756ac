"""Student rollouts from a second process on this machine, which samples step k+1 while step k trains.

`distill --overlap` without `--sampler` uses this. On a CPU box, sampling a small student is mostly per-token Python
and kernel-launch overhead that one core spends waiting on itself, so a second process that samples the next batch
while this one scores and updates takes sampling off the critical path: a step costs about max(sampling, scoring +
update) instead of their sum. The sampler process holds its own copy of the student in shared memory; a push copies
the trained weights into it (a memcpy, no serialisation) while it is idle, so nothing is written to disk and nothing
goes over a socket. Same contract as `ServerRollouts` (`push`, `rollouts`, `version`), so the loop and
`opd.lm.rollouts.actors.Ahead` treat both alike: the samples of step k+1 come from the weights pushed at step k, one
update staler than in-process sampling, and every batch carries the sampler's log-probs for the importance-ratio metrics
and the truncated-IS correction of loss=sampled (why the divergences are not reweighted: `opd.lm.rollouts.server`).

With a local teacher, the sampler process also grades the first rows of each batch it samples (the teacher is
frozen, so it shares the teacher's memory once and never syncs), and this process grades only the rest
(`opd.lm.teachers.local.score_batch`). How many rows is adjusted after every batch so that neither process waits for the
other (`balanced_teacher_rows`): sampling a small model is mostly overhead while the teacher's forward is compute,
and without this the trainer, holding all of the teacher's work and the update, is the slower side.

The torch threads are split: the sampler gets half (at least one), this process keeps the rest, and gets them back
on `close`. CPU only: on GPUs, sample with a server on its own device (`--sampler`, vLLM or `opd serve`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import sys
import time
import traceback

import torch
import torch.multiprocessing as mp

from opd.config import SamplingArgs
from opd.lm.batch import Batch, layout
from opd.lm.hf.model import unwrap
from opd.lm.teachers.base import TeacherUnreachable
from opd.lm.teachers.local import LocalTeacher

_POLL_S = 1.0
"""How often a waiting side checks that the other one is still alive."""


_WAIT_SLACK_S = 0.002
"""A trainer wait below this counts as none (queue latency), for `balanced_teacher_rows`."""


def balanced_teacher_rows(rows: int, batch_size: int, wait_s: float, teacher_s: float,
                          probe: int | None) -> tuple[int, int | None]:
    """(rows, probe) for the next batch: the sampler process graded `rows` of the last one in `teacher_s` seconds,
    and the trainer then waited `wait_s` seconds for it. `probe`: the next step up while searching (1 to start),
    None once the trainer has waited (the balance was found).

    A trainer that waited means the sampler is the slower side by `wait_s`; moving one row back shifts one row's
    teacher time from the sampler to the trainer, so the gap closes after wait_s / (2 · seconds per row) rows. A
    trainer that did not wait may be the slower side by an amount it cannot see, so more rows go to the sampler:
    until the first wait twice as many as the last time (a far balance is reached in a few steps), after it one
    (the count then stays within a row or two of the balance as the step times drift).
    """
    if wait_s > _WAIT_SLACK_S:
        step = max(1, round(wait_s / (2 * teacher_s / rows))) if rows and teacher_s > 0 else rows
        return max(0, rows - step), None
    if probe is None:
        return min(batch_size, rows + 1), None
    return min(batch_size, rows + probe), 2 * probe


def _sampler_main(model, teacher, requests, results, eos_id: int | None, threads: int, parent_pid: int) -> None:
    """The sampler process: answer each request with a laid-out batch (completions, log-probs and, with a teacher,
    the teacher's signal for the first rows asked for) from the shared-memory models, and the seconds that took."""
    from opd.lm.hf.decode import sample_completions

    torch.set_num_threads(threads)
    while True:
        try:
            request = requests.get(timeout=_POLL_S)
        except queue.Empty:
            if os.getppid() != parent_pid:  # the trainer died without saying goodbye (kill -9): do not linger
                return
            continue
        if request is None:
            return
        prompt_ids, pad_id, s, seed, teacher_rows = request
        try:
            torch.manual_seed(seed)  # seeded per request: the same step of a resumed run draws the same samples
            completions, logprobs = sample_completions(model, prompt_ids, pad_id, eos_id, s.max_new_tokens,
                                                       s.temperature, s.top_p, with_logprobs=True, compile=s.compile)
            batch = layout(prompt_ids, completions, pad_id, logprobs)
            t0 = time.perf_counter()
            if teacher is not None and teacher_rows:
                k = teacher_rows
                prefix = teacher.score(batch.input_ids_BL[:k], batch.attention_mask_BL[:k], batch.mask_BT[:k])
                prefix.head = None  # a closure over the teacher: the trainer has its own
                batch.teacher_prefix = prefix
            results.put(("ok", batch, time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001  (sent back and raised in the trainer, which knows the step)
            results.put(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))


@contextlib.contextmanager
def _main_module_hidden():
    """Start a spawned child without it importing the parent's main script.

    `spawn` re-runs the main script in the child unless it is guarded by `if __name__ == "__main__":`, so a user's
    unguarded training script would start a second training run there (and multiprocessing refuses). The child needs
    nothing from it: its target and the model's class are importable by name, so we leave the script out.
    """
    main = sys.modules["__main__"]
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if hasattr(main, k)}
    try:
        main.__spec__ = None
        if hasattr(main, "__file__"):
            del main.__file__
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


class ProcessRollouts:
    """The student's sampler in a child process that shares its weights' memory with a copy of the student."""

    def __init__(self, student, eos_id: int | None, threads: int | None = None, teacher: LocalTeacher | None = None):
        """Start the sampler process with a copy of `student` (unwrapped from DDP), not yet synced: `push` first.

        threads: torch threads of the sampler (default: half of this process's, at least 1); this process keeps
        the rest (at least 1). teacher: a local teacher on the CPU whose weights the sampler process may share, to
        grade part of each batch (see the module's doc); None grades nothing there.
        """
        model = unwrap(student)
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"--overlap without --sampler samples in a second process on the CPU, and the student is "
                             f"on {device}; on GPUs pass --sampler URL of a server (vLLM, opd serve) on its own device")
        self._copy = copy.deepcopy(model).eval()
        for t in (*self._copy.parameters(), *self._copy.buffers()):
            t.requires_grad_(False)
            t.share_memory_()
        if teacher is not None:
            if next(teacher.model.parameters()).device.type != "cpu":
                raise ValueError("the sampler process can grade rows only with a teacher on the CPU; pass teacher=None")
            for t in (*teacher.model.parameters(), *teacher.model.buffers()):
                t.share_memory_()  # frozen: shared once, never synced
        self.teacher_rows = 0 if teacher is None else 1
        """Rows of the next batch the sampler process grades (adjusted after every batch the trainer takes)."""
        self._grades = teacher is not None
        self._last_grading: tuple[int, int, float] | None = None  # (rows, batch size, seconds) of the last answer
        self._probe: int | None = 1
        self._threads_before = torch.get_num_threads()
        threads = threads or max(1, self._threads_before // 2)
        torch.set_num_threads(max(1, self._threads_before - threads))
        ctx = mp.get_context("spawn")  # fork after OpenMP has started can hang the child
        self._requests, self._results = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_sampler_main, name="opd-sampler", daemon=True,
                                 args=(self._copy, teacher, self._requests, self._results, eos_id, threads,
                                       os.getpid()))
        with _main_module_hidden():
            self._proc.start()
        self.version = 0
        """How many times the trained weights were copied into the sampler."""

    def push(self, student, accelerator, step: int) -> None:
        """Copy `student`'s current weights into the sampler's copy. Call it only between requests (the loop does:
        `opd.lm.rollouts.actors.Ahead` hands over step k+1's answer before step k+1 pushes)."""
        with torch.no_grad():
            for dst, src in zip(self._copy.parameters(), unwrap(student).parameters(), strict=True):
                dst.copy_(src)
        self.version += 1

    def rollouts(self, prompt_ids: list[list[int]], pad_id: int, sampling: SamplingArgs, seed: int) -> Batch:
        """One completion per prompt from the sampler process; the batch carries its log-prob of every target and,
        with a teacher, the teacher's signal for its first `teacher_rows` rows (`Batch.teacher_prefix`)."""
        rows = min(self.teacher_rows, len(prompt_ids))
        self._requests.put((prompt_ids, pad_id, sampling, seed, rows))
        while True:
            try:
                answer = self._results.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._proc.is_alive():
                    code = self._proc.exitcode
                    why = "SIGKILL, often the kernel's out-of-memory killer" if code == -9 else "its error is on stderr"
                    raise TeacherUnreachable(
                        f"the sampler process (pid {self._proc.pid}) died with exit code {code} ({why})") from None
        if answer[0] == "error":
            raise RuntimeError(f"the sampler process failed: {answer[1]}\n{answer[2]}")
        batch, teacher_s = answer[1:]
        self._last_grading = (rows, len(prompt_ids), teacher_s)
        return batch

    def waited(self, seconds: float) -> None:
        """The trainer waited `seconds` for the last batch (`opd.lm.rollouts.actors.Ahead` measures it): rebalance
        the rows."""
        if self._grades and self._last_grading is not None:
            rows, batch_size, teacher_s = self._last_grading
            self.teacher_rows, self._probe = balanced_teacher_rows(rows, batch_size, seconds, teacher_s, self._probe)

    def close(self) -> None:
        """Stop the sampler process and give this process its threads back."""
        if self._proc.is_alive():
            self._requests.put(None)
            self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        torch.set_num_threads(self._threads_before)
