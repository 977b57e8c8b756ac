"""Teacher adapters (SB3 DQN/PPO, callables), teacher training + caching, the scripted CartPole expert."""

import numpy as np
import pytest
import torch
from stable_baselines3 import DQN, PPO

from opd.control.envs import evaluate, make_env
from opd.control.teachers import (
    PPOArgs, TeacherConfig, TeacherOutput, as_teacher, cartpole_expert, ppo_path, ppo_seconds, teacher_logp,
    teacher_path, train_ppo, train_seconds, train_teacher,
)  # fmt: skip


def _obs(n=16):
    return np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32) * 0.1


def test_sb3_dqn_adapter_reads_q_values_and_features():
    model = DQN("MlpPolicy", make_env("CartPole-v1"), policy_kwargs=dict(net_arch=[32, 32]), seed=0, device="cpu")
    out = as_teacher(model)(_obs())
    q_expected = model.q_net(torch.as_tensor(_obs()))
    torch.testing.assert_close(out.values_NA, q_expected.detach())
    assert out.kind == "q" and out.features_ND.shape == (16, 32)
    np.testing.assert_array_equal(out.actions_N.numpy(), model.predict(_obs(), deterministic=True)[0])
    # the features really are the layer the Q head reads
    torch.testing.assert_close(model.q_net.q_net[-1](out.features_ND), out.values_NA)


def test_sb3_ppo_adapter_reads_action_logits():
    model = PPO("MlpPolicy", make_env("CartPole-v1"), seed=0, device="cpu", n_steps=64, batch_size=64)
    out = as_teacher(model)(_obs())
    probs = model.policy.get_distribution(torch.as_tensor(_obs())).distribution.probs.detach()
    torch.testing.assert_close(out.values_NA.softmax(-1), probs)
    assert out.kind == "logits" and out.features_ND.shape == (16, 64)


def test_callables_hard_actions_and_declared_kinds():
    teacher = as_teacher(cartpole_expert)
    out = teacher(_obs())
    assert out.kind == "action" and out.values_NA is None
    np.testing.assert_array_equal(out.actions_N.numpy(), cartpole_expert(_obs()))
    q = as_teacher(lambda obs: np.array([[1.0, 3.0, 2.0]] * len(obs)), kind="q")(_obs(2))
    np.testing.assert_array_equal(q.actions_N.numpy(), [1, 1])
    with pytest.raises(ValueError, match="kind="):
        as_teacher(lambda obs: np.ones((len(obs), 2)))(_obs())
    with pytest.raises(ValueError, match="hard actions"):
        teacher_logp(out)


def test_teacher_logp_is_softmax_of_q_over_tau():
    q = torch.tensor([[1.0, 2.0, 4.0]])
    out = TeacherOutput("q", q.argmax(-1), q)
    # τ = 0.5: logits 2, 4, 8 -> softmax by hand
    z = np.exp([2.0, 4.0, 8.0])
    np.testing.assert_allclose(teacher_logp(out, 0.5).exp().numpy()[0], z / z.sum(), rtol=1e-6)
    probs = TeacherOutput("probs", q.argmax(-1), torch.tensor([[0.2, 0.8]]))
    # p^(1/τ) renormalised with τ = 0.5: 0.04 / 0.68, 0.64 / 0.68
    np.testing.assert_allclose(teacher_logp(probs, 0.5).exp().numpy()[0], [0.04 / 0.68, 0.64 / 0.68], rtol=1e-6)


def test_scripted_cartpole_expert_is_perfect():
    np.testing.assert_array_equal(evaluate(cartpole_expert, "CartPole-v1", episodes=4), [500.0] * 4)


def test_train_teacher_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    config = TeacherConfig("CartPole-v1", "dqn", total_steps=300, seed=0)
    model = train_teacher(config, progress=False)
    path = teacher_path(config)
    assert path.exists() and str(path).startswith(str(tmp_path))
    stamp = path.stat().st_mtime_ns
    again = train_teacher(config, progress=False)
    assert path.stat().st_mtime_ns == stamp  # loaded, not retrained
    obs = _obs()
    torch.testing.assert_close(as_teacher(again)(obs).values_NA, as_teacher(model)(obs).values_NA)
    assert train_seconds(path) is not None and train_seconds(path) >= 0
    assert not list(path.parent.glob("*.tmp.zip"))  # the atomic save left no temporary file


def test_train_ppo_caches_by_name_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    args = PPOArgs(total_steps=64, n_envs=2, n_steps=32, hidden=(8,))
    assert ppo_seconds(args, "cartpole") is None  # never trained here
    model = train_ppo(lambda: make_env("CartPole-v1"), args, "cartpole")
    path = ppo_path(args, "cartpole")
    assert path.exists() and ppo_seconds(args, "cartpole") is not None
    stamp = path.stat().st_mtime_ns
    again = train_ppo(lambda: make_env("CartPole-v1"), args, "cartpole")
    assert path.stat().st_mtime_ns == stamp  # loaded, not retrained
    obs = _obs()
    torch.testing.assert_close(as_teacher(again)(obs).values_NA, as_teacher(model)(obs).values_NA)
    # another name or other settings are another run
    assert ppo_path(args, "other") != path != ppo_path(PPOArgs(total_steps=128, n_envs=2, n_steps=32, hidden=(8,)),
                                                       "cartpole")
