"""Pure functions for distillation across tokenizers: log-probs of shared events, and span probabilities.

Two models with different vocabularies cannot be compared token by token. What both can say exactly is (a) how
likely each *event* of a common partition is, where an event is a set of tokens of each vocabulary (`event_logp`:
a log-sum-exp of the member tokens' log-probs, exact for either model), and (b) how likely a piece of text is, by
the chain rule over that model's own tokens of it (a sum of log-probs; `span_logp`). `binary_logp` turns (b) into a
two-outcome distribution (the text, or anything else) that any divergence of `opd.losses` accepts. The alignment
that decides which positions and texts to compare lives in `opd.lm.xtok.teacher`.
"""

from __future__ import annotations

import math

import torch

SPAN_LOGP_MAX = -1e-6
"""A span's log-probability is capped just below 0 (probability 0.999999) before `log(1 - p)` is taken: at exactly
0 the complement's log is -inf and its gradient is not finite. Below the cap nothing changes."""


def event_logp(logp_NV: torch.Tensor, event_V: torch.Tensor, num_events: int) -> torch.Tensor:
    """log P(event e) = logsumexp of log p(v) over the tokens v with `event_V[v] == e`, [N, V] -> [N, E].

    Exact (no token's mass is lost to underflow: each event is shifted by its own largest member); events without
    members, or whose members all have probability 0, come out as -inf. Differentiable in `logp_NV`.
    """
    if event_V.shape[0] != logp_NV.shape[-1]:
        raise ValueError(f"event_V maps {event_V.shape[0]} tokens but the log-probs have {logp_NV.shape[-1]}")
    idx_NV = event_V.to(logp_NV.device).expand_as(logp_NV)
    # the stabiliser m is a constant for autograd: log Σ exp(x - m) + m has the same value and gradient for any m
    peak_NE = torch.full((logp_NV.shape[0], num_events), -math.inf, dtype=logp_NV.dtype, device=logp_NV.device)
    peak_NE = peak_NE.scatter_reduce(1, idx_NV, logp_NV.detach(), reduce="amax", include_self=True)
    finite_NE = torch.where(torch.isfinite(peak_NE), peak_NE, torch.zeros_like(peak_NE))
    shifted_NV = (logp_NV - finite_NE.gather(1, idx_NV)).exp()
    sums_NE = torch.zeros_like(peak_NE).scatter_add(1, idx_NV, shifted_NV)
    return torch.where(sums_NE > 0, sums_NE.clamp_min(torch.finfo(sums_NE.dtype).tiny).log() + finite_NE,
                       torch.full_like(sums_NE, -math.inf))


def span_logp(taken_logp_N: torch.Tensor, span_of_N: torch.Tensor, num_spans: int) -> torch.Tensor:
    """log P(span's text as these tokens) = Σ log p(token | everything before it) over each span's tokens: the chain
    rule, [N] -> [K]. `span_of_N[i]` is token i's span."""
    return taken_logp_N.new_zeros(num_spans).index_add(0, span_of_N.to(taken_logp_N.device), taken_logp_N)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, accurate near 0 and for very negative x (Mächler's two-branch form)."""
    near_zero = x > -math.log(2.0)
    safe_near = torch.where(near_zero, x, torch.full_like(x, -1.0))
    safe_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def binary_logp(logp_K: torch.Tensor) -> torch.Tensor:
    """[log p, log(1 - p)] for each span's log-probability, [K] -> [K, 2] (capped at SPAN_LOGP_MAX)."""
    capped = logp_K.clamp(max=SPAN_LOGP_MAX)
    return torch.stack([capped, log1mexp(capped)], dim=-1)


def span_divergence(divergence, student_span_logp_K: torch.Tensor, teacher_span_logp_K: torch.Tensor) -> torch.Tensor:
    """`divergence` between the two models' two-outcome distributions {this span's text, anything else}, [K]."""
    return divergence(binary_logp(student_span_logp_K), binary_logp(teacher_span_logp_K))
