"""Helpers shared by the control loops: the per-state distillation loss, teacher-label storage, metrics logging.

`policy_loss` is the "divergence" choice of every control method, on top of `opd.losses`:

    kl / forward_kl  KL(softmax(teacher/τ) ‖ π_student)   Rusu's KL; cross-entropy to soft targets up to a constant
    reverse_kl       KL(π_student ‖ softmax(teacher/τ))   the on-policy distillation default
    jsd, tvd         generalized JSD (β=0.5) and total variation
    nll              −log π_student(teacher's greedy action)   behavioural cloning / DAgger / Rusu's NLL
    mse              (student output − teacher Q-value)², mean over actions   Rusu's MSE (student outputs Q-values)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from opd.control.teachers import TeacherOutput, teacher_logp
from opd.losses import feature_l2, forward_kl, generalized_jsd, reverse_kl, token_cross_entropy, tvd

LOSSES = ("kl", "forward_kl", "reverse_kl", "jsd", "tvd", "nll", "mse")


def check_loss(loss: str, teacher_kind: str) -> None:
    """Fail at configuration time if `loss` is unknown or needs more than the teacher gives."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if teacher_kind == "action" and loss != "nll":
        raise ValueError(f"loss={loss!r} needs a teacher distribution but the teacher gives hard actions; use loss='nll'")
    if loss == "mse" and teacher_kind == "action":
        raise ValueError("loss='mse' regresses Q-values; this teacher gives none")


def policy_loss(student_logits_NA: torch.Tensor, teacher: TeacherOutput, loss: str, temperature: float = 1.0):
    """Per-state loss [N] between the student's outputs and the teacher's grade of the same N states."""
    if loss == "nll":
        return token_cross_entropy(F.log_softmax(student_logits_NA, -1), teacher.actions_N)
    if loss == "mse":
        return feature_l2(student_logits_NA, teacher.values_NA)
    student_logp_NA = F.log_softmax(student_logits_NA, -1)
    target_logp_NA = teacher_logp(teacher, temperature)
    if loss in ("kl", "forward_kl"):
        return forward_kl(student_logp_NA, target_logp_NA)
    if loss == "reverse_kl":
        return reverse_kl(student_logp_NA, target_logp_NA)
    if loss == "jsd":
        return generalized_jsd(student_logp_NA, target_logp_NA, 0.5)
    if loss == "tvd":
        return tvd(student_logp_NA, target_logp_NA)
    raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def cat_outputs(outputs: list[TeacherOutput]) -> TeacherOutput:
    """Concatenate teacher grades of several batches of states (the aggregated dataset's labels)."""
    def cat(name):
        parts = [getattr(o, name) for o in outputs]
        return None if parts[0] is None else torch.cat(parts)

    return TeacherOutput(outputs[0].kind, cat("actions_N"), cat("values_NA"), cat("features_ND"))


def take(output: TeacherOutput, index: torch.Tensor) -> TeacherOutput:
    """The grades of the states at `index`."""
    pick = lambda t: None if t is None else t[index]  # noqa: E731
    return TeacherOutput(output.kind, output.actions_N[index], pick(output.values_NA), pick(output.features_ND))


@dataclass
class MetricsLog:
    """Metric rows with a monotone step counter, kept in memory and appended to `run_dir/metrics.jsonl`."""

    run_dir: str | Path | None = None
    rows: list[dict] = field(default_factory=list)
    start: float = field(default_factory=time.time)

    def log(self, step: int, **metrics) -> dict:
        """Record metrics at `step` (must not go backwards; the x axis of every plot)."""
        if self.rows and step < self.rows[-1]["step"]:
            raise ValueError(f"step {step} is before the last logged step {self.rows[-1]['step']}; steps are monotone")
        row = {"step": int(step), "wall_s": round(time.time() - self.start, 3), **metrics}
        self.rows.append(row)
        if self.run_dir is not None:
            path = Path(self.run_dir)
            path.mkdir(parents=True, exist_ok=True)
            with open(path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return row


class StateBuffer:
    """A FIFO of states and the teacher's grades of them (Rusu's replay memory of teacher experience)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"buffer capacity={capacity}; pass at least 1")
        self.capacity, self.size, self.next, self.total = capacity, 0, 0, 0
        self.obs: torch.Tensor | None = None
        self.labels: TeacherOutput | None = None

    def add(self, obs_NO, labels: TeacherOutput) -> None:
        """Append N states with their grades, overwriting the oldest once full."""
        obs_NO = torch.as_tensor(obs_NO, dtype=torch.float32)
        if len(obs_NO) > self.capacity:  # only the newest states would survive anyway
            obs_NO, labels = obs_NO[-self.capacity :], take(labels, torch.arange(len(obs_NO))[-self.capacity :])
        if self.obs is None:  # allocate on first use, when the shapes are known
            alloc = lambda t: None if t is None else torch.zeros(self.capacity, *t.shape[1:], dtype=t.dtype)  # noqa: E731
            self.obs = alloc(obs_NO)
            self.labels = TeacherOutput(labels.kind, alloc(labels.actions_N), alloc(labels.values_NA),
                                        alloc(labels.features_ND))  # fmt: skip
        index = (self.next + torch.arange(len(obs_NO))) % self.capacity
        self.obs[index] = obs_NO
        for name in ("actions_N", "values_NA", "features_ND"):
            if getattr(labels, name) is not None:
                getattr(self.labels, name)[index] = getattr(labels, name)
        self.next = int(index[-1] + 1) % self.capacity
        self.size = min(self.capacity, self.size + len(obs_NO))
        self.total += len(obs_NO)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, TeacherOutput]:
        """n states drawn uniformly with replacement, with their grades."""
        if self.size == 0:
            raise ValueError("sampling from an empty buffer; collect states first")
        index = torch.randint(self.size, (n,), generator=generator)
        return self.obs[index], take(self.labels, index)
