"""Losses evaluated from hidden states and an LM head, a chunk of positions at a time.

With a vocabulary of 150k, [B, T, V] logits of two models dominate memory. These helpers take the hidden states
of the positions that count, flattened to [N, D] (select them first: `hidden_BTD[mask_BT]`), and the LM heads
(any callable [n, D] -> [n, V], e.g. `model.lm_head`). Each chunk computes logits -> log_softmax -> loss inside
`torch.utils.checkpoint` (non-reentrant), so the chunk's logits are not kept for backward but recomputed there:
peak memory is O(chunk_size·V), not O(N·V). Log-softmax runs in at least float32 whatever the head's dtype.
Without a `chunk_size` a chunk holds about `CHUNK_ELEMENTS` logits, and at least 64 positions (`auto_chunk_size`).
`opd.fused` is the fast path of `chunked_divergence` for the KL family and plain linear heads.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from opd.losses import topk_divergence

Head = Callable[[torch.Tensor], torch.Tensor]

CHUNK_ELEMENTS = 3 << 20
"""Positions × vocabulary entries per chunk when no chunk size is given (12 MiB of float32 logits): 64 positions at
a 49,152-token vocabulary (a larger one gets `MIN_CHUNK_POSITIONS`), every position at once for a small one. Chosen
with `benchmarks/perf/chunk_bench.py` (results in `benchmarks/results/perf_chunks.md`) and whole steps on the SmolLM2
pair: the element-wise passes over a [chunk, V] tile are memory-bound, so 1024 positions × 49k (200 MB) stream through
memory at every pass (2.1–2.5× slower than 128 positions with autograd, 1.1–1.3× with the fused gradient), while tiles
of a few dozen positions re-read the heads' weights once per chunk. 64 positions at 49k cost the loss alone ~10 % over
128 (2.57 s against 2.31 s for 1,024 positions, fused JSD, one thread) and a whole step nothing measurable, and take
~100 MB off the step's peak memory (1,537 against 1,632 MB in one measurement; 32 positions: 1,477 MB, but 8 %
slower steps). The autograd path slows down sharply above ~10M entries (its graph keeps more tiles alive)."""


MIN_CHUNK_POSITIONS = 64
"""Fewest positions of a chunk without a chunk size, whatever the vocabulary. Every chunk reads the heads' whole
weights ([V, D], 670 MB at Gemma 3's 262k × 640) once forward, again when it is recomputed and twice backward, so a
chunk of a few positions turns the loss into weight reads: at 262k, 1,024 positions, fused reverse KL on two threads
the loss took 54.8 s at `CHUNK_ELEMENTS`' 11 positions against 15.1 s at 64, at the same peak memory (autograd:
116.6 s against 34.7 s, and 6.0 against 3.7 GB); at Qwen's 152k, 13.0 s at 20 positions against 8.5 s at 64
(`benchmarks/results/scale_notes.md`)."""


def auto_chunk_size(vocab_size: int) -> int:
    """Positions per chunk for a vocabulary of `vocab_size`: `CHUNK_ELEMENTS // vocab_size`, at least
    `MIN_CHUNK_POSITIONS`."""
    return max(MIN_CHUNK_POSITIONS, CHUNK_ELEMENTS // max(1, vocab_size))


def resolve_chunk_size(chunk_size: int | None, head: Head, hidden_ND: torch.Tensor) -> int:
    """`chunk_size` itself, or (None) `auto_chunk_size` of the head's vocabulary: its `out_features` or, for any other
    callable, the width of its output for one position."""
    if chunk_size is not None:
        return chunk_size
    vocab_size = getattr(head, "out_features", None)
    if vocab_size is None:
        if hidden_ND.dim() != 2 or hidden_ND.shape[0] == 0:
            return 1024  # nothing to chunk (or a shape error that the caller reports)
        with torch.no_grad():
            vocab_size = head(hidden_ND[:1]).shape[-1]
    return auto_chunk_size(vocab_size)


def _logp(head: Head, hidden_nD: torch.Tensor, temperature: float) -> torch.Tensor:
    logits_nV = head(hidden_nD)
    logits_nV = logits_nV.to(torch.promote_types(logits_nV.dtype, torch.float32))
    return F.log_softmax(logits_nV / temperature, -1)


def check_inputs(hidden_ND: torch.Tensor, chunk_size: int, temperature: float) -> None:
    """Refuse what every chunked or fused loss refuses: hidden states that are not [N, D], a chunk size or a
    temperature that is not positive."""
    if hidden_ND.dim() != 2:
        raise ValueError(
            f"hidden states must be [N, D] (select the positions that count first, e.g. hidden_BTD[mask_BT]), "
            f"got shape {tuple(hidden_ND.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def row_chunks(n: int, chunk_size: int) -> list[slice]:
    """Slices of `chunk_size` rows covering n rows."""
    # one (empty) chunk when n == 0, so the result stays connected to the graph and backward() still works
    return [slice(i, i + chunk_size) for i in range(0, max(n, 1), chunk_size)]


def chunked_divergence(
    divergence_fn: Callable[..., torch.Tensor],
    student_hidden_ND: torch.Tensor,
    student_head: Head,
    *,
    teacher_hidden_ND: torch.Tensor | None = None,
    teacher_head: Head | None = None,
    teacher_logp_NV: torch.Tensor | None = None,
    teacher_ids_NK: torch.Tensor | None = None,
    teacher_logp_NK: torch.Tensor | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    **kwargs: float,
) -> torch.Tensor:
    """Per-position `divergence_fn(student_logp, teacher_logp, **kwargs)`, [N], without [N, V] student logits.

    The teacher comes in exactly one of three forms:
      - `teacher_hidden_ND` + `teacher_head`: its logits are computed per chunk under no_grad (and computed again in
        the backward pass, the price of not storing them);
      - `teacher_logp_NV`: full log-probs already in memory, used as given (no gradient);
      - `teacher_ids_NK` + `teacher_logp_NK`: a top-k signal, scored with `opd.losses.topk_divergence`.
    `temperature` divides the logits computed here (student's, and teacher's from hidden states); log-probs passed
    in must already be at the temperature wanted. Gradients reach `student_hidden_ND` and the student head's
    parameters, and equal those of the unchunked computation. `chunk_size` None: `auto_chunk_size`.
    """
    chunk_size = resolve_chunk_size(chunk_size, student_head, student_hidden_ND)
    check_inputs(student_hidden_ND, chunk_size, temperature)
    n = student_hidden_ND.shape[0]
    modes = [teacher_hidden_ND is not None, teacher_logp_NV is not None, teacher_ids_NK is not None]
    if sum(modes) != 1:
        raise ValueError(
            "give the teacher exactly one way: teacher_hidden_ND + teacher_head, teacher_logp_NV, "
            "or teacher_ids_NK + teacher_logp_NK"
        )
    if (teacher_hidden_ND is None) != (teacher_head is None) or (teacher_ids_NK is None) != (teacher_logp_NK is None):
        raise ValueError("teacher_hidden_ND needs teacher_head, and teacher_ids_NK needs teacher_logp_NK (and back)")
    for name, t in [("teacher_hidden_ND", teacher_hidden_ND), ("teacher_logp_NV", teacher_logp_NV),
                    ("teacher_ids_NK", teacher_ids_NK)]:  # fmt: skip
        if t is not None and t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} positions but student_hidden_ND has {n}")

    def chunk_loss(student_hidden_nD: torch.Tensor, rows: slice) -> torch.Tensor:
        student_logp_nV = _logp(student_head, student_hidden_nD, temperature)
        if teacher_ids_NK is not None:
            return topk_divergence(
                divergence_fn, student_logp_nV, teacher_ids_NK[rows], teacher_logp_NK[rows].detach(), **kwargs
            )
        if teacher_logp_NV is not None:
            teacher_logp_nV = teacher_logp_NV[rows].detach()
        else:
            with torch.no_grad():
                teacher_logp_nV = _logp(teacher_head, teacher_hidden_ND[rows], temperature)
        return divergence_fn(student_logp_nV, teacher_logp_nV.to(student_logp_nV.dtype), **kwargs)

    # the teacher's chunk is computed inside the checkpoint on purpose: a tensor passed in would be kept alive
    # until backward for every chunk, which is the O(N·V) we are avoiding
    losses = [
        checkpoint(partial(chunk_loss, rows=rows), student_hidden_ND[rows], use_reentrant=False)
        for rows in row_chunks(n, chunk_size)
    ]
    return torch.cat(losses)


def chunked_taken_logp(
    hidden_ND: torch.Tensor,
    head: Head,
    targets_N: torch.Tensor,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(targets_N[i] | position i) from hidden states and an LM head, [N], without [N, V] logits: the input
    of `sampled_reverse_kl`, `policy_gradient_loss`, and (negated) SFT cross-entropy. `chunk_size` None:
    `auto_chunk_size`."""
    chunk_size = resolve_chunk_size(chunk_size, head, hidden_ND)
    check_inputs(hidden_ND, chunk_size, temperature)
    if targets_N.shape != hidden_ND.shape[:1]:
        raise ValueError(f"targets_N has shape {tuple(targets_N.shape)}; expected ({hidden_ND.shape[0]},)")

    def chunk_logp(hidden_nD: torch.Tensor, targets_n: torch.Tensor) -> torch.Tensor:
        return _logp(head, hidden_nD, temperature).gather(-1, targets_n.unsqueeze(-1)).squeeze(-1)

    logps = [
        checkpoint(chunk_logp, hidden_ND[rows], targets_N[rows], use_reentrant=False)
        for rows in row_chunks(hidden_ND.shape[0], chunk_size)
    ]
    return torch.cat(logps)
