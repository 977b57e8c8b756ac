"""Distillation and policy-gradient losses as pure functions over log-probabilities.

Every divergence takes `student_logp` and `teacher_logp` (log_softmax outputs, last dimension = vocabulary) and
returns one value per position, [..., V] -> [...]; the direction is in the name. Nothing here reduces over positions:
do that with `masked_mean`. All divergences are safe with probabilities that are exactly zero (log-prob -inf) in
either model: no NaN values and no NaN gradients. A KL whose second argument is zero where its first is not is
genuinely infinite and comes out as inf. Chunked evaluation from hidden states lives in `opd.chunked`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# safe primitives
# ---------------------------------------------------------------------------------------------------------------


def _check_pair(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> None:
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(
            f"student_logp has shape {tuple(student_logp.shape)} but teacher_logp has shape "
            f"{tuple(teacher_logp.shape)}; both must be [..., V] over the same vocabulary"
        )


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ p·(log p − log q) over the last dim, with 0·log(0/q) = 0 and a zero gradient there."""
    p = logp.exp()
    # where() both for the value and so that no 0·inf ever meets the backward pass
    diff = torch.where(p == 0, torch.zeros_like(logp), logp - logq)
    return (p * diff).sum(-1)


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(e^a + e^b), with -inf (and a zero gradient) where both are -inf; torch's own backward is NaN there."""
    both = torch.isneginf(a) & torch.isneginf(b)
    zero = torch.zeros_like(a)
    out = torch.logaddexp(torch.where(both, zero, a), torch.where(both, zero, b))
    return torch.where(both, torch.full_like(out, -math.inf), out)


def _log_mix(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·p + (1 − w)·q), computed in log space."""
    if w == 0:
        return logq
    if w == 1:
        return logp
    return _logaddexp(logp + math.log(w), logq + math.log1p(-w))


# ---------------------------------------------------------------------------------------------------------------
# full-vocabulary divergences: [..., V] -> [...]
# ---------------------------------------------------------------------------------------------------------------


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Forward KL, KL(teacher ‖ student) = Σ p_t·(log p_t − log p_s): mass-covering, what SFT on teacher samples
    minimises in expectation. inf where the student gives zero probability to a token the teacher can produce."""
    _check_pair(student_logp, teacher_logp)
    return _kl(teacher_logp, student_logp)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Reverse KL, KL(student ‖ teacher) = Σ p_s·(log p_s − log p_t): mode-seeking, the objective of on-policy
    distillation. inf where the teacher gives zero probability to a token the student can produce."""
    _check_pair(student_logp, teacher_logp)
    return _kl(student_logp, teacher_logp)


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of the GKD paper (Agarwal et al., 2024), always finite.

    For 0 < beta < 1, with the mixture m = beta·p_t + (1 − beta)·p_s:
        JSD_beta = beta·KL(p_t ‖ m) + (1 − beta)·KL(p_s ‖ m).
    The endpoints are special cases, as in TRL's `generalized_jsd_loss`:
        beta == 0 returns `forward_kl` = KL(teacher ‖ student),
        beta == 1 returns `reverse_kl` = KL(student ‖ teacher).
    Why these: JSD_beta itself goes to 0 at both ends, but JSD_beta / (beta·(1 − beta)) tends to the forward KL as
    beta -> 0 and to the reverse KL as beta -> 1, so the endpoints continue the *rescaled* divergence (and its
    gradient direction). The value is therefore discontinuous in scale at the endpoints: near them it is about
    beta (or 1 − beta) times the corresponding KL, so rescale the learning rate when sweeping beta.
    """
    _check_pair(student_logp, teacher_logp)
    if not 0 <= beta <= 1:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1:
        return reverse_kl(student_logp, teacher_logp)
    log_m = _log_mix(teacher_logp, student_logp, beta)
    return beta * _kl(teacher_logp, log_m) + (1 - beta) * _kl(student_logp, log_m)


def _check_skew(alpha: float) -> None:
    if not 0 <= alpha < 1:
        raise ValueError(f"skew alpha must be in [0, 1) (alpha = 1 makes the loss identically 0), got {alpha}")


def skew_forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew forward KL of DistiLLM (Ko et al., 2024): KL(p_t ‖ alpha·p_t + (1 − alpha)·p_s).
    alpha = 0 is `forward_kl`; alpha > 0 keeps it finite (at most -log(alpha)) and its gradient bounded."""
    _check_pair(student_logp, teacher_logp)
    _check_skew(alpha)
    return _kl(teacher_logp, _log_mix(teacher_logp, student_logp, alpha))


def skew_reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew reverse KL of DistiLLM (Ko et al., 2024): KL(p_s ‖ alpha·p_s + (1 − alpha)·p_t).
    alpha = 0 is `reverse_kl`; alpha > 0 keeps it finite (at most -log(alpha))."""
    _check_pair(student_logp, teacher_logp)
    _check_skew(alpha)
    return _kl(student_logp, _log_mix(student_logp, teacher_logp, alpha))


