"""The fast path of `opd.chunked.chunked_divergence`: the gradient written out, computed with the loss.

`chunked_divergence` differentiates log_softmax and the divergence with autograd: some 25 element-wise passes over
each [chunk, V] tile, and every chunk's logits computed twice (in the forward pass, and again in backward, the price
of checkpointing). For the KL family the gradient with respect to the student's logits z_s has a closed form,

    forward KL   KL(p_t ‖ p_s)   ∂/∂z_s = p_s − p_t
    reverse KL   KL(p_s ‖ p_t)   ∂/∂z_s = p_s ⊙ (log p_s − log p_t − KL(p_s ‖ p_t))
    JSD_β        (0 < β < 1)     ∂/∂z_s = (1 − β)·p_s ⊙ (log p_s − log m − KL(p_s ‖ m)),   m = β·p_t + (1 − β)·p_s

(β as in `opd.losses.generalized_jsd`: the teacher's weight in m; β = 0 is the forward KL, β = 1 the reverse KL), so
`fused_divergence` computes each chunk's logits once, in the forward pass, and with them the gradients with respect
to the student's hidden states and head for an upstream gradient of 1 at every position. Backward scales them: the
hidden states' gradient row by row (exact for any upstream gradient, each row's loss depends on its own row only),
the head's by the upstream value when it is the same at every position (what a mean sends back); any other upstream
gradient recomputes the chunks for the head. Memory stays O(chunk · V), plus one [V, D] buffer for the head's
gradient. Where the fast path does not apply (another divergence, a head that is not a plain `nn.Linear`, autocast)
`fused_divergence` is `chunked_divergence`, with the same values and gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn

from opd import losses
from opd.chunked import Head, check_inputs, row_chunks, chunked_divergence, resolve_chunk_size


def fused_beta(divergence_fn: Callable[..., torch.Tensor], **kwargs: float) -> float | None:
    """β in [0, 1] if `divergence_fn(·, ·, **kwargs)` is the forward KL (0), the reverse KL (1) or JSD_β; else None.

    Recognises the functions of `opd.losses` and `functools.partial`s of them (what `get_divergence` returns)."""
    while isinstance(divergence_fn, partial):
        kwargs = {**divergence_fn.keywords, **kwargs}
        divergence_fn = divergence_fn.func
    if divergence_fn is losses.reverse_kl and not kwargs:
        return 1.0
    if divergence_fn is losses.forward_kl and not kwargs:
        return 0.0
    if divergence_fn is losses.generalized_jsd and set(kwargs) == {"beta"} and 0 <= kwargs["beta"] <= 1:
        return float(kwargs["beta"])
    return None


def plain_linear(head: Head, hidden_ND: torch.Tensor) -> bool:
    """Whether `head(hidden_ND)` is exactly `hidden_ND @ head.weight.T + head.bias`, so its weight can be used directly:
    an `nn.Linear` itself (not a subclass, which may quantise or adapt), without forward hooks (FSDP gathers weights
    in one), with an ordinary tensor of the hidden states' dtype and device as weight, outside autocast."""
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return False
    w = head.weight
    return (type(w.data) is torch.Tensor and w.dim() == 2 and w.shape[1] == hidden_ND.shape[-1]
            and w.dtype == hidden_ND.dtype and w.device == hidden_ND.device
            and not torch.is_autocast_enabled(hidden_ND.device.type))


def fused_divergence(
    divergence_fn: Callable[..., torch.Tensor],
    student_hidden_ND: torch.Tensor,
    student_head: Head,
    *,
    teacher_hidden_ND: torch.Tensor,
    teacher_head: Head,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    **kwargs: float,
) -> torch.Tensor:
    """`chunked_divergence(divergence_fn, student_hidden_ND, student_head, teacher_hidden_ND=…, teacher_head=…)`,
    per position [N], with the same values and gradients, about twice as fast where the fast path applies: the
    divergence is the forward KL, the reverse KL or the generalized JSD (`fused_beta`) and the student's head is a
    plain linear layer (`plain_linear`; a tied embedding is fine, its gradient reaches the shared parameter). The
    teacher's head can be any callable. Elsewhere this calls `chunked_divergence`. Not twice differentiable."""
    beta = fused_beta(divergence_fn, **kwargs)
    if beta is None or not plain_linear(student_head, student_hidden_ND):
        return chunked_divergence(divergence_fn, student_hidden_ND, student_head, teacher_hidden_ND=teacher_hidden_ND,
                                  teacher_head=teacher_head, chunk_size=chunk_size, temperature=temperature, **kwargs)
    chunk_size = resolve_chunk_size(chunk_size, student_head, student_hidden_ND)
    check_inputs(student_hidden_ND, chunk_size, temperature)
    if teacher_hidden_ND.shape[0] != student_hidden_ND.shape[0]:
        raise ValueError(f"teacher_hidden_ND has {teacher_hidden_ND.shape[0]} positions but student_hidden_ND has "
                         f"{student_hidden_ND.shape[0]}")
    return _FusedDivergence.apply(student_hidden_ND, student_head.weight, student_head.bias,
                                  teacher_hidden_ND.detach(), teacher_head, beta, temperature, chunk_size)


