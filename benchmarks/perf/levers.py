"""Prototypes of the speed levers measured by the benchmark, and the patch that applies them to opd's loop.

Not library code: each lever here is measured end to end as the `opd_levers` system (opd's own `distill`, with the
patches of `patched_opd` applied in its process) and, piece by piece, by `python -m benchmarks.perf.lever_bench`.
The ones that help are proposed for `opd.chunked` / `opd.lm.teacher` in the benchmark's report.

1. `FusedDivergence`: the reverse KL and the generalized JSD between a student and a teacher head, from hidden
   states, chunk by chunk, with the gradient written out instead of differentiated through ~25 element-wise ops:
     reverse KL   d/dz_s = p_s ⊙ (log p_s − log p_t − KL(p_s ‖ p_t))
     JSD_β        d/dz_s = (1 − β) p_s ⊙ (log p_s − log m − KL(p_s ‖ m)),  m = β p_t + (1 − β) p_s
   and computed in the forward pass, so that the heads' logits are not computed a second time in backward (the
   losses are means over positions: every position gets the same upstream gradient, known up to a constant).
2. Smaller chunks (`LEVER_CHUNK_SIZE`), a plain config value (`--chunk-size`).
3. The teacher's log-prob of the taken token (`TeacherSignal.taken_logp_BT`) is not computed for the full-vocabulary
   losses, which never read it: one pass of the teacher's head over every completion token saved.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F

from opd import losses

LEVER_CHUNK_SIZE = 128
"""Positions per chunk of the head and divergence: [128, 49152] fp32 tiles stay in the last-level cache through the
~10 element-wise passes over them, where opd's default of 1024 streams 200 MB tiles through memory each time."""


def _log_probs(hidden_nD: torch.Tensor, weight_VD: torch.Tensor) -> torch.Tensor:
    logits_nV = hidden_nD @ weight_VD.T
    return F.log_softmax(logits_nV.to(torch.promote_types(logits_nV.dtype, torch.float32)), -1)


def _rowdot(a_nV: torch.Tensor, b_nV: torch.Tensor) -> torch.Tensor:
    """Σ_v a·b per row, without an [n, V] product in memory."""
    return torch.einsum("nv,nv->n", a_nV, b_nV)


def _loss_and_grad(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float):
    """(per-position divergence [n], its gradient with respect to the student's logits [n, V]).

    Works in place on its inputs (a handful of [n, V] buffers live at once instead of ~15). Log-probs from a plain
    linear head are finite, so no 0·log 0 guard is needed (`opd.losses` guards for log-probs that can be -inf).
    """
    if beta == 1.0:  # reverse KL
        p = s_logp.exp()
        gap = s_logp.sub_(t_logp)
        loss_n = _rowdot(p, gap)
        return loss_n, gap.sub_(loss_n.unsqueeze(-1)).mul_(p)
    log_m = torch.logaddexp(t_logp + math.log(beta), s_logp + math.log1p(-beta))
    kl_t = _rowdot(t_logp.exp(), t_logp.sub_(log_m))
    p = s_logp.exp()
    gap = s_logp.sub_(log_m)
    kl_s = _rowdot(p, gap)
    return beta * kl_t + (1 - beta) * kl_s, gap.sub_(kl_s.unsqueeze(-1)).mul_(p).mul_(1 - beta)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, i + size) for i in range(0, n, size)]