def tvd(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Total variation distance ½·Σ|p_s − p_t|, symmetric and in [0, 1]."""
    _check_pair(student_logp, teacher_logp)
    return 0.5 * (student_logp.exp() - teacher_logp.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}
"""Registry: loss name -> divergence(student_logp, teacher_logp, **params). Build one with `get_divergence`."""


def get_divergence(name: str, **kwargs: float) -> Divergence:
    """The divergence registered under `name` with its parameters bound (e.g. `get_divergence("jsd", beta=0.5)`),
    as a callable (student_logp, teacher_logp) -> per-position values. Bad names and parameters fail here, at
    configuration time, not at the first training step."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(DIVERGENCES)}")
    fn = DIVERGENCES[name]
    try:
        inspect.signature(fn).bind(None, None, **kwargs)
    except TypeError as e:
        raise ValueError(f"loss {name!r}: {e}; its signature is {name}{inspect.signature(fn)}") from None
    bound = partial(fn, **kwargs)
    probe = torch.zeros(1)  # a one-token vocabulary: runs the range checks of the parameters now
    bound(probe, probe)
    return bound


# ---------------------------------------------------------------------------------------------------------------
# top-k teacher signal: K teacher tokens plus one tail bucket
# ---------------------------------------------------------------------------------------------------------------


REPORTED_RESOLUTION = torch.finfo(torch.float32).eps
"""The smallest tail mass a server's top-k log-probs resolve. vLLM (and `opd serve`) compute log-probs in float32:
the top token's log-prob is -log(1 + r), with r the rest of the mass relative to it, and 1 + r rounds to 1 once
r < 2^-24, so 1 − Σ top-k probabilities is known only to about float32's eps (1.2e-7; coarser from a bf16 model)."""


