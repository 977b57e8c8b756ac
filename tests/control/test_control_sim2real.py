"""Robot-observation wrappers, MuJoCo dynamics shifts and DAgger from a privileged teacher (InvertedPendulum-v5)."""

import gymnasium as gym
import numpy as np
import pytest

from opd.control.sim2real import (DynamicsRandomization, DynamicsShift, MaskObservation, ObservationDelay,
                                  ObservationNoise, PrivilegedDistillConfig, PrivilegedObservation, RobotObsArgs,
                                  apply_dynamics, distill_privileged, evaluate_robot, make_robot_env)  # fmt: skip

ENV = "InvertedPendulum-v5"


def _run(env, steps, seed=0, action=0.1):
    """Observations and privileged observations of `steps` (< 10) steps with a constant push (the cart moves, the
    pole stays up)."""
    obs, info = env.reset(seed=seed)
    seen, clean = [obs], [info["privileged_obs"]]
    for _ in range(steps):
        obs, _, terminated, truncated, info = env.step(np.array([action], np.float32))
        assert not (terminated or truncated)
        seen.append(obs)
        clean.append(info["privileged_obs"])
    return np.array(seen), np.array(clean)


def test_delay_returns_the_observation_from_k_steps_ago():
    seen, clean = _run(ObservationDelay(PrivilegedObservation(gym.make(ENV)), steps=3), 6)
    np.testing.assert_allclose(seen[3:], clean[:-3], atol=1e-6)
    np.testing.assert_allclose(seen[:3], np.repeat(clean[:1], 3, 0), atol=1e-6)  # nothing older than the reset
    assert not np.allclose(clean[1], clean[0])  # the state does move, so the check above has teeth


def test_mask_keeps_positions_and_drops_velocities():
    seen, clean = _run(MaskObservation(PrivilegedObservation(gym.make(ENV)), keep=(0, 1)), 4)
    assert seen.shape == (5, 2)
    np.testing.assert_allclose(seen, clean[:, :2], atol=1e-6)
    assert np.abs(clean[1:, 2:]).max() > 1e-3  # the velocities that were dropped are not zero


def test_noise_has_the_requested_std_and_is_reproducible():
    env = ObservationNoise(PrivilegedObservation(gym.make(ENV)), std=0.1)
    noise = np.concatenate([np.subtract(*_run(env, 8, seed=seed)) for seed in range(10)])  # 360 values
    assert abs(noise.mean()) < 0.02 and 0.09 < noise.std() < 0.11
    first, again = _run(env, 8, seed=3)[0], _run(env, 8, seed=3)[0]
    np.testing.assert_allclose(first, again)  # same reset seed, same noise


def test_robot_env_stacks_delayed_noisy_positions_and_keeps_the_clean_state_in_info():
    env = make_robot_env(ENV, RobotObsArgs(keep=(0, 1), noise_std=0.0, delay=1, frame_stack=3))
    assert env.observation_space.shape == (6,)
    seen, clean = _run(env, 5)
    frames = seen.reshape(len(seen), 3, 2)
    np.testing.assert_allclose(frames[4:, -1], clean[3:-1, :2], atol=1e-6)  # newest frame = positions one step late
    np.testing.assert_allclose(frames[4:, 0], clean[1:-3, :2], atol=1e-6)  # oldest frame = two steps before that
    teacher_env = make_robot_env(ENV, None)
    assert teacher_env.observation_space.shape == (4,)


def test_dynamics_shift_scales_the_named_body_and_never_compounds():
    env = gym.make(ENV)
    model = env.unwrapped.model
    mass, gear = model.body_mass.copy(), model.actuator_gear[0, 0]
    apply_dynamics(env, DynamicsShift(mass=3.0, gear=0.5, bodies=("pole",)))
    apply_dynamics(env, DynamicsShift(mass=3.0, gear=0.5, bodies=("pole",)))
    np.testing.assert_allclose(model.body_mass, mass * np.array([1.0, 1.0, 3.0]))  # world, cart, pole
    assert model.actuator_gear[0, 0] == pytest.approx(gear * 0.5)
    apply_dynamics(env, DynamicsShift())
    np.testing.assert_allclose(model.body_mass, mass)
    with pytest.raises(ValueError, match="no bodies"):
        apply_dynamics(env, DynamicsShift(bodies=("arm",)))


