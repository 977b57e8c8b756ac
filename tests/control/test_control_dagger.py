"""BC, DAgger and the on-policy-distillation analogue on CartPole with a scripted expert (fast, deterministic)."""

import numpy as np
import pytest

from opd.control.common import MetricsLog
from opd.control.dagger import DAggerConfig, OnPolicyDistillConfig, beta_schedule, run_dagger, run_onpolicy_distill
from opd.control.teachers import cartpole_expert


def test_beta_schedules():
    assert [beta_schedule("linear", i, 5) for i in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [beta_schedule("exponential", i, 4, decay=0.5) for i in range(4)] == [1.0, 0.5, 0.25, 0.125]
    assert [beta_schedule("bc", i, 3) for i in range(3)] == [1.0, 1.0, 1.0]
    assert [beta_schedule("zero", i, 3) for i in range(3)] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="schedule"):
        beta_schedule("cosine", 0, 3)
    with pytest.raises(ValueError, match="outside"):
        beta_schedule("linear", 3, 3)


def test_dagger_aggregates_every_visited_state_and_reaches_the_expert():
    config = DAggerConfig(schedule="exponential", iterations=6, steps_per_iteration=25, num_envs=4, progress=False)
    history = run_dagger(cartpole_expert, config).history
    assert [row["dataset_size"] for row in history] == [100 * (i + 1) for i in range(6)]
    assert [row["step"] for row in history] == [100 * (i + 1) for i in range(6)]
    assert [row["beta"] for row in history] == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    assert history[0]["expert_action_fraction"] == 1.0
    assert 0.3 < history[1]["expert_action_fraction"] < 0.7  # per-env, per-step coin flips with β = 0.5
    assert history[-1]["return_mean"] >= 475  # CartPole-v1's "solved"; an untrained MLP gets ~10-60
    assert history[0]["return_mean"] < history[-1]["return_mean"]


def test_bc_only_lets_the_expert_act():
    config = DAggerConfig(schedule="bc", iterations=2, steps_per_iteration=10, num_envs=2, updates_per_iteration=5,
                          eval_episodes=2, progress=False)
    history = run_dagger(cartpole_expert, config).history
    assert [row["expert_action_fraction"] for row in history] == [1.0, 1.0]
    assert [row["dataset_size"] for row in history] == [20, 40]
    zero = run_dagger(cartpole_expert, DAggerConfig(**{**config.__dict__, "schedule": "zero"})).history
    assert [row["expert_action_fraction"] for row in zero] == [0.0, 0.0]


def test_onpolicy_distillation_with_a_distribution_teacher():
    # the scripted controller as a soft teacher: logits ±5·(w·obs)
    def teacher(obs):
        score = obs @ np.array([0.1, 0.5, 3.0, 1.0])
        return np.stack([-5 * score, 5 * score], -1)

    from opd.control.teachers import as_teacher

    config = OnPolicyDistillConfig(iterations=8, steps_per_iteration=25, num_envs=4, progress=False)
    history = run_onpolicy_distill(as_teacher(teacher, kind="logits"), config).history
    assert [row["step"] for row in history] == [100 * (i + 1) for i in range(8)]
    assert history[-1]["return_mean"] >= 400
    with pytest.raises(ValueError, match="hard actions"):
        run_onpolicy_distill(cartpole_expert, config)


def test_metrics_steps_are_monotone(tmp_path):
    log = MetricsLog(tmp_path)
    log.log(1, a=1.0)
    log.log(1, a=2.0)
    with pytest.raises(ValueError, match="monotone"):
        log.log(0, a=3.0)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
