"""Tests for opd.losses: hand-computed values, a numpy brute force, identities, gradients, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opd.losses import (
    DIVERGENCES,
    feature_l2,
    forward_kl,
    generalized_jsd,
    get_divergence,
    hinton_kd,
    masked_mean,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    token_cross_entropy,
    topk_divergence,
    topk_with_tail,
    tvd,
)

INF = math.inf

# ---------------------------------------------------------------------------------------------------------------
# numpy references, written from the definitions and independent of the torch code
# ---------------------------------------------------------------------------------------------------------------


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    return terms.sum(-1)


def np_jsd(ps, pt, beta):
    m = beta * pt + (1 - beta) * ps
    return beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m)


NP_REF = {
    "forward_kl": lambda ps, pt: np_kl(pt, ps),
    "reverse_kl": lambda ps, pt: np_kl(ps, pt),
    "jsd": lambda ps, pt, beta: np_jsd(ps, pt, beta),
    "skew_forward_kl": lambda ps, pt, alpha: np_kl(pt, alpha * pt + (1 - alpha) * ps),
    "skew_reverse_kl": lambda ps, pt, alpha: np_kl(ps, alpha * ps + (1 - alpha) * pt),
    "tvd": lambda ps, pt: 0.5 * np.abs(ps - pt).sum(-1),
}

# (name, kwargs) covering every registered divergence, several parameter values
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_forward_kl", {"alpha": 0.6}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.6}),
    ("tvd", {}),
]
CASE_IDS = [f"{n}{kw}" for n, kw in CASES]


def brute_force(name, s, t, **kw):
    """Direct torch transcription of the definitions (no safety), for autograd comparisons on positive inputs."""
    ps, pt = s.exp(), t.exp()

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if name == "forward_kl":
        return kl(pt, ps)
    if name == "reverse_kl":
        return kl(ps, pt)
    if name == "jsd":
        m = kw["beta"] * pt + (1 - kw["beta"]) * ps
        return kw["beta"] * kl(pt, m) + (1 - kw["beta"]) * kl(ps, m)
    if name == "skew_forward_kl":
        return kl(pt, kw["alpha"] * pt + (1 - kw["alpha"]) * ps)
    if name == "skew_reverse_kl":
        return kl(ps, kw["alpha"] * ps + (1 - kw["alpha"]) * pt)
    return 0.5 * (ps - pt).abs().sum(-1)


def random_logits(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# full divergences
# ---------------------------------------------------------------------------------------------------------------


def test_two_way_values_computed_by_hand():
    student = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    teacher = torch.tensor([0.9, 0.1], dtype=torch.float64).log()
    # KL(s ‖ t) = .5 ln(.5/.9) + .5 ln(.5/.1) = .5 ln(25/9) = ln(5/3)
    assert reverse_kl(student, teacher).item() == pytest.approx(0.5108256237659907, abs=1e-12)
    # KL(t ‖ s) = .9 ln 1.8 + .1 ln .2 = 0.52900800 - 0.16094379
    assert forward_kl(student, teacher).item() == pytest.approx(0.3680642071684, abs=1e-12)
    # ½(|.5 - .9| + |.5 - .1|)
    assert tvd(student, teacher).item() == pytest.approx(0.4, abs=1e-12)
    # skew reverse, alpha = .5: KL(s ‖ (.7, .3)) = .5 ln(.5/.7) + .5 ln(.5/.3) = .5 ln(25/21)
    assert skew_reverse_kl(student, teacher, alpha=0.5).item() == pytest.approx(0.5 * math.log(25 / 21), abs=1e-12)


@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_matches_numpy_and_keeps_shape(name, kw):
    s = F.log_softmax(random_logits(3, 4, 11, seed=1), -1)
    t = F.log_softmax(random_logits(3, 4, 11, seed=2), -1)
    out = get_divergence(name, **kw)(s, t)
    assert out.shape == (3, 4)
    expected = NP_REF[name](np.exp(s.numpy()), np.exp(t.numpy()), **kw)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert (out > 0).all()


@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_divergence_of_a_distribution_with_itself_is_zero(name, kw):
    s = F.log_softmax(random_logits(2, 5, 7, seed=3), -1)
    torch.testing.assert_close(DIVERGENCES[name](s, s.clone(), **kw), torch.zeros(2, 5, dtype=torch.float64))


@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_gradients_match_brute_force(name, kw):
    s_logits = random_logits(2, 3, 6, seed=4).requires_grad_()
    t_logits = random_logits(2, 3, 6, seed=5).requires_grad_()
    weights = random_logits(2, 3, seed=6)  # a non-uniform upstream gradient
    (DIVERGENCES[name](F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), **kw) * weights).sum().backward()
    got = s_logits.grad.clone(), t_logits.grad.clone()
    s_logits.grad = t_logits.grad = None
    (brute_force(name, F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), **kw) * weights).sum().backward()
    torch.testing.assert_close(got, (s_logits.grad, t_logits.grad))


def test_jsd_endpoints_are_the_kls_and_the_limits_of_the_rescaled_jsd():
    s = F.log_softmax(random_logits(4, 9, seed=7), -1)
    t = F.log_softmax(random_logits(4, 9, seed=8), -1)
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.0), forward_kl(s, t))
    torch.testing.assert_close(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t))
    # the documented reason: JSD_beta / (beta (1 - beta)) -> forward KL at 0, reverse KL at 1, error O(beta)
    b = 1e-6
    torch.testing.assert_close(generalized_jsd(s, t, beta=b) / (b * (1 - b)), forward_kl(s, t), rtol=1e-4, atol=0)
    torch.testing.assert_close(generalized_jsd(s, t, 1 - b) / (b * (1 - b)), reverse_kl(s, t), rtol=1e-4, atol=0)


def test_reverse_kl_cannot_move_a_student_confident_where_the_teacher_has_no_mass():
    """Mode seeking, measured in the teacher-bias benchmark (RESULTS.md): a student sure of token 1 (p = 1 - 1e-5)
    against a teacher sure of token 0 has a large reverse KL but almost no gradient on its logits,
    p_s * (log p_s - log p_t - KL); the forward KL's gradient p_s - p_t is about 1. This is why on-policy reverse-KL
    distillation neither copies nor fixes a step the student already takes with confidence."""
    student_logits = torch.tensor([[0.0, 11.5, -5.0]], requires_grad=True)  # p(1) ~ 1 - 1e-5
    teacher = F.log_softmax(torch.tensor([[9.0, 0.0, 0.0]]), -1)  # p(0) ~ 0.9998
    student = F.log_softmax(student_logits, -1)
    (grad_reverse,) = torch.autograd.grad(reverse_kl(student, teacher).sum(), student_logits, retain_graph=True)
    (grad_forward,) = torch.autograd.grad(forward_kl(student, teacher).sum(), student_logits)
    assert reverse_kl(student, teacher).item() > 8.0
    assert grad_reverse.abs().max() < 1e-3 < 0.9 < grad_forward.abs().max()


def test_skew_with_alpha_zero_is_the_plain_kl():
    s = F.log_softmax(random_logits(3, 8, seed=9), -1)
    t = F.log_softmax(random_logits(3, 8, seed=10), -1)
    torch.testing.assert_close(skew_forward_kl(s, t, alpha=0.0), forward_kl(s, t))
    torch.testing.assert_close(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t))


def _logits_with_zeros(zero_ids, seed):
    logits = random_logits(2, 6, seed=seed)
    logits[:, zero_ids] = -INF
    return logits.requires_grad_()


@pytest.mark.parametrize(
    ("student_zeros", "teacher_zeros", "finite"),
    [
        # same tokens impossible in both models: every divergence is finite
        ([1, 4], [1, 4], [n for n in DIVERGENCES]),
        # teacher-only zeros: everything but the reverse KL is finite
        ([], [0, 2], ["forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]),
        # student-only zeros: everything but the forward KL is finite
        ([3], [], ["reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]),
    ],
)
def test_zero_probabilities_give_no_nan(student_zeros, teacher_zeros, finite):
    params = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
    for name, fn in DIVERGENCES.items():
        s_logits = _logits_with_zeros(student_zeros, seed=11)
        t_logits = _logits_with_zeros(teacher_zeros, seed=12)
        out = fn(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), **params.get(name, {}))
        assert not out.isnan().any(), name
        ps, pt = F.softmax(s_logits, -1).detach().numpy(), F.softmax(t_logits, -1).detach().numpy()
        np.testing.assert_allclose(out.detach().numpy(), NP_REF[name](ps, pt, **params.get(name, {})), rtol=1e-10)
        if name in finite:
            assert out.isfinite().all(), name
            out.sum().backward()
            assert s_logits.grad.isfinite().all() and t_logits.grad.isfinite().all(), name
        else:
            assert out.isinf().all(), name  # a KL into a zero of its second argument is genuinely infinite


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd"])
def test_divergence_rejects_mismatched_vocabularies(name):
    with pytest.raises(ValueError, match="same vocabulary"):
        get_divergence(name, **({"beta": 0.5} if name == "jsd" else {}))(torch.zeros(2, 5), torch.zeros(2, 6))


def test_registry_names_and_errors():
    assert set(DIVERGENCES) == {"forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"}
    s = F.log_softmax(random_logits(5, seed=13), -1)
    t = F.log_softmax(random_logits(5, seed=14), -1)
    torch.testing.assert_close(get_divergence("jsd", beta=0.25)(s, t), generalized_jsd(s, t, 0.25))
    with pytest.raises(ValueError, match=r"unknown loss 'xyz'; choose one of: forward_kl, reverse_kl, jsd"):
        get_divergence("xyz")
    with pytest.raises(ValueError, match="beta"):
        get_divergence("jsd")  # missing parameter
    with pytest.raises(ValueError, match="unexpected keyword"):
        get_divergence("reverse_kl", beta=0.5)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        get_divergence("jsd", beta=1.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
        get_divergence("skew_reverse_kl", alpha=1.0)


# ---------------------------------------------------------------------------------------------------------------
# top-k
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_topk_with_k_equal_v_is_the_full_loss_including_gradients(name, kw):
    s_logits = random_logits(2, 3, 7, seed=15).requires_grad_()
    t_logp = F.log_softmax(random_logits(2, 3, 7, seed=16), -1)
    t_logp_K, t_ids_K = t_logp.sort(-1, descending=True)
    topk = topk_divergence(DIVERGENCES[name], F.log_softmax(s_logits, -1), t_ids_K, t_logp_K, **kw)
    (grad_topk,) = torch.autograd.grad(topk.sum(), s_logits)
    full = DIVERGENCES[name](F.log_softmax(s_logits, -1), t_logp, **kw)
    (grad_full,) = torch.autograd.grad(full.sum(), s_logits)
    torch.testing.assert_close(topk, full, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_topk, grad_full, rtol=1e-9, atol=1e-12)


def test_topk_matches_numpy_k_plus_one_way_distribution():
    s_logp = F.log_softmax(random_logits(2, 4, 10, seed=17), -1)
    t_logp_full = F.log_softmax(random_logits(2, 4, 10, seed=18), -1)
    t_logp_K, t_ids_K = t_logp_full.topk(3, -1)
    s_K1, t_K1 = topk_with_tail(s_logp, t_ids_K, t_logp_K)
    assert s_K1.shape == t_K1.shape == (2, 4, 4)
    ps, pt = np.exp(s_logp.numpy()), np.exp(t_logp_full.numpy())
    ids = t_ids_K.numpy()
    ps_K, pt_K = np.take_along_axis(ps, ids, -1), np.take_along_axis(pt, ids, -1)
    ps_K1 = np.concatenate([ps_K, 1 - ps_K.sum(-1, keepdims=True)], -1)
    pt_K1 = np.concatenate([pt_K, 1 - pt_K.sum(-1, keepdims=True)], -1)
    np.testing.assert_allclose(s_K1.exp().numpy(), ps_K1, rtol=1e-10)
    np.testing.assert_allclose(t_K1.exp().numpy(), pt_K1, rtol=1e-10)
    out = topk_divergence(reverse_kl, s_logp, t_ids_K, t_logp_K)
    assert out.shape == (2, 4)
    np.testing.assert_allclose(out.numpy(), np_kl(ps_K1, pt_K1), rtol=1e-10)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_topk_with_an_empty_tail_gives_no_nan(name):
    # the top-2 hold all the mass of both models (the third token is impossible): both tails are exactly 0
    kw = {"jsd": {"beta": 0.5}, "skew_forward_kl": {"alpha": 0.1}, "skew_reverse_kl": {"alpha": 0.1}}.get(name, {})
    s_logits = torch.tensor([[0.3, -0.2, -INF]], requires_grad=True)
    t_logp_K = torch.tensor([[0.5, 0.5]]).log()
    t_ids_K = torch.tensor([[0, 1]])
    out = topk_divergence(DIVERGENCES[name], F.log_softmax(s_logits, -1), t_ids_K, t_logp_K, **kw)
    out.sum().backward()
    assert out.isfinite().all() and s_logits.grad.isfinite().all()
    full = DIVERGENCES[name](F.log_softmax(s_logits, -1), torch.tensor([[0.5, 0.5, 0.0]]).log(), **kw)
    torch.testing.assert_close(out, full)


def test_topk_teacher_tail_reported_as_zero_is_taken_at_the_reports_resolution():
    s_logp = F.log_softmax(torch.tensor([[0.0, 0.0, 0.0]]), -1)  # student tail 1/3
    out = topk_divergence(reverse_kl, s_logp, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]).log())
    # float32 log-probs cannot tell a tail below 2^-23 from 0: two tokens 1/3 · ln((1/3) / (1/2)), plus the tail
    # (1/3)(ln(1/3) - ln(2^-23)); large but finite, and not the (1/3)·ln(2^126) a zero tail floored at tiny gave
    expected = 2 / 3 * math.log(2 / 3) + 1 / 3 * (math.log(1 / 3) + 23 * math.log(2))
    assert out.item() == pytest.approx(expected, rel=1e-5)


def _exact_buckets(logp_BV: torch.Tensor, ids_BK: torch.Tensor) -> torch.Tensor:
    """The (K + 1)-way distribution in float64 straight from the full log-probs: the tail is a logsumexp over the
    other tokens, so it is exact however small."""
    outside = torch.ones_like(logp_BV, dtype=torch.bool).scatter_(-1, ids_BK, False)
    tail = torch.logsumexp(logp_BV.masked_fill(~outside, -INF), -1, keepdim=True)
    return torch.cat([logp_BV.gather(-1, ids_BK), tail], -1)


def _peaked_teacher_as_served(rows=256, vocab=2000, k=20):
    """Teacher logits whose top token leads the rest by 5 to 40 nats (float64), and what a float32 server reports
    of them: its top-k log-probs, computed in float32."""
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    logits[:, 0] += torch.linspace(5, 40, rows, dtype=torch.float64)
    served_logp_K, ids_K = F.log_softmax(logits.float(), -1).topk(k, -1)
    return logits, ids_K, served_logp_K.double(), g


@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_topk_on_a_peaked_float32_teacher_matches_the_float64_reference(name, kw):
    t_logits, ids_K, served_K, g = _peaked_teacher_as_served()
    # the case that broke the tail: a float32 server rounds a confident top log-prob to exactly 0.0
    assert (served_K[:, 0] == 0).sum() > 50
    t_logp = F.log_softmax(t_logits, -1)
    for s_logits in (t_logits + 0.3 * torch.randn(t_logits.shape, generator=g, dtype=torch.float64),  # near
                     torch.randn(t_logits.shape, generator=g, dtype=torch.float64)):  # far: most mass in the tail
        s_logp = F.log_softmax(s_logits, -1)
        ref = DIVERGENCES[name](_exact_buckets(s_logp, ids_K), _exact_buckets(t_logp, ids_K), **kw)
        ours = topk_divergence(DIVERGENCES[name], s_logp, ids_K, served_K, **kw)
        err = (ours - ref).abs()
        # exact up to the float32 rounding of the served log-probs (about 1e-6 of probability mass in the tail)
        if name != "reverse_kl":  # these weigh the teacher's tail by its own (tiny) mass, or bound it
            assert (err <= 5e-5 + 1e-5 * ref.abs()).all()
            continue
        # reverse KL weighs log(teacher tail) by the student's tail mass s: below the report's resolution the teacher
        # tail is taken at the report's upper bound (V - k)·p_k, so the error is at most s·log(bound / true tail)
        s_tail = _exact_buckets(s_logp, ids_K)[:, -1].exp()
        true_tail = _exact_buckets(t_logp, ids_K)[:, -1]
        bound = torch.log((t_logits.shape[-1] - ids_K.shape[-1]) * served_K[:, -1].exp())
        assert (err <= s_tail * (bound - true_tail).clamp(min=0) + 1e-4).all()
        resolved = true_tail.exp() > 1e-3
        assert resolved.any() and err[resolved].max() < 1e-4 * (1 + ref[resolved].max())


def test_topk_reverse_kl_on_a_peaked_teacher_is_not_inflated_by_a_rounded_tail():
    # the measured failure: a zero teacher tail floored at float32's tiny made the top-k reverse KL several times
    # its float64 value; now it stays within the report's uncertainty
    t_logits, ids_K, served_K, g = _peaked_teacher_as_served()
    s_logp = F.log_softmax(torch.randn(t_logits.shape, generator=g, dtype=torch.float64), -1)
    ref = reverse_kl(_exact_buckets(s_logp, ids_K), _exact_buckets(F.log_softmax(t_logits, -1), ids_K))
    ours = topk_divergence(reverse_kl, s_logp, ids_K, served_K)
    assert (ours - ref).abs().mean() < 0.1 * ref.mean()


def test_topk_padding_slots_equal_a_shorter_report():
    # a server that reports fewer than K tokens (a vocabulary smaller than K) pads with id 0 and -inf
    s_logp = F.log_softmax(random_logits(1, 2, 3, seed=22), -1).requires_grad_()
    t_logp = F.log_softmax(random_logits(1, 2, 3, seed=23), -1)
    short_K, ids_short = t_logp.topk(2, -1)
    padded_K = torch.cat([short_K, torch.full((1, 2, 2), -INF, dtype=short_K.dtype)], -1)
    ids_padded = torch.cat([ids_short, torch.zeros(1, 2, 2, dtype=torch.long)], -1)
    for name, kw in CASES:
        short = topk_divergence(DIVERGENCES[name], s_logp, ids_short, short_K, **kw)
        padded = topk_divergence(DIVERGENCES[name], s_logp, ids_padded, padded_K, **kw)
        torch.testing.assert_close(padded, short)
        (g_short,) = torch.autograd.grad(short.sum(), s_logp)
        (g_padded,) = torch.autograd.grad(padded.sum(), s_logp)
        torch.testing.assert_close(g_padded, g_short)


# ---------------------------------------------------------------------------------------------------------------
# cross-entropy, Hinton KD, features, masked mean
# ---------------------------------------------------------------------------------------------------------------


def test_token_cross_entropy():
    logp = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]).log()
    targets = torch.tensor([[1, 0]])
    torch.testing.assert_close(token_cross_entropy(logp, targets), torch.tensor([[-math.log(0.75), math.log(2)]]))


def test_hinton_kd_matches_numpy_and_alpha_weights_the_distillation_term():
    s = random_logits(6, 4, seed=40)
    t = random_logits(6, 4, seed=41)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    temp, alpha = 2.0, 0.3
    out = hinton_kd(s, t, labels, temperature=temp, alpha=alpha)
    assert out.shape == (6,)
    sn, tn = s.numpy(), t.numpy()
    distill = temp**2 * np_kl(np_softmax(tn / temp), np_softmax(sn / temp))
    ce = -np.log(np_softmax(sn)[np.arange(6), labels.numpy()])
    np.testing.assert_allclose(out.numpy(), alpha * distill + (1 - alpha) * ce, rtol=1e-10)
    np.testing.assert_allclose(hinton_kd(s, t, labels, temp, alpha=1.0).numpy(), distill, rtol=1e-10)
    torch.testing.assert_close(hinton_kd(s, t, labels, temp, alpha=0.0), F.cross_entropy(s, labels, reduction="none"))


def test_feature_l2_is_the_mean_over_the_last_dim():
    s = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    t = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 3.0]])
    torch.testing.assert_close(feature_l2(s, t), torch.tensor([14 / 3, 4 / 3]))
    with pytest.raises(ValueError, match="project"):
        feature_l2(s, torch.zeros(2, 4))


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, INF], [4.0, math.nan, 6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    out = masked_mean(values, mask)
    assert out.item() == pytest.approx((1 + 2 + 4 + 6) / 4)
    out.backward()
    torch.testing.assert_close(values.grad, mask / 4.0)
    torch.testing.assert_close(masked_mean(values, mask.bool(), dim=1), torch.tensor([1.5, 5.0]))
    empty = masked_mean(values, torch.zeros(2, 3))
    assert empty.item() == 0.0
    values.grad = None
    empty.backward()
    assert (values.grad == 0).all()
