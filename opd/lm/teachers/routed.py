"""Several teachers routed by a data column (`--teachers math=DIR,code=URL --teacher-column domain`), and the
student's own starting weights as a teacher (`--teacher self`).

Routing. `PromptSet.routes` names each prompt's teacher (the value of its `--teacher-column`, checked against the
names by `check_routes` before any model loads). Each batch row keeps its prompt's route, also across
`samples_per_prompt` and micro-batches, and `Teachers.score` asks each teacher for its own rows only: the result is
a `RoutedSignal`, one `TeacherSignal` part per teacher that has rows in the batch, never stitched into one tensor.
Why parts: two local teachers give hidden states of their own widths for their own heads, and a remote teacher gives
top-k log-probs instead; no single [B, T, ...] field holds them all. The loss takes the parts one by one on the
student's hidden states of those rows (`opd.lm.train.teacher_divergence`), so local and remote teachers mix freely:
each row gets the full-vocabulary divergence from a local teacher or the top-k + tail one from a remote teacher, as
it would with that teacher alone. Only the per-row taken-token log-probs (loss=sampled) are stitched, since every
kind gives them in the same [B, T] layout. Per teacher, the loop logs `completion_tokens/teacher=NAME` and
`loss/teacher=NAME` (the mean loss over that teacher's tokens); `loss` stays the mean over all tokens.
source=teacher samples each row from its own teacher (`RoutedActor`). The logged FLOPs leave the teachers' passes
out (`opd.flops` sizes one teacher model; here each row's cost depends on its teacher).

Self. `--teacher self` makes the weights the run starts from the frozen teacher, without a second load from disk
(`self_teacher`): a full student is deep-copied before its first update; a LoRA student needs no copy at all, as its
base weights never change: the teacher is the same model with its adapters switched off (peft's `disable_adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from opd.lm.batch import Batch, TeacherSignal, realigned, teacher_view
from opd.lm.data.prompts import PromptSet
from opd.lm.teachers.base import Teacher
from opd.lm.teachers.local import score_batch

TOKENS, LOSS, _LOSS_SUM = "completion_tokens/teacher=", "loss/teacher=", "loss_sum/teacher="


SUMMED = (TOKENS, _LOSS_SUM)
"""Per-teacher metric keys that micro-batches add up (`opd.lm.train.accumulate`); `per_teacher_means` then turns
the loss sums into means."""


def check_routes(prompts: PromptSet, column: str, names: Sequence[str], what: str) -> list[str]:
    """Each prompt's teacher name, from its `column`; one line naming the problem if a row has none or names a
    teacher that `names` lacks."""
    if column not in prompts.rows[0]:
        raise ValueError(f"{what} has no column {column!r} (--teacher-column); its columns: "
                         f"{', '.join(prompts.rows[0])}; add one naming each row's teacher")
    routes = []
    for i, row in enumerate(prompts.rows):
        value = row.get(column)
        if value is None or str(value) not in names:
            raise ValueError(f"{what} row {i}: {column}={value!r} names no teacher; --teachers names "
                             f"{', '.join(names)} (every row needs one of them)")
        routes.append(str(value))
    return routes


def batch_routes(prompts: PromptSet, rows: Sequence[int]) -> list[str] | None:
    """The teacher name of each batch row (prompt indices `rows`), or None when the prompts are not routed."""
    return None if prompts.routes is None else [prompts.routes[i] for i in rows]


@dataclass
class Part:
    """One teacher's share of a batch."""

    name: str
    rows_R: torch.Tensor
    """Batch rows (ascending) that this teacher grades."""
    signal: TeacherSignal | None
    """Its grade of those rows only ([R, T, ...]); None when nothing is scored (loss=sft)."""


