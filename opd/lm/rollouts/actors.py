"""Who acts: every way of producing a step's batch is an object with the same small interface.

    source = actor.choose(rng)        # who acts this step (a mixture flips its coin here, from the loop's RNG)
    actor.sync(student, step)         # the student's current weights reach a sampler that keeps its own copy
    batch  = actor.rollouts(draw)     # completions for this step's prompts, laid out as a `Batch`
    actor.close()                     # connections and processes

The actors: `DataActor` (reference completions), `LocalActor` (the student or a local teacher samples in this
process), `SamplerActor` (a sampler server or the `--overlap` sampler process, which get the student's weights by
`sync`), the teacher's actors (`opd.lm.rollouts.teacher`), `Mixture` (GKD: the student with probability λ, else the
data) and `Ahead` (samples the next step's batch while this one trains). `Plans` draws each step's prompts and
actor from the loop's RNG, in order, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from opd.config import SamplingArgs
from opd.lm.batch import Batch, build_batch
from opd.lm.data.prompts import PromptSet
from opd.lm.rollouts.local import sample


@dataclass(frozen=True)
class Draw:
    """One step's prompts and who acts on them."""

    step: int
    rows: list[int]
    """Indices into the prompt set, one per completion (a prompt appears samples_per_prompt times in a row)."""
    source: str
    """student | teacher | data."""
    seed: int
    """Base seed of this step's server-side sampling (row i uses seed + i), the same in a resumed run."""
    rng_state: tuple
    """The loop's RNG states just before this draw: a checkpoint taken as this step starts stores them."""


class Actor(Protocol):
    def choose(self, rng: torch.Generator) -> str:
        """Who acts at the step being drawn; only a mixture draws from `rng`."""
        ...

    def sync(self, student, step: int) -> None:
        """Bring a sampler that holds its own copy of the student up to `student`'s weights (else nothing)."""
        ...

    def rollouts(self, draw: Draw) -> Batch:
        """The batch for `draw`'s prompts."""
        ...

    def close(self) -> None:
        ...


