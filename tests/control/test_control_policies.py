"""Student networks, observation conversion, save/load."""

import numpy as np
import pytest
import torch

from opd.control.envs import make_env, make_vec_env, pad_obs
from opd.control.policies import (
    Policy, PolicySpec, count_parameters, load_policy, save_policy, spec_for_fraction, spec_parameters,
)  # fmt: skip


def test_minatar_observations_are_channels_first_float_and_padded():
    env = make_env("MinAtar/Breakout-v1", seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 10, 10) and obs.dtype == np.float32
    raw = env.unwrapped.game.state()  # (10, 10, 4) bool grid from MinAtar itself
    np.testing.assert_array_equal(obs, np.transpose(raw, (2, 0, 1)).astype(np.float32))
    padded = make_env("MinAtar/Breakout-v1", seed=0, pad_to=10)
    obs10, _ = padded.reset(seed=0)
    assert obs10.shape == (10, 10, 10)
    np.testing.assert_array_equal(obs10[:4], obs)
    assert obs10[4:].sum() == 0
    assert pad_obs(np.ones((3, 2, 2)), 5)[3:].sum() == 0 and pad_obs(np.ones((3, 2, 2)), 5).shape == (5, 2, 2)
    assert pad_obs(torch.ones(7, 3, 2, 2), 5).shape == (7, 5, 2, 2)
    np.testing.assert_array_equal(pad_obs(np.ones((2, 4)), 6), [[1, 1, 1, 1, 0, 0]] * 2)
    assert pad_obs(torch.ones(4), 6).tolist() == [1, 1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="pad_to"):
        make_env("MinAtar/Seaquest-v1", pad_to=4)


def test_vector_env_steps_all_envs():
    env = make_vec_env("CartPole-v1", 3, seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3, 4)
    obs, reward, *_ = env.step(np.zeros(3, dtype=np.int64))
    np.testing.assert_array_equal(reward, [1.0, 1.0, 1.0])


def test_parameter_count_matches_hand_count():
    mlp = Policy(PolicySpec((4,), 2, hidden=(8,)))
    assert count_parameters(mlp) == 4 * 8 + 8 + 8 * 2 + 2
    cnn = Policy(PolicySpec((4, 10, 10), (3, 5), hidden=(16,), conv_channels=2))
    conv = 4 * 2 * 9 + 2
    dense = 2 * 8 * 8 * 16 + 16
    assert count_parameters(cnn) == conv + dense + (16 * 3 + 3) + (16 * 5 + 5) == spec_parameters(cnn.spec)
    assert spec_parameters(mlp.spec) == count_parameters(mlp)
    assert cnn(torch.zeros(7, 4, 10, 10), head=1).shape == (7, 5)
    assert cnn.features(torch.zeros(7, 4, 10, 10)).shape == (7, 16)


def test_spec_for_fraction_hits_the_target_size():
    teacher = PolicySpec((4, 10, 10), 3, hidden=(128,), conv_channels=16)
    full = count_parameters(Policy(teacher))
    for fraction in (0.25, 0.07, 0.04):
        spec = spec_for_fraction(teacher, int(fraction * full))
        got = count_parameters(Policy(spec)) / full
        assert abs(got - fraction) < 0.01, (fraction, got, spec)


@pytest.mark.parametrize("spec", [PolicySpec((4,), 2), PolicySpec((6, 10, 10), (4, 3), hidden=(32,), conv_channels=4)])
def test_save_load_round_trip_gives_identical_actions(tmp_path, spec):
    torch.manual_seed(0)
    policy = Policy(spec)
    save_policy(policy, tmp_path / "student", extra={"note": "x"})
    loaded = load_policy(tmp_path / "student")
    assert loaded.spec == spec
    obs = torch.randn(50, *spec.obs_shape)
    for head in range(len(spec.num_actions)):
        torch.testing.assert_close(loaded(obs, head), policy(obs, head), rtol=0, atol=0)
        np.testing.assert_array_equal(loaded.act(obs.numpy(), head), policy.act(obs.numpy(), head))
    with pytest.raises(ValueError, match="config.json"):
        load_policy(tmp_path / "missing")
