"""Tests for opd.losses' sampled reverse-KL estimator and its policy-gradient form (truncated IS, discounting)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from opd.losses import (
    discounted_returns,
    policy_gradient_loss,
    reverse_kl,
    sampled_reverse_kl,
    sampled_reverse_kl_pg_loss,
)
from tests.test_losses import random_logits


def test_sampled_reverse_kl_is_unbiased_monte_carlo():
    torch.manual_seed(0)
    s_logp = F.log_softmax(torch.tensor([1.0, 0.0, -1.0, 0.5, -2.0], dtype=torch.float64), -1)
    t_logp = F.log_softmax(torch.tensor([0.0, 1.0, -0.5, -1.0, 0.0], dtype=torch.float64), -1)
    n = 40_000
    x = torch.multinomial(s_logp.exp(), n, replacement=True)
    estimate = sampled_reverse_kl(s_logp[x], t_logp[x]).mean().item()
    exact = reverse_kl(s_logp, t_logp).item()
    d = s_logp - t_logp
    std_error = math.sqrt(((s_logp.exp() * d**2).sum().item() - exact**2) / n)
    assert std_error < 0.05 * exact  # the test can tell a wrong estimator from a right one
    assert abs(estimate - exact) < 4 * std_error  # fails by chance with probability ~6e-5 (fixed seed anyway)


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[9.0, 1.0, 2.0, 4.0, 9.0], [1.0, 9.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 0, 1, 1, 0]])
    # row 0: 4, then 2 + .5·4 = 4, then 1 + .5·4 = 3; row 1 skips the gap: 3, 2 + 1.5 = 3.5, 1 + 1.75 = 2.75
    expected = torch.tensor([[0.0, 3.0, 4.0, 4.0, 0.0], [2.75, 0.0, 3.5, 3.0, 0.0]])
    torch.testing.assert_close(discounted_returns(rewards, mask, 0.5), expected)
    torch.testing.assert_close(discounted_returns(rewards, mask, 0.0), rewards * mask)


def _pg_setup(seed):
    logits_BTV = random_logits(2, 4, 5, seed=seed).requires_grad_()
    targets_BT = torch.randint(0, 5, (2, 4), generator=torch.Generator().manual_seed(seed))
    teacher_BT = F.log_softmax(random_logits(2, 4, 5, seed=seed + 1), -1).gather(-1, targets_BT[..., None])[..., 0]
    mask_BT = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    return logits_BTV, targets_BT, teacher_BT, mask_BT


def _taken(logits_BTV, targets_BT):
    return F.log_softmax(logits_BTV, -1).gather(-1, targets_BT[..., None])[..., 0]


@pytest.mark.parametrize("discount", [0.0, 0.7])
def test_pg_loss_gradient_at_ratio_one_is_minus_advantage_times_score(discount):
    logits, targets, teacher, mask = _pg_setup(seed=20)
    student = _taken(logits, targets)
    loss = sampled_reverse_kl_pg_loss(student, student.detach(), teacher, mask, discount=discount)
    assert (loss[mask == 0] == 0).all()
    (grad,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    advantages = discounted_returns((teacher - student).detach(), mask, discount)
    (expected,) = torch.autograd.grad((-advantages * student * mask).sum(), logits)
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(loss, -advantages * mask)  # value: -ratio·A with ratio 1


@pytest.mark.parametrize("ratio_clip", [None, 1.1])
def test_pg_loss_off_policy_weights_by_the_truncated_ratio(ratio_clip):
    logits, targets, teacher, mask = _pg_setup(seed=30)
    student = _taken(logits, targets)
    sampling = student.detach() + 0.3 * random_logits(2, 4, seed=31)  # an older policy
    loss = sampled_reverse_kl_pg_loss(student, sampling, teacher, mask, ratio_clip=ratio_clip)
    (grad,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    ratio = (student - sampling).exp().detach()
    weight = ratio if ratio_clip is None else ratio.clamp(max=ratio_clip)
    advantages = (teacher - sampling) * mask
    assert ratio_clip is None or (ratio > ratio_clip).any()  # the clip is exercised
    torch.testing.assert_close(loss, -weight * advantages)
    (expected,) = torch.autograd.grad((-weight * advantages * student).sum(), logits)
    torch.testing.assert_close(grad, expected)


def test_policy_gradient_loss_without_clip_is_ratio_times_advantage():
    student = torch.tensor([-1.0, -2.0], requires_grad=True)
    sampling = torch.tensor([-1.5, -2.0])
    advantages = torch.tensor([2.0, -1.0])
    loss = policy_gradient_loss(student, sampling, advantages)
    torch.testing.assert_close(loss, torch.tensor([-2.0 * math.exp(0.5), 1.0]))
    loss.sum().backward()  # d/dlogπ of -exp(logπ - logμ)·A = -ratio·A
    torch.testing.assert_close(student.grad, torch.tensor([-2.0 * math.exp(0.5), 1.0]))
    with pytest.raises(ValueError, match="ratio_clip"):
        policy_gradient_loss(student, sampling, advantages, ratio_clip=0.0)
