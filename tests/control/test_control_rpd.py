"""RPD: the cosine λ schedule, λ = 0 is exactly SB3's PPO, and the teacher term pulls the policy to the teacher."""

import math

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

from opd.control.rpd import RPD, RPDConfig, rpd_lambda, run_rpd

TINY = dict(n_steps=64, batch_size=32, n_epochs=2, learning_rate=3e-3, seed=0, device="cpu", verbose=0)


def test_lambda_is_a_half_cosine_that_reaches_zero_and_stays_there():
    assert rpd_lambda(0, 100) == 1.0
    assert rpd_lambda(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # 0.8536
    assert rpd_lambda(50, 100) == pytest.approx(0.5)
    assert rpd_lambda(75, 100, lambda_max=2.0) == pytest.approx(1 - math.cos(math.pi / 4))  # 2 · 0.1464
    assert rpd_lambda(100, 100) == 0.0 and rpd_lambda(10_000, 100) == 0.0
    values = [rpd_lambda(s, 100) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="anneal_steps"):
        rpd_lambda(0, 0)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_lambda_zero_is_exactly_sb3_ppo(env_id):
    # one after the other: SB3 seeds the global numpy/torch generators when it builds a model
    ppo = PPO("MlpPolicy", make_vec_env(env_id, n_envs=2, seed=0), **TINY).learn(256)
    rpd = RPD("MlpPolicy", make_vec_env(env_id, n_envs=2, seed=0), teacher=lambda obs: np.zeros((len(obs), 1)),
              lambda_max=0.0, teacher_kind=None, **TINY).learn(256)
    for a, b in zip(ppo.policy.parameters(), rpd.policy.parameters()):
        torch.testing.assert_close(a, b)


def _mean_action(model, obs):
    obs_t, _ = model.policy.obs_to_tensor(obs)
    with torch.no_grad():
        return model.policy.get_distribution(obs_t).distribution


def test_the_teacher_term_pulls_the_mean_action_to_a_continuous_teacher():
    obs = np.stack([make_vec_env("Pendulum-v1", n_envs=1, seed=s).reset() for s in range(20)])[:, 0]
    target = lambda o: np.full((len(o), 1), 1.5)  # noqa: E731
    gaps = {}
    for lam in (0.0, 5.0):
        model = RPD("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=0), target, lambda_max=lam,
                    anneal_steps=10_000, **{**TINY, "n_epochs": 10})
        model.learn(512)
        gaps[lam] = float((_mean_action(model, obs).mean - 1.5).abs().mean())
        if lam:
            assert model.last_distill_loss < 0.1  # MSE to the teacher's action on the last rollout
    assert gaps[0.0] > 1.0 and gaps[5.0] < gaps[0.0] / 3  # PPO alone leaves the mean near 0


@pytest.mark.parametrize("kind", ["logits", None])
def test_the_teacher_term_pulls_a_discrete_policy_to_the_teacher(kind):
    # a teacher that always prefers action 1, as logits (KL) or as hard actions (cross-entropy)
    teacher = (lambda o: np.tile([0.0, 4.0], (len(o), 1))) if kind else (lambda o: np.ones(len(o), dtype=np.int64))
    obs = make_vec_env("CartPole-v1", n_envs=8, seed=3).reset()
    probs = {}
    for lam in (0.0, 5.0):
        model = RPD("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), teacher, lambda_max=lam,
                    anneal_steps=10_000, teacher_kind=kind, **TINY)
        model.learn(512)
        probs[lam] = float(_mean_action(model, obs).probs[:, 1].mean())
    assert probs[5.0] > 0.9 and probs[0.0] < 0.7


def test_run_rpd_logs_a_curve_with_lambda_annealed_to_zero():
    config = RPDConfig(env_id="CartPole-v1", total_steps=512, anneal_steps=256, n_envs=2, n_steps=64, n_epochs=1,
                       eval_every=128, eval_episodes=2)
    teacher = lambda o: np.tile([0.0, 1.0], (len(o), 1))  # noqa: E731
    history = run_rpd(teacher, config, teacher_kind="logits").history
    assert [row["step"] for row in history] == [0, 128, 256, 384, 512]
    assert history[0]["rpd_lambda"] == 1.0 and history[-1]["rpd_lambda"] == 0.0
    assert history[1]["rpd_lambda"] == pytest.approx(0.5)
