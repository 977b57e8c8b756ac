"""The control benchmark's teachers, which `opd bench opd_wins_control` shares: the scripted CartPole controller and
the MinAtar DQN teachers (trained once, then loaded from the cache under $OPD_CACHE/teachers)."""

from __future__ import annotations

import time

import numpy as np


def soft_cartpole_teacher(obs):
    """The scripted CartPole controller as action logits ±5·(w·obs): DAgger uses its argmax, on-policy
    distillation its distribution."""
    score = 5 * (obs @ np.array([0.1, 0.5, 3.0, 1.0]))
    return np.stack([-score, score], -1)


def job_teacher(game: str, steps: int) -> dict:
    """The DQN teacher of `game` (trained for `steps`, or loaded): its greedy score on 20 episodes, its parameters
    and how long it took to train."""
    from opd.control.distill import teacher_parameters
    from opd.control.envs import evaluate
    from opd.control.teachers import TeacherConfig, as_teacher, teacher_path, train_teacher

    config = TeacherConfig(game, "dqn", steps)
    start = time.time()
    model = train_teacher(config, progress=False)
    seconds_file = teacher_path(config).with_suffix(".seconds")
    score = evaluate(as_teacher(model).act, game, 20, seed=30_000, max_episode_steps=2_000)
    return {"game": game, "score": float(score.mean()), "params": teacher_parameters(model),
            "train_seconds": float(seconds_file.read_text()) if seconds_file.exists() else time.time() - start}


def load_teacher(game: str, steps: int):
    """The DQN teacher of `game` after `steps` training steps: from the cache, or trained (and cached) here."""
    from opd.control.teachers import TeacherConfig, train_teacher

    return train_teacher(TeacherConfig(game, "dqn", steps), progress=False)