@dataclass
class RoutedSignal:
    """A batch graded by several teachers, part by part (see the module docstring for why it is not one signal)."""

    parts: list[Part]
    num_rows: int
    """B, the rows of the whole batch."""

    @property
    def taken_logp_BT(self) -> torch.Tensor | None:
        """The taken tokens' log-probs of every row from its own teacher, [B, T]; None if a part has none."""
        signals = [p.signal for p in self.parts]
        if not signals or any(s is None or s.taken_logp_BT is None for s in signals):
            return None
        first = signals[0].taken_logp_BT
        out = first.new_zeros((self.num_rows, first.shape[1]))
        for p in self.parts:
            out[p.rows_R.to(out.device)] = p.signal.taken_logp_BT
        return out

    def per_token(self, part_loss: Callable[[TeacherSignal, torch.Tensor, torch.Tensor], torch.Tensor],
                  mask_BT: torch.Tensor) -> torch.Tensor:
        """Per completion token [N] (row by row, as `mask_BT` orders them): `part_loss(signal, part_mask_RT,
        select_N)` for each part, where `select_N` picks that part's tokens out of the N. Differentiable."""
        row_N = mask_BT.bool().nonzero()[:, 0]
        values, order = [], []
        for p in self.parts:
            select_N = torch.isin(row_N, p.rows_R.to(row_N.device))
            if select_N.any():
                values.append(part_loss(p.signal, mask_BT[p.rows_R.to(mask_BT.device)], select_N))
                order.append(select_N.nonzero()[:, 0])
        if not values:
            return mask_BT.new_zeros(0, dtype=torch.float32)
        return torch.cat(values)[torch.argsort(torch.cat(order))]

    def metrics(self, per_token_N: torch.Tensor, mask_BT: torch.Tensor) -> dict:
        """Each teacher's completion tokens and the sum of the loss over them (`per_teacher_means` makes it a mean)."""
        row_N = mask_BT.bool().nonzero()[:, 0]
        out = {}
        for p in self.parts:
            select_N = torch.isin(row_N, p.rows_R.to(row_N.device))
            out[TOKENS + p.name] = int(select_N.sum())
            out[_LOSS_SUM + p.name] = per_token_N[select_N].sum().item()
        return out


def split_rows(routes: Sequence[str], names: Sequence[str] | None = None) -> list[tuple[str, torch.Tensor]]:
    """(name, its batch rows ascending) for each name with rows, in the order of `names` (default: first seen)."""
    names = dict.fromkeys(routes) if names is None else names
    rows = {name: [b for b, r in enumerate(routes) if r == name] for name in names}
    return [(name, torch.tensor(r, dtype=torch.long)) for name, r in rows.items() if r]


def per_teacher_means(metrics: dict) -> dict:
    """`metrics` with each teacher's loss sum replaced by `loss/teacher=NAME`, the mean over its tokens."""
    out = {k: v for k, v in metrics.items() if not k.startswith(_LOSS_SUM)}
    for key, total in metrics.items():
        if key.startswith(_LOSS_SUM):
            name = key[len(_LOSS_SUM):]
            out[LOSS + name] = total / max(1, metrics[TOKENS + name])
    return out


class Teachers:
    """Several teachers behind one `score`, each grading the batch rows routed to it; order is kept.

    Every teacher is built as a single one would be (`opd.lm.loop.build.make_teacher`, vocabulary checked), and may be
    of any kind: local, remote, or the student's own start (`self`).
    """

    def __init__(self, teachers: dict[str, Teacher]):
        if not teachers:
            raise ValueError("Teachers needs at least one teacher")
        self.teachers = teachers

    def score(self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, mask_BT: torch.Tensor,
              routes: Sequence[str]) -> RoutedSignal:
        """Grade row b with the teacher `routes[b]` names: each teacher scores its own rows in one call."""
        if len(routes) != input_ids_BL.shape[0]:
            raise ValueError(f"{len(routes)} routes for a batch of {input_ids_BL.shape[0]} rows")
        unknown = sorted(set(routes) - set(self.teachers))
        if unknown:
            raise ValueError(f"route {unknown[0]!r} names no teacher; the teachers are {', '.join(self.teachers)}")
        parts = []
        for name, rows_R in split_rows(routes, self.teachers):
            signal = self.teachers[name].score(input_ids_BL[rows_R], attention_mask_BL[rows_R], mask_BT[rows_R])
            parts.append(Part(name, rows_R, signal))
        return RoutedSignal(parts, len(routes))

    def close(self) -> None:
        """Close every teacher that holds connections."""
        for teacher in self.teachers.values():
            if hasattr(teacher, "close"):
                teacher.close()


def grade(teacher, batch: Batch, routes: Sequence[str] | None, score: bool) -> TeacherSignal | RoutedSignal | None:
    """What the loss reads for `batch`: the teacher's signal (`score_batch`), split by teacher when `routes` are
    given; without `score` (loss=sft) no teacher runs, and routed rows still get per-teacher metrics. A batch with
    teacher prompts (privileged context) is graded as the teacher sees it, then moved to the batch's own targets."""
    if batch.teacher_prompt_ids is not None and score and teacher is not None:
        view = teacher_view(batch)
        signal = grade(teacher, view, routes, score)
        if isinstance(signal, RoutedSignal):
            rows = [p.rows_R.to(batch.mask_BT.device) for p in signal.parts]
            return RoutedSignal([Part(p.name, p.rows_R, realigned(p.signal, view.mask_BT[r], batch.mask_BT[r]))
                                 for p, r in zip(signal.parts, rows)], signal.num_rows)
        return realigned(signal, view.mask_BT, batch.mask_BT)
    if routes is None:
        return score_batch(teacher, batch) if score else None
    if teacher is None or not score:
        return RoutedSignal([Part(name, rows_R, None) for name, rows_R in split_rows(routes)], len(routes))
    return teacher.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT, routes)
