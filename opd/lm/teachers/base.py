"""What every teacher is: anything with `score(input_ids_BL, attention_mask_BL, mask_BT) -> TeacherSignal`
(a local model, several routed by a data column, a remote server), and the error a remote one raises when its
server stays unreachable."""

from __future__ import annotations

from typing import Protocol

import torch

from opd.lm.batch import TeacherSignal


class TeacherUnreachable(RuntimeError):
    """The completions server (teacher or sampler) did not answer after all retries."""


class Teacher(Protocol):
    def score(
        self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, mask_BT: torch.Tensor
    ) -> TeacherSignal:
        """Grade every target position of the batch in one pass; `mask_BT` marks the completion targets."""
        ...