class FusedDivergence(torch.autograd.Function):
    """Per-position divergence [N] of a student head against a teacher head, evaluated `chunk_size` rows at a time;
    beta = 1.0 is the reverse KL, 0 < beta < 1 the generalized JSD.

    The forward pass also computes the gradients for an upstream gradient that is the same for every position (what
    a mean over positions sends back), accumulating them into one [V, D] buffer; backward only scales them. Any
    other upstream gradient is handled by recomputing the chunks (memory stays O(chunk · V) either way).
    """

    @staticmethod
    def forward(ctx, s_hidden_ND, s_weight_VD, t_hidden_ND, t_weight_VD, beta, chunk_size):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_N = s_hidden_ND.new_empty(s_hidden_ND.shape[0], dtype=torch.promote_types(s_hidden_ND.dtype,
                                                                                       torch.float32))
        grad_h = torch.zeros_like(s_hidden_ND) if need_h else None
        grad_w = torch.zeros_like(s_weight_VD) if need_w else None
        with torch.no_grad():
            for rows in _chunks(s_hidden_ND.shape[0], chunk_size):
                loss_N[rows], g_nV = _loss_and_grad(_log_probs(s_hidden_ND[rows], s_weight_VD),
                                                    _log_probs(t_hidden_ND[rows], t_weight_VD), beta)
                g_nV = g_nV.to(s_hidden_ND.dtype)
                if need_h:
                    grad_h[rows] = g_nV @ s_weight_VD
                if need_w:
                    grad_w.addmm_(g_nV.T, s_hidden_ND[rows])
        ctx.save_for_backward(s_hidden_ND, s_weight_VD, t_hidden_ND, t_weight_VD, grad_h, grad_w)
        ctx.beta, ctx.chunk_size = beta, chunk_size
        return loss_N

    @staticmethod
    def backward(ctx, grad_N):
        s_hidden, s_weight, t_hidden, t_weight, grad_h, grad_w = ctx.saved_tensors
        if grad_N.numel() and bool((grad_N == grad_N[0]).all()):
            c = grad_N[0].to(s_hidden.dtype)
            return (None if grad_h is None else grad_h * c, None if grad_w is None else grad_w * c,
                    None, None, None, None)
        grad_h = torch.zeros_like(s_hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(s_weight) if ctx.needs_input_grad[1] else None
        with torch.no_grad():
            for rows in _chunks(s_hidden.shape[0], ctx.chunk_size):
                _, g_nV = _loss_and_grad(_log_probs(s_hidden[rows], s_weight), _log_probs(t_hidden[rows], t_weight),
                                         ctx.beta)
                g_nV = (g_nV * grad_N[rows].unsqueeze(-1)).to(s_hidden.dtype)
                if grad_h is not None:
                    grad_h[rows] = g_nV @ s_weight
                if grad_w is not None:
                    grad_w.addmm_(g_nV.T, s_hidden[rows])
        return grad_h, grad_w, None, None, None, None


def fused_chunked_divergence(beta: float, student_hidden_ND, student_weight_VD, teacher_hidden_ND, teacher_weight_VD,
                             chunk_size: int = 1024) -> torch.Tensor:
    """`opd.chunked.chunked_divergence` for the reverse KL (beta=1) or JSD_β, as one `FusedDivergence`."""
    return FusedDivergence.apply(student_hidden_ND, student_weight_VD, teacher_hidden_ND.detach(),
                                 teacher_weight_VD.detach(), beta, chunk_size)


def _fused_beta(divergence_fn) -> float | None:
    """beta for `FusedDivergence` if `divergence_fn` is the reverse KL or a generalized JSD with 0 < β < 1."""
    fn = getattr(divergence_fn, "func", divergence_fn)
    if fn is losses.reverse_kl:
        return 1.0
    beta = getattr(divergence_fn, "keywords", {}).get("beta")
    if fn is losses.generalized_jsd and beta is not None and 0 < beta < 1:
        return float(beta)
    return None


def _plain_linear(head) -> bool:
    return isinstance(head, torch.nn.Linear) and head.bias is None


@contextlib.contextmanager
def patched_opd(loss: str):
    """Inside this block opd's loop uses the prototypes above for `loss` (only where they apply: Llama-style plain
    heads, the reverse KL or the JSD, a local teacher); everything else runs unchanged."""
    if loss not in ("reverse_kl", "jsd"):
        raise ValueError(f"the lever prototypes cover the reverse_kl and jsd losses, not {loss!r}")
    import opd.lm.teacher as teacher_mod
    import opd.lm.train as train_mod

    original_divergence = train_mod.chunked_divergence
    original_score = teacher_mod.LocalTeacher.score

    @functools.wraps(original_divergence)
    def divergence(divergence_fn, student_hidden_ND, student_head, *, teacher_hidden_ND=None, teacher_head=None,
                   chunk_size=1024, temperature=1.0, **kwargs):
        beta = _fused_beta(divergence_fn)
        if (beta is not None and teacher_hidden_ND is not None and temperature == 1.0 and not kwargs
                and _plain_linear(student_head) and _plain_linear(teacher_head)):
            return fused_chunked_divergence(beta, student_hidden_ND, student_head.weight, teacher_hidden_ND,
                                            teacher_head.weight, chunk_size)
        return original_divergence(divergence_fn, student_hidden_ND, student_head, teacher_hidden_ND=teacher_hidden_ND,
                                   teacher_head=teacher_head, chunk_size=chunk_size, temperature=temperature, **kwargs)

    @torch.no_grad()
    def score(self, input_ids_BL, attention_mask_BL, mask_BT):
        from opd.lm.model import final_hidden, lm_head

        hidden_BTD = final_hidden(self.model, input_ids_BL, attention_mask_BL)[:, :-1]
        # taken_logp_BT is read by the sampled and SFT losses only; the full-vocabulary ones skip that head pass
        return teacher_mod.TeacherSignal(taken_logp_BT=torch.zeros(mask_BT.shape), hidden_BTD=hidden_BTD,
                                         head=lm_head(self.model))

    train_mod.chunked_divergence = divergence
    teacher_mod.LocalTeacher.score = score
    try:
        yield
    finally:
        train_mod.chunked_divergence = original_divergence
        teacher_mod.LocalTeacher.score = original_score