def test_a_weaker_motor_really_changes_the_motion():
    def cart_position(shift):
        env = make_robot_env(ENV, None, shift)
        _, clean = _run(env, 2, action=1.0)
        return clean[-1, 0]

    assert cart_position(DynamicsShift(gear=0.3)) < 0.5 * cart_position(DynamicsShift())


def test_randomization_draws_new_dynamics_within_the_range_each_episode():
    env = DynamicsRandomization(gym.make(ENV), mass_range=2.0, gear_range=1.5)
    nominal = env.unwrapped.model.actuator_gear[0, 0]
    gears = []
    for seed in range(8):
        env.reset(seed=seed)
        gears.append(env.unwrapped.model.actuator_gear[0, 0] / nominal)
    assert len(set(np.round(gears, 6))) == 8
    assert all(1 / 1.5 <= g <= 1.5 for g in gears)


def _angle_teacher(privileged_NO):
    """Pushes the cart under the falling pole (a function of the pole angle only, which the student does see)."""
    return np.clip(20.0 * privileged_NO[:, 1:2], -3, 3)


def test_dagger_labels_the_states_the_student_visits_and_learns_the_teacher():
    obs = RobotObsArgs(keep=(0, 1), noise_std=0.0, delay=0, frame_stack=2)
    config = PrivilegedDistillConfig(obs=obs, randomize=None, schedule="zero", iterations=3, steps_per_iteration=30,
                                     num_envs=2, updates_per_iteration=300, lr=1e-3, eval_episodes=1)
    calls = []

    def teacher(privileged_NO):
        calls.append(privileged_NO.copy())
        return _angle_teacher(privileged_NO)

    result = distill_privileged(teacher, config)
    assert [r["dataset_size"] for r in result.history] == [60, 120, 180]
    assert [r["teacher_action_fraction"] for r in result.history] == [0.0, 0.0, 0.0]  # the student always acted
    assert sum(len(c) for c in calls) == 180 and calls[0].shape == (2, 4)  # every visited state is labelled
    probe = np.concatenate(calls)[-40:]  # states the student itself reached
    stacked = np.concatenate([probe[:, :2], probe[:, :2]], 1)  # frame-stack of a state with itself
    assert np.abs(result.student.act(stacked) - _angle_teacher(probe)).mean() < 0.3


def test_bc_lets_only_the_teacher_act():
    config = PrivilegedDistillConfig(schedule="bc", iterations=2, steps_per_iteration=10, num_envs=2,
                                     updates_per_iteration=2, eval_episodes=1)
    history = distill_privileged(_angle_teacher, config).history
    assert [r["teacher_action_fraction"] for r in history] == [1.0, 1.0]
    assert [r["beta"] for r in history] == [1.0, 1.0]


def test_evaluate_robot_gives_the_teacher_the_clean_state():
    seen = []

    def actor(obs_NO):
        seen.append(obs_NO.shape[1])
        return _angle_teacher(obs_NO) if obs_NO.shape[1] == 4 else np.zeros((len(obs_NO), 1))

    env_fn = lambda: make_robot_env(ENV, RobotObsArgs())  # noqa: E731
    clean = evaluate_robot(actor, env_fn, 2, seed=0, privileged=True)
    assert set(seen) == {4}
    seen.clear()
    blind = evaluate_robot(actor, env_fn, 2, seed=0)
    assert set(seen) == {8}
    assert clean.mean() > blind.mean()  # the angle controller balances longer than doing nothing


def test_policy_output_range_follows_the_actions_within_the_box():
    import torch

    from opd.control.sim2real import ContinuousPolicy

    policy = ContinuousPolicy(3, -np.ones(2), np.ones(2))
    obs = torch.randn(500, 3) * torch.tensor([0.01, 1.0, 100.0]) + 5
    act = torch.stack([0.05 * torch.randn(500), torch.rand(500) * 2 - 1], 1)
    policy.fit_normalizer(obs, act)
    z = (obs - policy.obs_mean) / policy.obs_std
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-4) and torch.allclose(z.std(0), torch.ones(3), atol=1e-4)
    low, high = policy.action_center - policy.action_scale, policy.action_center + policy.action_scale
    assert high[0] - low[0] < 0.5  # small actions: a narrow range
    assert low[1] >= -1 and high[1] <= 1 and high[1] - low[1] > 1.9  # wide actions: clipped to the box
    with torch.no_grad():
        policy.net[-1].bias.fill_(50.0)  # saturate the tanh: outputs stay inside the range
    out = policy(torch.randn(10, 3))
    assert (out <= high + 1e-6).all() and (out >= low - 1e-6).all()
