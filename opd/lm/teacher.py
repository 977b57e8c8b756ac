"""What the teacher gives per token, and the local Hugging Face teacher that gives it.

Everything is in *target coordinates* (see `opd.lm.rollout`): entry t of a [B, T, ...] tensor is a distribution over
token t+1 of the sequence given tokens <= t, with T = L - 1. A teacher is anything with
`score(input_ids_BL, attention_mask_BL, mask_BT) -> TeacherSignal`; a remote server (`opd.lm.remote`) is one too.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from opd.lm.model import final_hidden, lm_head, taken_logp

if TYPE_CHECKING:
    from opd.lm.rollout import Batch


@dataclass
class TeacherSignal:
    """The teacher's grade of a batch of sequences, in target coordinates ([B, T] with T = L - 1)."""

    taken_logp_BT: torch.Tensor | None = None
    """log π_T(x_{t+1} | x_<=t) of the token that is actually there. Remote teachers always send it; a
    `LocalTeacher` built with `with_taken_logp=False` leaves it out (None): the full-vocabulary losses never read it."""
    hidden_BTD: torch.Tensor | None = None
    """Final hidden states (local teachers): full-vocabulary log-probs are `log_softmax(head(hidden))`, computed
    chunk by chunk by the loss so that [B, T, V] logits never exist for the whole batch."""
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    """hidden [N, D] -> logits [N, V]; set together with `hidden_BTD`."""
    topk_ids_BTK: torch.Tensor | None = None
    """Ids of the teacher's k most likely tokens at each position (remote teachers)."""
    topk_logp_BTK: torch.Tensor | None = None
    """Log-probs of those ids; the remaining mass 1 - Σ exp(topk_logp) is the tail bucket."""

    def rows(self) -> int:
        """How many rows (sequences) the signal grades."""
        return next(t.shape[0] for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-row fields that are set, by name (every field but `head`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "head" and getattr(self, f.name) is not None}


class TeacherUnreachable(RuntimeError):
    """The completions server (teacher or sampler) did not answer after all retries."""


class Teacher(Protocol):
    def score(
        self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, mask_BT: torch.Tensor
    ) -> TeacherSignal:
        """Grade every target position of the batch in one pass; `mask_BT` marks the completion targets."""
        ...


class LocalTeacher:
    """A frozen Hugging Face causal LM on this process's device: one forward pass grades the whole batch.

    `with_taken_logp=False` skips the log-prob of the taken tokens, a pass of the head over every completion token that
    only the sampled and SFT losses read (at a 49k vocabulary, about a fifth of the scoring time).
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int | None = None, with_taken_logp: bool = True):
        self.model = model.eval().requires_grad_(False)
        self.chunk_size = chunk_size
        self.with_taken_logp = with_taken_logp

    @torch.no_grad()
    def score(self, input_ids_BL, attention_mask_BL, mask_BT) -> TeacherSignal:
        hidden_BTD = final_hidden(self.model, input_ids_BL, attention_mask_BL)[:, :-1]
        head = lm_head(self.model)
        taken = None
        if self.with_taken_logp:
            taken = taken_logp(hidden_BTD, head, input_ids_BL[:, 1:], mask_BT, self.chunk_size)
        return TeacherSignal(taken_logp_BT=taken, hidden_BTD=hidden_BTD, head=head)


def score_batch(teacher: Teacher, batch: Batch) -> TeacherSignal:
    """`teacher.score` over `batch`, except for the rows graded already where the batch was sampled.

    The `--overlap` sampler process (`opd.lm.process_rollouts`) grades the first rows of the batches it samples with
    the same frozen local teacher, to even out the two processes' work; `batch.teacher_prefix` holds that part, and
    only the remaining rows are scored here. The rows are independent (each is its own sequence), so the joined
    signal is the one a single pass would give, up to float rounding where the two processes' kernels differ.
    """
    prefix = batch.teacher_prefix
    if prefix is None:
        return teacher.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
    k = prefix.rows()
    head = lm_head(teacher.model) if prefix.hidden_BTD is not None else None
    if k == batch.input_ids_BL.shape[0]:
        return TeacherSignal(**prefix.tensors(), head=head)
    rest = teacher.score(batch.input_ids_BL[k:], batch.attention_mask_BL[k:], batch.mask_BT[k:])
    joined = {name: torch.cat([t, getattr(rest, name)]) for name, t in prefix.tensors().items()}
    return TeacherSignal(**joined, head=rest.head)
