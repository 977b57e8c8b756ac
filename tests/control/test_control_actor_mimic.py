"""Actor-Mimic: a multi-task student imitates several feature-giving experts; transfer to a held-out game."""

import numpy as np
import pytest
import torch

from opd.control.actor_mimic import ActorMimicConfig, TransferConfig, actor_mimic, make_transfer_dqn, transfer_dqn
from opd.control.envs import pad_obs
from opd.control.policies import Policy, PolicySpec
from opd.control.teachers import as_teacher, cartpole_expert


def _experts():
    torch.manual_seed(1)
    return {"CartPole-v1": Policy(PolicySpec((4,), 2, (32,))), "Acrobot-v1": Policy(PolicySpec((6,), 3, (16,)))}


def test_actor_mimic_student_agrees_with_every_expert():
    experts = _experts()
    config = ActorMimicConfig(updates=600, eval_every=600, eval_episodes=2, warmup_steps=100, lr=3e-3,
                              temperature=0.1, progress=False)  # fmt: skip
    result = actor_mimic(experts, config)
    student, history = result.student, result.history
    assert student.spec.num_actions == (2, 3) and student.spec.obs_shape == (6,)
    rng = np.random.default_rng(0)
    for head, (env_id, expert) in enumerate(experts.items()):
        obs = rng.normal(size=(500, expert.spec.obs_shape[0])).astype(np.float32) * 0.5
        agree = (student.act(pad_obs(obs, 6), head) == as_teacher(expert).act(obs)).mean()
        assert agree > 0.85, (env_id, agree)  # chance: 1/2 and 1/3
    assert set(history[-1]) >= {"policy_loss", "feature_loss", "return/CartPole-v1", "return/Acrobot-v1"}


def test_actor_mimic_needs_feature_giving_experts():
    with pytest.raises(ValueError, match="features"):
        actor_mimic({"CartPole-v1": cartpole_expert}, ActorMimicConfig(progress=False))


def test_transfer_dqn_starts_from_the_actor_mimic_torso():
    torch.manual_seed(123)  # not SB3's seed, so a fresh torso differs from this one
    init = Policy(PolicySpec((6,), (2, 3), (32,)))
    config = TransferConfig("CartPole-v1", total_steps=1200, window=400, progress=False)
    model = make_transfer_dqn(config, init=init)
    for q_net in (model.q_net, model.q_net_target):
        for mine, theirs in zip(init.trunk.state_dict().values(), q_net.features_extractor.trunk.state_dict().values()):
            torch.testing.assert_close(mine, theirs)
    scratch = make_transfer_dqn(config, spec=init.spec)
    assert not torch.equal(scratch.q_net.features_extractor.trunk[0].weight, init.trunk[0].weight)
    curve = transfer_dqn(config, init=init)
    assert curve["steps"] == [400, 800, 1200] and len(curve["returns"]) == 3
    assert all(r > 0 for r in curve["returns"])  # CartPole pays 1 per step; every window holds finished episodes
    with pytest.raises(ValueError, match="exactly one"):
        transfer_dqn(config)
