"""What a step passes along: the batch of prompt + completion token ids, and the teacher's grade of it.

A `Batch` holds left-padded prompts followed by completions (then right padding), in the layout HF `generate`
produces. Losses live in *target coordinates*: position t of a [B, T] tensor (T = L - 1) scores token t+1 given the
tokens up to t, so `targets_BT = input_ids_BL[:, 1:]` and `mask_BT` marks the targets that are completion tokens
(the end-of-sequence token included: the student must learn when to stop). A `TeacherSignal` is what a teacher
gives for every target position of a batch, in the same coordinates (`opd.lm.teachers`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

from opd.tasks.prompts import text_token_ids


@dataclass
class Batch:
    """Prompts + completions for one training step."""

    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    mask_BT: torch.Tensor
    """1 where the target token is part of a completion (incl. its eos), 0 on prompt and padding."""
    prompt_lens: list[int]
    """Unpadded prompt length of each row."""
    sampling_logp_BT: torch.Tensor | None = None
    """Log-prob of each target under the policy that sampled it, when that is not the current student
    (server-side rollouts); None means 'the student, at the weights being trained' (importance ratio 1)."""
    teacher_prefix: TeacherSignal | None = None
    """The teacher's signal for the first rows, graded where the batch was sampled (the `--overlap` sampler process);
    `opd.lm.teachers.local.score_batch` scores only the rest."""
    sampled_by: int | None = None
    """The sampler's weights version that sampled the batch (a sampler server or process), for the metrics."""
    teacher_prompt_ids: list[list[int]] | None = None
    """Each row's teacher prompt, when the teacher sees another prompt than the student (privileged context: a
    reference answer, a demonstration); the teacher then grades teacher prompt + the same completion
    (`teacher_view`, `realigned`)."""
    rollout_metrics: dict | None = None
    """What the actor measured while making the batch, logged with the step (multi-turn tool use: turns, tool calls,
    malformed calls; `opd.lm.rollouts.tools`)."""

    def to(self, device) -> "Batch":
        """The same batch with its tensors on `device`."""
        return self._apply(lambda t: t.to(device))

    def select(self, start: int, stop: int) -> "Batch":
        """Rows start..stop-1 as a batch of their own (a micro-batch), the teacher's prefix cut to match."""
        prefix = self.teacher_prefix
        if prefix is not None:
            k = prefix.rows()
            prefix = None if start >= k else replace(
                prefix, **{name: t[start:min(stop, k)] for name, t in prefix.tensors().items()})
        rows = replace(self, teacher_prefix=None, prompt_lens=self.prompt_lens[start:stop])._apply(lambda t: t[start:stop])
        rows.teacher_prefix = prefix
        if self.teacher_prompt_ids is not None:
            rows.teacher_prompt_ids = self.teacher_prompt_ids[start:stop]
        return rows

    def trim(self) -> "Batch":
        """The same rows without the columns that are padding in every row (a micro-batch of short rows cut from a
        batch laid out for its longest one). Positions come from the attention mask (`opd.lm.hf.model.position_ids`),
        so every real token keeps its position and the result is the same up to float rounding."""
        real = self.attention_mask_BL.bool().any(0).nonzero()
        if real.numel() == 0:
            return self
        a, b = int(real[0]), int(real[-1]) + 1  # tokens a..b-1 are real in some row
        tokens, targets = slice(a, b), slice(a, b - 1)  # target t scores token t + 1
        prefix = self.teacher_prefix
        if prefix is not None:
            prefix = replace(prefix, **{name: t[:, targets] for name, t in prefix.tensors().items()})
        sampling = None if self.sampling_logp_BT is None else self.sampling_logp_BT[:, targets]
        return replace(self, input_ids_BL=self.input_ids_BL[:, tokens],
                       attention_mask_BL=self.attention_mask_BL[:, tokens], mask_BT=self.mask_BT[:, targets],
                       sampling_logp_BT=sampling, teacher_prefix=prefix)

    def _apply(self, fn) -> "Batch":
        move = lambda t: None if t is None else fn(t)  # noqa: E731
        prefix = self.teacher_prefix
        if prefix is not None:
            prefix = replace(prefix, **{name: fn(t) for name, t in prefix.tensors().items()})
        return replace(self, input_ids_BL=move(self.input_ids_BL), attention_mask_BL=move(self.attention_mask_BL),
                       mask_BT=move(self.mask_BT), sampling_logp_BT=move(self.sampling_logp_BT), teacher_prefix=prefix)

    @property
    def targets_BT(self) -> torch.Tensor:
        return self.input_ids_BL[:, 1:]

    def completion_ids(self) -> list[list[int]]:
        """Each row's completion tokens, eos included when it was generated."""
        rows = []
        for ids, m in zip(self.input_ids_BL[:, 1:], self.mask_BT):
            rows.append(ids[m.bool()].tolist())
        return rows


