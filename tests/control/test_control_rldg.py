"""RLDG on Reacher-v5: sub-task target regions, the success filter, the human-like demonstrator, the generalist."""

import numpy as np
import pytest

from opd.control.rldg import (HELDOUT, SUBTASKS, GeneralistConfig, HumanArgs, HumanDemonstrator, SubTask,
                              collect_successful, make_reacher, policy_actor, rollout, success_rate,
                              train_generalist)  # fmt: skip

CLEAN = HumanArgs(gain_spread=1.0, noise_std=0.0, max_reaction_steps=0, pause_prob=0.0)
"""The demonstrator's intent without its flaws: a deterministic task-space spring."""


def test_targets_land_in_the_subtask_region():
    task = SubTask("test", (90, 150), (0.1, 0.15))
    env = make_reacher(task)
    for seed in range(20):
        obs, info = env.reset(seed=seed)
        target = obs[4:6]
        angle = np.degrees(np.arctan2(target[1], target[0])) % 360
        assert 90 <= angle <= 150 and 0.1 <= np.linalg.norm(target) <= 0.15
        assert info["subtask"] == "test"
        fingertip = env.unwrapped.get_body_com("fingertip")[:2]
        np.testing.assert_allclose(obs[8:10], fingertip - target, atol=1e-9)  # the observation saw the moved target


def test_heldout_gaps_do_not_overlap_the_training_sectors():
    covered = {d for t in SUBTASKS for d in range(int(t.angle[0]), int(t.angle[1]))}
    gaps = {d for t in HELDOUT for d in range(int(t.angle[0]), int(t.angle[1]))}
    assert not covered & gaps and len(covered | gaps) == 360


def test_the_demonstrator_is_right_in_intent():
    # without its flaws the scripted controller solves most episodes; doing nothing solves almost none
    assert success_rate(HumanDemonstrator(CLEAN), SUBTASKS, 20, seed=0) >= 0.7
    assert success_rate(lambda obs: np.zeros(2), SUBTASKS, 20, seed=0) <= 0.1


def test_the_human_demonstrator_is_noisier_and_more_hesitant_than_its_intent():
    env = make_reacher(SUBTASKS[0])
    human, clean = HumanDemonstrator(HumanArgs(), seed=1), HumanDemonstrator(CLEAN)
    obs, _ = env.reset(seed=0)
    human.idle = 0  # skip the reaction delay to compare commands on one state
    repeated = np.stack([human(obs) for _ in range(50)])
    assert repeated.std(0).max() > 0.1  # same state, different commands
    assert np.allclose(np.stack([clean(obs) for _ in range(5)]), clean(obs))  # the intent is deterministic
    jerk = lambda actor: np.mean([np.square(np.diff(rollout(actor, env, s)[1], axis=0)).sum(1).mean()
                                  for s in range(5)])  # noqa: E731
    assert jerk(HumanDemonstrator(HumanArgs(), seed=2)) > 2 * jerk(clean)
    starts = [rollout(HumanDemonstrator(HumanArgs(), seed=s), env, s)[1][:3] for s in range(10)]
    assert sum(np.all(a == 0) for a in starts) >= 2  # some demonstrations start late (zero torque)


def test_collect_keeps_only_successful_episodes():
    task = SUBTASKS[1]
    data = collect_successful(HumanDemonstrator(HumanArgs(), seed=0), task, episodes=4, seed=0)
    assert data.episodes == 4 and data.attempts >= 4
    assert data.obs_ND.shape == (200, 10) and data.act_NA.shape == (200, 2)
    # replay the same attempts (same reset seeds, same demonstrator stream): exactly the successful ones were kept
    env, human, kept, distances = make_reacher(task), HumanDemonstrator(HumanArgs(), seed=0), [], []
    for attempt in range(1, data.attempts + 1):
        obs_TD, _, distance = rollout(human, env, attempt)
        distances.append(distance)
        if distance < 0.03:
            kept.append(obs_TD)
    np.testing.assert_allclose(np.concatenate(kept), data.obs_ND)
    assert distances[-1] < 0.03  # it stopped at the 4th success
    with pytest.raises(RuntimeError, match="no successful"):
        collect_successful(lambda obs: np.zeros(2), task, episodes=2, seed=0, max_attempts=5)


def test_generalist_learns_from_demonstrations():
    data = collect_successful(HumanDemonstrator(CLEAN), SUBTASKS, episodes=20, seed=0)
    policy = train_generalist(data, GeneralistConfig(hidden=(64, 64), updates=300, batch_size=128))
    untrained = train_generalist(data, GeneralistConfig(hidden=(64, 64), updates=0))
    assert success_rate(policy_actor(policy), SUBTASKS, 12, seed=100) > success_rate(
        policy_actor(untrained), SUBTASKS, 12, seed=100) + 0.2
