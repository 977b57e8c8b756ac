"""Policy distillation's `collector`: after the warm-up, the student (not the teacher) picks the actions."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from opd.control.distill import PolicyDistillConfig, distill_policy
from opd.control.policies import Policy, PolicySpec
from opd.control.teachers import as_teacher


class EchoEnv(gym.Env):
    """Observes a one-hot of the previous action (zeros after a reset): the visited states show who acted."""

    observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.eye(2, dtype=np.float32)[int(action)], 0.0, False, False, {}


if "OPDTest/Echo-v0" not in gym.registry:
    gym.register("OPDTest/Echo-v0", entry_point=EchoEnv, max_episode_steps=8)

WARMUP = 3


def visited_states(collector: str) -> list[np.ndarray]:
    """Every state the teacher labelled, in order, with a teacher that always prefers action 0 and a frozen (lr 0)
    student that always plays action 1."""
    seen = []

    def teacher(obs):
        seen.append(np.array(obs))
        return np.tile([1.0, 0.0], (len(obs), 1))

    student = Policy(PolicySpec((2,), (2,), (4,)))
    with torch.no_grad():
        student.heads[0].weight.zero_()
        student.heads[0].bias.copy_(torch.tensor([0.0, 100.0]))
    config = PolicyDistillConfig(collector=collector, lr=0.0, updates=20, batch_size=4, warmup_steps=WARMUP,
                                 collect_every=5, collect_steps=2, num_envs=2, teacher_epsilon=0.0, eval_every=20,
                                 eval_episodes=2, progress=False)  # fmt: skip
    distill_policy({"OPDTest/Echo-v0": as_teacher(teacher, kind="q")}, config, student)
    assert len(seen) == WARMUP + (20 // 5) * 2
    return seen


def previous_actions(states: list[np.ndarray]) -> set[int]:
    """The actions that led to these states (reset states, all zeros, carry none)."""
    rows = np.concatenate(states)
    return set(rows[rows.sum(-1) > 0].argmax(-1).tolist())


def test_student_collector_labels_the_states_the_student_visits():
    seen = visited_states("student")
    # the warm-up and the first state after it follow the teacher's action 0; every later one the student's 1
    assert previous_actions(seen[1 : WARMUP + 1]) == {0}
    assert previous_actions(seen[WARMUP + 1 :]) == {1}


def test_teacher_collector_replays_the_teachers_play():
    assert previous_actions(visited_states("teacher")[1:]) == {0}


def test_unknown_collector_is_rejected():
    with pytest.raises(ValueError, match="teacher, student"):
        PolicyDistillConfig(collector="mixed")
