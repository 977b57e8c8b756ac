"""What the teacher gives per token, and the local Hugging Face teacher that gives it.

Everything is in *target coordinates* (see `opd.lm.batch`): entry t of a [B, T, ...] tensor is a distribution over
token t+1 of the sequence given tokens <= t, with T = L - 1. A teacher is anything with
`score(input_ids_BL, attention_mask_BL, mask_BT) -> TeacherSignal`; a remote server (`opd.lm.remote.client`) is one too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from opd.lm.batch import TeacherSignal
from opd.lm.hf.model import final_hidden, lm_head, taken_logp
from opd.lm.teachers.base import Teacher

if TYPE_CHECKING:
    from opd.lm.batch import Batch


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

    The `--overlap` sampler process (`opd.lm.rollouts.process`) grades the first rows of the batches it samples with
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
