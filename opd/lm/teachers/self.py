"""`--teacher self`: the weights the run starts from, frozen, as the teacher, without a second load from disk.

A full student is deep-copied before its first update; a LoRA student needs no copy at all, as its base weights
never change: the teacher is the same model with its adapters switched off (peft's `disable_adapter`)."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from opd.config import DistillConfig
from opd.lm.batch import TeacherSignal
from opd.lm.hf.model import final_hidden, hf_model, is_peft_model, lm_head, load_model, taken_logp, unwrap
from opd.lm.teachers.base import Teacher
from opd.lm.teachers.local import LocalTeacher


def self_teacher(cfg: DistillConfig, student, device, resumed: bool, with_taken_logp: bool) -> Teacher:
    """The weights the run started from, frozen, as the teacher (`--teacher self`).

    LoRA student: the student itself with its adapters switched off (`AdapterOffTeacher`): no copy, and the right
    weights on resume too, since the base is loaded from --student and never trained. Full student: a deep copy of
    the student taken here, before its first update; on --resume the student holds the checkpoint's weights, so the
    start is loaded again from --student (the one time a second copy comes from disk).
    """
    if is_peft_model(student):
        return AdapterOffTeacher(student, cfg.chunk_size, with_taken_logp)
    if resumed:
        model = load_model(cfg.student, dtype=cfg.teacher_dtype, device=device)
    else:
        dtype = getattr(torch, cfg.teacher_dtype)
        model = copy.deepcopy(unwrap(student)).to(dtype)
    return LocalTeacher(model, chunk_size=cfg.chunk_size, with_taken_logp=with_taken_logp)


class AdapterOffTeacher:
    """A LoRA student's base model as a frozen teacher: every forward pass (and head evaluation) runs with peft's
    adapters disabled and in eval mode, then puts the student back as it was."""

    def __init__(self, model, chunk_size: int | None = None, with_taken_logp: bool = True):
        self.model, self.chunk_size, self.with_taken_logp = unwrap(model), chunk_size, with_taken_logp

    @contextmanager
    def frozen(self):
        """The base weights alone: adapters off, eval mode, no gradients."""
        training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter(), torch.no_grad():
                yield self.model
        finally:
            self.model.train(training)

    def score(self, input_ids_BL, attention_mask_BL, mask_BT) -> TeacherSignal:
        with self.frozen() as model:
            hidden_BTD = final_hidden(model, input_ids_BL, attention_mask_BL)[:, :-1]
            head = self._head()
            taken = None
            if self.with_taken_logp:
                taken = taken_logp(hidden_BTD, head, input_ids_BL[:, 1:], mask_BT, self.chunk_size)
        return TeacherSignal(taken_logp_BT=taken, hidden_BTD=hidden_BTD, head=head)

    def _head(self):
        """The head; one that carries an adapter (lora.target_modules naming it) is evaluated with adapters off also
        later, when the loss calls it."""
        from peft.tuners.lora import LoraLayer

        head = lm_head(self.model)
        if not isinstance(hf_model(self.model).get_output_embeddings(), LoraLayer):
            return head

        def base_head(h: torch.Tensor) -> torch.Tensor:
            with self.model.disable_adapter(), torch.no_grad():
                return head(h)
        return base_head