class FixedActor:
    """Shared by the actors that always act themselves and hold no copy of the student (`source` says who acts)."""

    source = "student"

    def choose(self, rng: torch.Generator) -> str:
        return self.source

    def sync(self, student, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class DataActor(FixedActor):
    """The prompt set's reference completions (source=data; SFT; GKD's data batches)."""

    source = "data"

    def __init__(self, prompts: PromptSet, pad_id: int, eos_id: int | None):
        if prompts.completion_ids is None:
            raise ValueError("source=data (and GKD's mixture) trains on reference completions, and these rows have "
                             "no 'completion' (or a final assistant message); add them or use source=student/teacher")
        self.prompts, self.pad_id, self.eos_id = prompts, pad_id, eos_id

    def rollouts(self, draw: Draw) -> Batch:
        p = self.prompts
        return build_batch([p.prompt_ids[i] for i in draw.rows], [p.completion_ids[i] for i in draw.rows],
                           self.pad_id, self.eos_id)


class LocalActor(FixedActor):
    """A model in this process samples (KV cache, `opd.lm.hf.decode`): the student being trained, or a local teacher."""

    def __init__(self, model, prompts: PromptSet, pad_id: int, eos_id: int | None, sampling: SamplingArgs,
                 source: str = "student"):
        self.model, self.prompts, self.pad_id, self.eos_id, self.s = model, prompts, pad_id, eos_id, sampling
        self.source = source

    def rollouts(self, draw: Draw) -> Batch:
        return self.sample([self.prompts.prompt_ids[i] for i in draw.rows], draw.seed)

    def sample(self, prompt_ids: list[list[int]], seed: int) -> Batch:
        """Completions of `prompt_ids` (any token ids: a multi-turn conversation so far, `opd.lm.rollouts.tools`),
        from torch's random stream (`seed` is for samplers elsewhere)."""
        s = self.s
        return sample(self.model, prompt_ids, self.pad_id, self.eos_id, s.max_new_tokens, s.temperature, s.top_p,
                      s.compile)


class SamplerActor(FixedActor):
    """The student samples elsewhere, from a copy of its weights that `sync` refreshes: a server (`ServerRollouts`)
    or the `--overlap` sampler process (`ProcessRollouts`). Batches carry the sampler's log-probs and weights
    version."""

    def __init__(self, sampler, accelerator, prompts: PromptSet, pad_id: int, sampling: SamplingArgs):
        self.sampler, self.accelerator, self.prompts, self.pad_id, self.s = sampler, accelerator, prompts, pad_id, sampling

    def sync(self, student, step: int) -> None:
        self.sampler.push(student, self.accelerator, step)

    def rollouts(self, draw: Draw) -> Batch:
        return self.sample([self.prompts.prompt_ids[i] for i in draw.rows], draw.seed)

    def sample(self, prompt_ids: list[list[int]], seed: int) -> Batch:
        """Completions of `prompt_ids` from the sampler, row i seeded with seed + i."""
        batch = self.sampler.rollouts(prompt_ids, self.pad_id, self.s, seed)
        batch.sampled_by = self.sampler.version
        return batch

    def close(self) -> None:
        self.sampler.close()


class Mixture:
    """GKD's mixture: each step the student acts with probability `lmbda`, else the data's completions do."""

    def __init__(self, student: Actor, data: DataActor, lmbda: float):
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
        self.actors, self.lmbda = {"student": student, "data": data}, lmbda

    def choose(self, rng: torch.Generator) -> str:
        return "student" if torch.rand((), generator=rng).item() < self.lmbda else "data"

    def sync(self, student, step: int) -> None:
        self.actors["student"].sync(student, step)

    def rollouts(self, draw: Draw) -> Batch:
        return self.actors[draw.source].rollouts(draw)

    def close(self) -> None:
        self.actors["student"].close()


class Plans:
    """Each step's prompts and actor, drawn in order from the loop's RNG; the next step can be drawn ahead."""

    def __init__(self, num_prompts: int, batch_size: int, samples_per_prompt: int, choose: Callable, seed_of: Callable,
                 rng: torch.Generator):
        self.n, self.batch_size, self.group = num_prompts, batch_size, samples_per_prompt
        self.choose, self.seed_of, self.rng = choose, seed_of, rng
        self._ahead: Draw | None = None

    def next(self, step: int) -> Draw:
        """`step`'s draw: the one drawn ahead, or a new one."""
        draw, self._ahead = self._ahead or self._draw(step), None
        if draw.step != step:
            raise RuntimeError(f"drew step {draw.step} ahead, asked for step {step}")
        return draw

    def peek(self, step: int) -> Draw:
        """Draw `step` now (the step after the current one), to be returned by the next `next`."""
        self._ahead = self._ahead or self._draw(step)
        return self._ahead

    def state(self) -> tuple:
        """The RNG states as the next step starts (before its draw, also when it was drawn ahead)."""
        return self._ahead.rng_state if self._ahead else (self.rng.get_state(), torch.get_rng_state())

    def _draw(self, step: int) -> Draw:
        state = self.rng.get_state(), torch.get_rng_state()
        idx = torch.randint(self.n, (self.batch_size,), generator=self.rng).tolist()
        source = self.choose(self.rng)
        rows = [i for i in idx for _ in range(self.group)]
        return Draw(step, rows, source, self.seed_of(step), state)


class Ahead:
    """Samples step k+1's student batch in a background thread while step k is scored and trained.

    After step k's batch is in hand (and its weights were synced), step k+1 is drawn and, if the student acts there,
    requested from the inner actor, which samples from the weights it holds now: one update staler, never more. The
    next `sync` takes that answer first, so a sampler never swaps weights under a request in flight. The thread only
    waits on HTTP or a queue, so the GIL costs nothing.
    """

    def __init__(self, inner: Actor, plans: Plans, steps: int, on_wait: Callable[[float], None] | None = None):
        self.inner, self.plans, self.steps, self.on_wait = inner, plans, steps, on_wait
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-rollouts")
        self._pending: tuple[int, Future] | None = None
        self._taken: tuple[int, Batch] | None = None

    def choose(self, rng: torch.Generator) -> str:
        return self.inner.choose(rng)

    def sync(self, student, step: int) -> None:
        self._take(step)
        self.inner.sync(student, step)

    def rollouts(self, draw: Draw) -> Batch:
        self._take(draw.step)
        taken, self._taken = self._taken, None
        batch = taken[1] if taken else self.inner.rollouts(draw)
        if draw.step + 1 < self.steps:
            upcoming = self.plans.peek(draw.step + 1)
            if upcoming.source == "student":
                self._pending = (upcoming.step, self._pool.submit(self.inner.rollouts, upcoming))
        return batch

    def _take(self, step: int) -> None:
        """Wait for the answer requested for `step`, if any (a failed request raises here, in its own step)."""
        if self._pending is None:
            return
        pending_step, answer = self._pending
        if pending_step != step:
            raise RuntimeError(f"rollouts pending for step {pending_step}, asked for step {step}")
        self._pending = None
        t0 = time.perf_counter()
        self._taken = (step, answer.result())
        if self.on_wait is not None:  # the --overlap sampler process balances its share of the grading by this
            self.on_wait(time.perf_counter() - t0)

    def close(self) -> None:
        """Wait for a request still in flight and drop its answer, then close the inner actor."""
        self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.inner.close()
