"""Actor-Mimic: a multi-task student imitates several feature-giving experts; transfer to a held-out game."""

import numpy as np
import pytest
import torch

from opd.control.actor_mimic import (
    ActorMimicConfig,
    TransferConfig,
    actor_mimic,
    make_transfer_dqn,
    mimic_loss,
    transfer_dqn,
)
from opd.control.envs import pad_obs
from opd.control.policies import Policy, PolicySpec
from opd.control.teachers import TeacherOutput, as_teacher, cartpole_expert


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



def test_the_update_loss_is_the_policy_term_plus_the_weighted_feature_term():
    # Two games (2 and 3 actions, experts' features of width 5 and 4); the reference written out from the paper's
    # definitions: Σ_games mean_states KL(softmax(Q/τ) ‖ π_student) + β·Σ_games mean_states mean_d (f_i(h) − φ_i)².
    torch.manual_seed(0)
    student = Policy(PolicySpec((6,), (2, 3), (8,)))
    projections = torch.nn.ModuleList([torch.nn.Linear(8, 5), torch.nn.Linear(8, 4)])
    config = ActorMimicConfig(temperature=0.5, feature_weight=0.3)
    batches = []
    for actions, width in ((2, 5), (3, 4)):
        q = torch.randn(7, actions)
        batches.append((torch.randn(7, 6), TeacherOutput("q", q.argmax(-1), q, torch.randn(7, width))))
    loss, policy, feature = mimic_loss(student, projections, batches, config)
    want_policy, want_feature = 0.0, 0.0
    with torch.no_grad():
        for head, (obs, grade) in enumerate(batches):
            h = student.trunk(obs)
            log_pi = torch.log_softmax(student.heads[head](h), -1)
            p_t = torch.softmax(grade.values_NA / 0.5, -1)
            want_policy += (p_t * (p_t.log() - log_pi)).sum(-1).mean().item()
            want_feature += ((projections[head](h) - grade.features_ND) ** 2).mean().item()
    assert policy.item() == pytest.approx(want_policy, rel=1e-5)
    assert feature.item() == pytest.approx(want_feature, rel=1e-5)
    assert loss.item() == pytest.approx(want_policy + 0.3 * want_feature, rel=1e-5)
    assert 0.3 * want_feature > 0.2 * want_policy  # the feature term weighs here: a loss without it fails
    loss.backward()  # and it trains the projections
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projections.parameters())

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
