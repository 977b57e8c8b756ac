"""`--teacher ema`: an exponential moving average of the student's weights as the teacher (SDFT's EMA teacher).

The teacher starts as a copy of the student's starting weights and, after every update, each of its weights moves
a step towards the student's: w_teacher <- decay * w_teacher + (1 - decay) * w_student. A slowly moving teacher
keeps the target stable (decay 1 is `--teacher self`) while still taking in what the student learns; with privileged
context (a teacher prompt holding the answer or a demonstration) it is the self-distillation of SDFT and OPSD.

Only the weights the student trains are averaged (a LoRA student's adapters; its frozen base is shared knowledge
and equal anyway). Their averages go into every checkpoint (`ema_teacher.pt`), so `--resume` continues the same
teacher rather than restarting it from the student.
"""

from __future__ import annotations

import copy

import torch

from opd.lm.batch import TeacherSignal
from opd.lm.hf.model import unwrap
from opd.lm.teachers.local import LocalTeacher

CHECKPOINT_FILE = "ema_teacher.pt"
"""The file in a checkpoint directory that holds the EMA teacher's averaged weights."""


class EmaTeacher:
    """A frozen copy of the student that `follow` moves towards the student after every update."""

    def __init__(self, student, decay: float, chunk_size: int | None = None, with_taken_logp: bool = True):
        student = unwrap(student)
        self.names = [name for name, p in student.named_parameters() if p.requires_grad]
        self.local = LocalTeacher(copy.deepcopy(student), chunk_size=chunk_size, with_taken_logp=with_taken_logp)
        self.model, self.decay = self.local.model, decay
        own = dict(self.model.named_parameters())
        self.params = [own[name] for name in self.names]

    def score(self, input_ids_BL, attention_mask_BL, mask_BT) -> TeacherSignal:
        return self.local.score(input_ids_BL, attention_mask_BL, mask_BT)

    @torch.no_grad()
    def follow(self, student) -> None:
        """One EMA step towards the student's current weights (call after each optimizer step)."""
        theirs = dict(unwrap(student).named_parameters())
        for name, mine in zip(self.names, self.params):
            mine.lerp_(theirs[name].detach().to(mine.dtype), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, by the student's parameter names (what a checkpoint stores)."""
        return {name: p.detach().cpu().clone() for name, p in zip(self.names, self.params)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Put back averaged weights saved by `state_dict` (on --resume)."""
        if set(state) != set(self.names):
            missing, extra = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
            raise ValueError(f"the checkpoint's EMA teacher does not fit this student (missing {missing[:3]}, "
                             f"unexpected {extra[:3]}); resume with the run's own --student and --lora settings")
        for name, mine in zip(self.names, self.params):
            mine.copy_(state[name])


def follow_student(teacher, student) -> None:
    """After an update: an EMA teacher takes its step towards the student; every other teacher stays as it is."""
    if isinstance(teacher, EmaTeacher):
        teacher.follow(student)


def checkpointed(teacher) -> dict:
    """State a teacher keeps across checkpoints, by file name: the EMA teacher's averages; nothing for the others."""
    return {CHECKPOINT_FILE: teacher} if isinstance(teacher, EmaTeacher) else {}
