import threading

import pytest
import torch

from opd.lm.rollouts.actors import Ahead, DataActor, Draw, Mixture, Plans
from opd.lm.data.prompts import PromptSet
from opd.lm.batch import layout


def plans(choose=lambda g: "student", group=1, seed=0):
    return Plans(10, 3, group, choose, lambda step: 1000 + step, torch.Generator().manual_seed(seed))


def test_plans_draw_in_order_and_a_step_drawn_ahead_is_the_same_draw():
    a, b = plans(), plans()
    first = [a.next(s) for s in range(3)]
    b.next(0)
    ahead = b.peek(1)
    assert b.state()[0].equal(ahead.rng_state[0])  # a checkpoint as step 1 starts stores the state before its draw
    key = lambda d: (d.step, d.rows, d.source, d.seed)  # noqa: E731
    assert [key(b.next(1)), key(b.next(2))] == [key(d) for d in first[1:]]
    assert first[0].seed == 1000 and len(first[0].rows) == 3
    with pytest.raises(RuntimeError, match="drew step 4 ahead, asked for step 3"):
        b.peek(4), b.next(3)


def test_samples_per_prompt_repeats_each_prompt_side_by_side():
    draw = plans(group=4).next(0)
    assert len(draw.rows) == 12 and all(len(set(draw.rows[i:i + 4])) == 1 for i in range(0, 12, 4))


def test_a_mixture_draws_its_coin_from_the_loop_rng_and_dispatches_by_it():
    prompts = PromptSet([[1, 2]] * 10, [[3]] * 10, [{}] * 10)
    student = DataActor(prompts, 0, 9)
    student.source = "student"
    mix = Mixture(student, DataActor(prompts, 0, 9), lmbda=0.5)
    g = torch.Generator().manual_seed(0)
    coins = [mix.choose(g) for _ in range(200)]
    assert 60 < coins.count("student") < 140  # λ = 0.5
    g2 = torch.Generator().manual_seed(0)
    assert coins == [mix.choose(g2) for _ in range(200)]
    assert [Mixture(student, student, 1.0).choose(g) for _ in range(5)] == ["student"] * 5
    with pytest.raises(ValueError, match=r"lmbda must be in \[0, 1\]"):
        Mixture(student, student, 1.5)


def test_data_actor_refuses_rows_without_completions():
    with pytest.raises(ValueError, match="no 'completion'"):
        DataActor(PromptSet([[1]], None, [{}]), 0, 9)


class Recorder:
    """An inner actor that records every call and which weights version each batch was sampled from."""

    def __init__(self):
        self.calls, self.version, self.lock = [], 0, threading.Lock()

    def choose(self, rng):
        return "student"

    def sync(self, student, step):
        with self.lock:
            self.version += 1
            self.calls.append(("sync", step))

    def rollouts(self, draw: Draw):
        with self.lock:
            self.calls.append(("rollouts", draw.step, self.version))
        batch = layout([[1]], [[2]], 0)
        batch.sampled_by = self.version
        return batch

    def close(self):
        self.calls.append(("close",))


def test_ahead_requests_the_next_step_after_this_steps_sync_and_takes_it_before_the_next_sync():
    inner = Recorder()
    p = plans()
    ahead = Ahead(inner, p, steps=3)
    versions = []
    for step in range(3):
        draw = p.next(step)
        ahead.sync(None, step)
        versions.append(ahead.rollouts(draw).sampled_by)
    ahead.close()
    # step 0 samples after the first sync; steps 1 and 2 are requested during the step before, after its sync
    assert versions == [1, 1, 2]
    syncs = [i for i, c in enumerate(inner.calls) if c[0] == "sync"]
    requests = {c[1]: i for i, c in enumerate(inner.calls) if c[0] == "rollouts"}
    assert requests[1] > syncs[0] and requests[2] > syncs[1]  # never sampled under a sync in flight
    assert requests[1] < syncs[1] and requests[2] < syncs[2]
    assert inner.calls[-1] == ("close",) and 3 not in requests  # nothing requested past the last step