def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int) -> list[list[int]]:
    """Token ids of each prompt, through the chat template when the tokenizer has one.

    Raises ValueError naming the first prompt that does not fit, instead of silently truncating it.
    """
    if not prompts:
        raise ValueError("no prompts to encode: the dataset is empty; pass a task or a file with at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        ids = text_token_ids(tokenizer, p)
        if len(ids) > max_prompt_len:
            raise ValueError(
                f"prompt {i} is {len(ids)} tokens but the model's context leaves room for {max_prompt_len} "
                f"(context minus max_new_tokens); shorten the prompt or lower max_new_tokens"
            )
        out.append(ids)
    return out


def build_batch(
    prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, eos_id: int | None
) -> Batch:
    """Lay out left-padded prompts followed by completions, appending eos to completions that lack it.

    For completions that come from elsewhere (a dataset, the teacher, a server); `sample` builds the same layout.
    """
    if eos_id is not None:
        completion_ids = [c if (c and c[-1] == eos_id) else list(c) + [eos_id] for c in completion_ids]
    return layout(prompt_ids, completion_ids, pad_id)


def layout(
    prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int,
    sampling_logps: list[list[float]] | None = None, own: list[list[bool]] | None = None,
) -> Batch:
    """Left-padded prompts, then each completion exactly as given, then right padding.

    `sampling_logps`: the sampler's log-prob of each completion token (a sampler server or process), kept as the
    batch's `sampling_logp_BT`. `own`: which completion tokens the model wrote, per row (a multi-turn conversation,
    where tool answers between its turns are context, not targets: `opd.lm.rollouts.tools`); only those are marked in
    `mask_BT`, and `sampling_logps` then holds theirs alone. None: all of them.
    """
    P = max(len(p) for p in prompt_ids)
    C = max(1, max(len(c) for c in completions))
    B = len(prompt_ids)
    ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + C), dtype=torch.long)
    comp = torch.zeros((B, P + C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        ids[i, P - len(p) : P] = torch.tensor(p)
        if c:
            ids[i, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[i, P - len(p) : P + len(c)] = 1
        comp[i, P : P + len(c)] = 1 if own is None else torch.tensor(own[i], dtype=torch.long)
    batch = Batch(ids, attn, comp[:, 1:], [len(p) for p in prompt_ids])
    if sampling_logps is not None:
        flat = torch.tensor([v for row in sampling_logps for v in row], dtype=torch.float32)
        batch.sampling_logp_BT = scatter_targets(flat, batch.mask_BT)
    return batch


def scatter_targets(values_N: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Values of the masked targets, in order (row by row), placed in target coordinates: [B, T], 0 elsewhere.

    Completion token j of a row is target `prompt_end - 1 + j`; `layout` marks exactly those targets, in order, so
    per-completion-token values fill the mask row by row. Differentiable in `values_N`.
    """
    mask = mask_BT.bool()
    if values_N.numel() != int(mask.sum()):
        raise RuntimeError(f"{values_N.numel()} values for {int(mask.sum())} completion targets")
    return values_N.new_zeros(mask.shape).masked_scatter(mask, values_N)


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


def teacher_view(batch: Batch) -> Batch:
    """The batch as a teacher with its own prompts sees it: each row's `teacher_prompt_ids` followed by the row's
    completion tokens, in the same layout (left-padded prompts, completions, right padding)."""
    completions = batch.completion_ids()
    pad = int(batch.input_ids_BL[0, 0])  # any id will do: padding is masked out of attention and of every loss
    return layout(batch.teacher_prompt_ids, completions, pad).to(batch.input_ids_BL.device)


def realigned(signal: TeacherSignal, from_mask_BT: torch.Tensor, to_mask_BT: torch.Tensor) -> TeacherSignal:
    """A signal graded in one layout (`from_mask_BT`: the teacher's view) moved to the targets of another
    (`to_mask_BT`: the student's batch) that holds the same completion tokens in the same order, row by row."""
    src, dst = from_mask_BT.bool(), to_mask_BT.bool()
    if int(src.sum()) != int(dst.sum()):
        raise ValueError(f"the teacher's view holds {int(src.sum())} completion tokens, the batch {int(dst.sum())}")
    moved = {}
    for name, t in signal.tensors().items():
        out = t.new_zeros((dst.shape[0], dst.shape[1], *t.shape[2:]))
        out[dst] = t[src]
        moved[name] = out
    return replace(signal, **moved)