def _log_probs(logits_nV: torch.Tensor, temperature: float) -> torch.Tensor:
    logits_nV = logits_nV.to(torch.promote_types(logits_nV.dtype, torch.float32))
    if temperature != 1.0:
        logits_nV = logits_nV / temperature
    return torch.log_softmax(logits_nV, -1)


_ROWDOT_ELEMENTS = 1 << 18
"""Entries per block of `_rowdot`: its product buffer (1 MiB of float32) stays in cache and never costs an [n, V]."""


def _rowdot(a_nV: torch.Tensor, b_nV: torch.Tensor) -> torch.Tensor:
    """Σ_v a[i, v]·b[i, v] for each row i, a few rows at a time. In one call, `(a * b).sum(-1)` and `vecdot` allocate
    a product as large as `a`; blocks of rows keep it small, and are faster too (measured 2.5 ms against 3.6 ms for
    vecdot and 5.1 ms for mul + sum on [128, 49152], one thread)."""
    n, V = a_nV.shape
    out_n = a_nV.new_empty(n)
    step = max(1, _ROWDOT_ELEMENTS // max(1, V))
    for i in range(0, n, step):
        torch.linalg.vecdot(a_nV[i : i + step], b_nV[i : i + step], out=out_n[i : i + step])
    return out_n


def _loss_and_logit_grad(s_logp_nV: torch.Tensor, t_logp_nV: torch.Tensor, beta: float):
    """(divergence per row [n], its gradient with respect to the student's logits [n, V]) for upstream gradient 1.

    Overwrites both inputs (the teacher's buffer ends up holding log m for the JSD) and allocates at most two more
    [n, V] buffers (one for the KLs), instead of the ~15 of the autograd graph. The student's log-probs come from a
    linear head, so they are finite (probabilities that underflow to 0 multiply finite numbers, no 0·log 0 guard
    needed); the teacher's head may mask tokens with -inf logits.
    """
    if beta != 1.0:
        # where p_t = 0 a token adds nothing to the forward KL or the JSD; a finite floor keeps 0·(−inf) from making
        # it NaN. (The reverse KL stays inf there, as in opd.losses: the student puts mass where the teacher has none.)
        t_logp_nV.clamp_(min=torch.finfo(t_logp_nV.dtype).min)
    if beta == 0.0:  # forward KL: Σ p_t (log p_t − log p_s), gradient p_s − p_t
        p_t = t_logp_nV.exp()
        loss_n = _rowdot(p_t, t_logp_nV.sub_(s_logp_nV))
        return loss_n, s_logp_nV.exp_().sub_(p_t)
    p_s = s_logp_nV.exp()
    if beta == 1.0:  # reverse KL: Σ p_s (log p_s − log p_t)
        gap_nV = s_logp_nV.sub_(t_logp_nV)
        loss_n = _rowdot(p_s, gap_nV)
        return loss_n, gap_nV.sub_(loss_n.unsqueeze(-1)).mul_(p_s)
    # JSD_β = β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m). KL(p_t ‖ m) = Σ p_t log p_t − Σ p_t log m: its first sum is taken
    # while the teacher's log-probs are still there, then their buffer takes log m.
    p_t = t_logp_nV.exp()
    cross_t_n = _rowdot(p_t, t_logp_nV)
    # log m from the probabilities: three times faster than logaddexp of the log-probs; m is floored at the smallest
    # normal float so log m stays finite where both probabilities underflow (their terms are < 1e-36 there)
    log_m_nV = t_logp_nV.copy_(p_t).mul_(beta).add_(p_s, alpha=1 - beta).clamp_(min=torch.finfo(p_s.dtype).tiny).log_()
    kl_t_n = cross_t_n - _rowdot(p_t, log_m_nV)
    del p_t
    gap_nV = s_logp_nV.sub_(log_m_nV)
    kl_s_n = _rowdot(p_s, gap_nV)
    return beta * kl_t_n + (1 - beta) * kl_s_n, gap_nV.sub_(kl_s_n.unsqueeze(-1)).mul_(p_s).mul_(1 - beta)


class _FusedDivergence(torch.autograd.Function):
    """Inputs: student hidden [N, D], weight [V, D], bias [V] or None; teacher hidden [N, D'] and head (constants);
    β, temperature, chunk size. Output: the divergence per position [N], float32 or wider."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, bias_V, t_hidden_ND, t_head, beta, temperature, chunk_size):
        ctx.want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias_V is not None)
        loss_N, *ctx.grads = _chunk_pass(hidden_ND, weight_VD, bias_V, t_hidden_ND, t_head, beta, temperature,
                                         chunk_size, None, *ctx.want)
        ctx.save_for_backward(hidden_ND, weight_VD, bias_V, t_hidden_ND)
        ctx.t_head, ctx.beta, ctx.temperature, ctx.chunk_size = t_head, beta, temperature, chunk_size
        return loss_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_N):
        hidden_ND, weight_VD, bias_V, t_hidden_ND = ctx.saved_tensors
        recompute = partial(_chunk_pass, hidden_ND, weight_VD, bias_V, t_hidden_ND, ctx.t_head, ctx.beta,
                            ctx.temperature, ctx.chunk_size, grad_N)
        if ctx.grads is None:  # a second backward through the graph (retain_graph): the buffers are spent
            _, grad_h, grad_w, grad_b = recompute(*ctx.want)
            return grad_h, grad_w, grad_b, None, None, None, None, None
        (grad_h, grad_w, grad_b), ctx.grads = ctx.grads, None
        if grad_h is not None:  # each row's loss depends on its own hidden row only: scaling the row is exact
            grad_h.mul_(grad_N.unsqueeze(-1).to(grad_h.dtype))
        if grad_w is not None or grad_b is not None:
            # the head's gradient sums over positions; it can be scaled only if every position's upstream gradient is
            # the same (what a mean over positions sends back), otherwise the chunks are computed again
            if grad_N.numel() == 0 or bool((grad_N == grad_N[0]).all()):
                c = grad_N[0] if grad_N.numel() else 0.0
                grad_w = None if grad_w is None else grad_w.mul_(c)
                grad_b = None if grad_b is None else grad_b.mul_(c)
            else:
                _, _, grad_w, grad_b = recompute(False, grad_w is not None, grad_b is not None)
        return grad_h, grad_w, grad_b, None, None, None, None, None


@torch.no_grad()
def _chunk_pass(hidden_ND, weight_VD, bias_V, t_hidden_ND, t_head, beta, temperature, chunk_size, grad_N,
                want_h, want_w, want_b):
    """One pass over the chunks: (loss [N], gradients w.r.t. hidden [N, D], weight [V, D] and bias [V], each None if
    not wanted), with per-position upstream gradient `grad_N` (None: 1 everywhere)."""
    n = hidden_ND.shape[0]
    loss_N = hidden_ND.new_empty(n, dtype=torch.promote_types(hidden_ND.dtype, torch.float32))
    grad_h = torch.empty_like(hidden_ND) if want_h else None
    grad_w = torch.zeros_like(weight_VD) if want_w else None
    grad_b = torch.zeros_like(bias_V) if want_b else None
    for rows in row_chunks(n, chunk_size):
        h_nD = hidden_ND[rows]
        s_logp_nV = _log_probs(nn.functional.linear(h_nD, weight_VD, bias_V), temperature)
        t_logp_nV = _log_probs(t_head(t_hidden_ND[rows]), temperature).to(s_logp_nV.dtype)
        loss_N[rows], g_nV = _loss_and_logit_grad(s_logp_nV, t_logp_nV, beta)
        if not (want_h or want_w or want_b):
            continue
        if temperature != 1.0:  # z = logits / T
            g_nV = g_nV.div_(temperature)
        if grad_N is not None:
            g_nV = g_nV.mul_(grad_N[rows].unsqueeze(-1).to(g_nV.dtype))
        g_nV = g_nV.to(weight_VD.dtype)
        if want_h:
            grad_h[rows] = g_nV @ weight_VD
        if want_w:
            grad_w.addmm_(g_nV.T, h_nD)
        if want_b:
            grad_b.add_(g_nV.sum(0))
    return loss_N, grad_h, grad_w, grad_b