def _log_teacher_tail(logp_K: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log of the teacher's mass outside its reported top-k, kept within what the report can tell.

    Computed directly as log(1 − Σ exp(logp_K)) (-expm1 is exact where the top-k mass is near 1), then kept inside
    the bounds the report implies:
      - at most (V − k)·p_k, with p_k the smallest reported probability: every unreported token is at most as likely
        as the least likely reported one. Rounding can make the direct value exceed this; it cannot be true.
      - at least min(`REPORTED_RESOLUTION`, that upper bound): a direct value below the report's resolution is
        rounding noise (a confident teacher's top log-prob reported as exactly 0.0 says "tail below 1e-7", not "tail
        0"), so the tail is taken at the largest value the report allows. Flooring it at the smallest float instead
        (log ≈ −87) charged a student with tail mass s about s·(87 − |log t|) nats too much per token.
    Padding entries (-inf, when fewer than k tokens were reported) are not counted as reported tokens. With every
    token reported (k = V) the tail is empty; it is floored at the smallest normal float so no log is -inf.
    """
    tiny = torch.finfo(logp_K.dtype).tiny
    reported = torch.isfinite(logp_K)
    smallest = torch.where(reported, logp_K, torch.full_like(logp_K, math.inf)).amin(-1)
    unreported = (vocab_size - reported.sum(-1)).clamp(min=0).to(logp_K.dtype)
    upper = unreported * torch.where(torch.isinf(smallest), torch.zeros_like(smallest), smallest.exp())
    lower = upper.clamp(max=REPORTED_RESOLUTION)
    direct = -torch.expm1(_logsumexp(logp_K))
    return torch.log(torch.minimum(direct.clamp(min=lower), upper).clamp(min=tiny))


def _log_student_tail(student_logp_BTV: torch.Tensor, ids_BTK: torch.Tensor, reported_BTK: torch.Tensor):
    """log of the student's mass outside the teacher's reported ids: a logsumexp over the other tokens, exact even
    when the tail is far below float eps (1 − Σ would cancel to noise there). Floored at the smallest normal float
    so an empty tail is never -inf (its gradient is then 0, never NaN)."""
    # counted rather than set: a padding slot's id (0) may repeat a reported id, and must not unmark it
    hits = torch.zeros_like(student_logp_BTV).scatter_add_(-1, ids_BTK, reported_BTK.to(student_logp_BTV.dtype))
    outside = hits == 0
    rest = torch.where(outside, student_logp_BTV, torch.full_like(student_logp_BTV, -math.inf))
    return _logsumexp(rest).clamp(min=math.log(torch.finfo(student_logp_BTV.dtype).tiny))


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, with a zero (not NaN) gradient where every entry is -inf."""
    empty = torch.isneginf(x).all(-1, keepdim=True)
    out = torch.logsumexp(torch.where(empty, torch.zeros_like(x), x), -1)
    return torch.where(empty.squeeze(-1), torch.full_like(out, -math.inf), out)


def topk_with_tail(
    student_logp_BTV: torch.Tensor, teacher_ids_BTK: torch.Tensor, teacher_logp_BTK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models as (K + 1)-way distributions: the teacher's top-k tokens, then one bucket for the rest.

    Returns (student_logp_BTK1, teacher_logp_BTK1). The student's log-probs are gathered at the teacher's ids and
    its tail is its exact mass on every other token. The teacher's tail is 1 − its reported mass, kept within the
    bounds its report allows (`_log_teacher_tail`: a tail the server's float32 log-probs cannot resolve is taken at
    that resolution, not at zero). Slots whose teacher log-prob is -inf (a server that reported fewer than K tokens)
    are empty for both models. With K = V the result equals the full-vocabulary distributions (plus an empty tail).
    """
    if teacher_ids_BTK.shape != teacher_logp_BTK.shape:
        raise ValueError(
            f"teacher_ids has shape {tuple(teacher_ids_BTK.shape)} but teacher_logp has shape "
            f"{tuple(teacher_logp_BTK.shape)}; they must match"
        )
    if student_logp_BTV.shape[:-1] != teacher_ids_BTK.shape[:-1]:
        raise ValueError(
            f"student_logp has shape {tuple(student_logp_BTV.shape)} and teacher top-k has shape "
            f"{tuple(teacher_ids_BTK.shape)}; all dimensions but the last must match"
        )
    reported_BTK = torch.isfinite(teacher_logp_BTK)
    student_logp_BTK = student_logp_BTV.gather(-1, teacher_ids_BTK)
    # a padding slot holds no token for either model: its student mass stays in the tail, counted once
    student_logp_BTK = torch.where(reported_BTK, student_logp_BTK, torch.full_like(student_logp_BTK, -math.inf))
    student_tail = _log_student_tail(student_logp_BTV, teacher_ids_BTK, reported_BTK)
    teacher_tail = _log_teacher_tail(teacher_logp_BTK, student_logp_BTV.shape[-1])
    student = torch.cat([student_logp_BTK, student_tail.unsqueeze(-1)], -1)
    teacher = torch.cat([teacher_logp_BTK, teacher_tail.to(teacher_logp_BTK.dtype).unsqueeze(-1)], -1)
    return student, teacher


def topk_divergence(
    divergence_fn: Callable[..., torch.Tensor],
    student_logp_BTV: torch.Tensor,
    teacher_ids_BTK: torch.Tensor,
    teacher_logp_BTK: torch.Tensor,
    **kwargs: float,
) -> torch.Tensor:
    """`divergence_fn` (any divergence above, with `kwargs`) on the (K + 1)-way distributions of `topk_with_tail`.
    Returns [B, T]; the gradient reaches the student's full log-probs through the gathered ids and the tail."""
    student_logp_BTK1, teacher_logp_BTK1 = topk_with_tail(student_logp_BTV, teacher_ids_BTK, teacher_logp_BTK)
    return divergence_fn(student_logp_BTK1, teacher_logp_BTK1, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# sampled (single-token) estimators and policy gradients
# ---------------------------------------------------------------------------------------------------------------


def sampled_reverse_kl(student_logp_taken: torch.Tensor, teacher_logp_taken: torch.Tensor) -> torch.Tensor:
    """log π_s(x) − log π_t(x) at the sampled token x ~ π_s: an unbiased single-sample estimate of the reverse KL
    KL(student ‖ teacher) at that position."""
    return student_logp_taken - teacher_logp_taken


def discounted_returns(rewards_BT: torch.Tensor, mask_BT: torch.Tensor, discount: float) -> torch.Tensor:
    """Discounted reward-to-go per row over the masked tokens only: A_t = r_t + discount·A_t', where t' is the next
    masked position after t (positions outside the mask are skipped, so a gap costs no discount; for a contiguous
    completion this is A_t = Σ_{k ≥ t} discount^(k − t)·r_k). Unmasked positions get 0; discount = 0 gives the
    masked rewards themselves."""
    if not 0 <= discount <= 1:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    keep = mask_BT.bool()
    rewards_BT = torch.where(keep, rewards_BT, torch.zeros_like(rewards_BT))
    if discount == 0:
        return rewards_BT
    returns_BT = torch.zeros_like(rewards_BT)
    running_B = torch.zeros_like(rewards_BT[:, 0])
    for t in reversed(range(rewards_BT.shape[1])):
        running_B = torch.where(keep[:, t], rewards_BT[:, t] + discount * running_B, running_B)
        returns_BT[:, t] = running_B
    return torch.where(keep, returns_BT, torch.zeros_like(returns_BT))


def policy_gradient_loss(
    student_logp_taken_BT: torch.Tensor,
    sampling_logp_taken_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    ratio_clip: float | None = None,
) -> torch.Tensor:
    """Importance-sampled policy-gradient loss per token: −w·A, with gradient −w·A·∇log π_s(x).

    w = exp(log π_s(x) − log π_sampler(x)) corrects for the tokens having been sampled by another (older) policy;
    the sampler's log-probs and the advantages are constants (detached). With `ratio_clip = c` the weight is
    truncated and detached (truncated importance sampling): the loss is −min(w, c)·A·exp(log π_s − sg(log π_s)),
    whose value is −min(w, c)·A and whose gradient is −min(w, c)·A·∇log π_s(x). Without a clip this is exactly
    −w·A. Reduce with `masked_mean`.
    """
    if ratio_clip is not None and ratio_clip <= 0:
        raise ValueError(f"ratio_clip must be positive (or None for no truncation), got {ratio_clip}")
    log_ratio_BT = student_logp_taken_BT - sampling_logp_taken_BT.detach()
    advantages_BT = advantages_BT.detach()
    if ratio_clip is None:
        return -log_ratio_BT.exp() * advantages_BT
    weight_BT = log_ratio_BT.detach().exp().clamp(max=ratio_clip)
    score_BT = (student_logp_taken_BT - student_logp_taken_BT.detach()).exp()  # value 1, gradient ∇log π_s
    return -weight_BT * score_BT * advantages_BT


def sampled_reverse_kl_pg_loss(
    student_logp_taken_BT: torch.Tensor,
    sampling_logp_taken_BT: torch.Tensor,
    teacher_logp_taken_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    discount: float = 0.0,
    ratio_clip: float | None = None,
) -> torch.Tensor:
    """On-policy distillation as RL (the tinker-cookbook form): per-token reward r = −(log π_sampler − log π_t) at
    the sampled token, i.e. minus the sampled reverse KL, turned into advantages by `discounted_returns` (discount = 0:
    per-token only) and fed to `policy_gradient_loss`. No gradient flows through the advantages. Returns [B, T],
    zero outside `mask_BT`; reduce with `masked_mean(loss, mask_BT)`."""
    rewards_BT = -sampled_reverse_kl(sampling_logp_taken_BT, teacher_logp_taken_BT).detach()
    advantages_BT = discounted_returns(rewards_BT, mask_BT, discount)
    loss_BT = policy_gradient_loss(student_logp_taken_BT, sampling_logp_taken_BT, advantages_BT, ratio_clip)
    return torch.where(mask_BT.bool(), loss_BT, torch.zeros_like(loss_BT))


# ---------------------------------------------------------------------------------------------------------------
# supervised, classic KD, features, reduction
# ---------------------------------------------------------------------------------------------------------------


def token_cross_entropy(student_logp_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """−log p_s(target) per position (SFT / negative log-likelihood), [B, T, V], [B, T] -> [B, T]."""
    return -student_logp_BTV.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)


def hinton_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton et al. (2015) knowledge distillation per example, [..., C] logits and [...] labels -> [...]:
        alpha·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha)·CE(student, labels).
    `alpha` weights the distillation term; T² keeps its gradient scale independent of T. Takes logits, not
    log-probs, because the temperature divides logits."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    student_logp = F.log_softmax(student_logits / temperature, -1)
    teacher_logp = F.log_softmax(teacher_logits / temperature, -1)
    distill = temperature**2 * forward_kl(student_logp, teacher_logp)
    ce = token_cross_entropy(F.log_softmax(student_logits, -1), labels)
    return alpha * distill + (1 - alpha) * ce


def feature_l2(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim of (student − teacher)², [..., D] -> [...]. A mean (not a sum) so that the scale does
    not grow with D. A projection from the student's width to the teacher's belongs to the caller."""
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"student_features has shape {tuple(student_features.shape)} but teacher_features has shape "
            f"{tuple(teacher_features.shape)}; project the student's features to the teacher's width first"
        )
    return (student_features - teacher_features).square().mean(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """sum(values·mask) / max(sum(mask), 1) over `dim` (all dims if None): the only reducer. `mask` is 0/1 (bool or
    float). An all-zero mask gives 0, and values outside the mask (even inf/NaN) affect neither value nor gradient."""
    if values.shape != mask.shape:
        raise ValueError(f"values has shape {tuple(values.shape)} but mask has shape {tuple(mask.shape)}")
    keep = mask != 0
    masked = torch.where(keep, values * mask.to(values.dtype), torch.zeros_like(values))
    if dim is None:
        return masked.sum() / mask.to(values.dtype).sum().clamp(min=1)
    return masked.sum(dim) / mask.to(values.dtype).sum(dim).clamp(min=1)
