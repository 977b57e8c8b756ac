"""Per-step numbers that catch silent failures, logged next to the loss.

- `completion_stats`: how long the completions are, and the share cut at --sampling.max-new-tokens without ending
  (a student that learned the teacher's end-of-sequence token but stops at another one runs to the cap every time).
- `topk_agreement`: how many of the teacher's most likely tokens the student also ranks in its own top k, and how much
  probability the teacher's top k holds (verl #6469: a top-k teacher whose k tokens hold little mass teaches little).
  A few evenly spaced completion positions per micro-batch are enough to see a trend and cost next to nothing; no
  random numbers are drawn, so a run's samples stay as they were.
"""

from __future__ import annotations

import torch

from opd.lm.batch import Batch, TeacherSignal

TOP_K = 10
"""k of `topk_agreement` (a remote teacher that sends fewer log-probs: its k)."""
POSITIONS = 64
"""Completion positions per micro-batch that `topk_agreement` looks at."""


def completion_stats(batch: Batch, max_new_tokens: int, eos_id: int | None) -> dict:
    """`completion_len_mean` / `completion_len_max` (tokens, end-of-sequence included) and `cut_share`: the share of
    completions that reached `max_new_tokens` without ending in `eos_id`."""
    lengths_B = batch.mask_BT.sum(1)
    if lengths_B.numel() == 0:
        return {}
    targets_BT = batch.input_ids_BL[:, 1:]
    # index of each row's last completion target (rows are left-padded prompt, completion, right padding)
    positions_T = torch.arange(batch.mask_BT.shape[1], device=batch.mask_BT.device)
    last_B = (batch.mask_BT.bool() * positions_T).amax(1)
    ended_B = targets_BT.gather(1, last_B[:, None])[:, 0] == (-1 if eos_id is None else eos_id)
    cut_B = (lengths_B >= max_new_tokens) & ~ended_B
    return {"completion_len_mean": lengths_B.float().mean().item(), "completion_len_max": int(lengths_B.max()),
            "cut_share": cut_B.float().mean().item()}


@torch.no_grad()
def topk_agreement(hidden_ND: torch.Tensor, head, signal: TeacherSignal, mask_BT: torch.Tensor) -> dict:
    """`topk_overlap`: the mean share of the teacher's k most likely tokens that are among the student's k, and
    `teacher_topk_mass`: the mean probability the teacher's k hold (for a remote teacher, what it sent: 1 minus the
    tail bucket), at up to `POSITIONS` evenly spaced completion positions. Empty for a signal with no distribution."""
    n = hidden_ND.shape[0]
    if n == 0 or (signal.hidden_BTD is None and signal.topk_ids_BTK is None):
        return {}
    at_P = torch.linspace(0, n - 1, min(n, POSITIONS), device=hidden_ND.device).round().long().unique()
    if signal.hidden_BTD is not None:
        teacher_logp = signal.head(signal.hidden_BTD[mask_BT][at_P]).float().log_softmax(-1)
        top_logp_PK, top_ids_PK = teacher_logp.topk(min(TOP_K, teacher_logp.shape[-1]), dim=-1)
    else:
        top_ids_PK = signal.topk_ids_BTK[mask_BT][at_P]
        top_logp_PK = signal.topk_logp_BTK[mask_BT][at_P]
    mass = top_logp_PK.float().exp().sum(-1).mean().item()
    k = min(TOP_K, top_ids_PK.shape[-1])
    teacher_ids_PK = top_ids_PK[:, :k] if signal.hidden_BTD is not None else _most_likely(top_ids_PK, top_logp_PK, k)
    student_ids_PK = head(hidden_ND[at_P]).float().topk(k, dim=-1).indices
    shared_P = (student_ids_PK[:, :, None] == teacher_ids_PK[:, None, :]).any(-1).float().sum(-1)
    return {"topk_overlap": (shared_P / k).mean().item(), "teacher_topk_mass": mass}


def _most_likely(ids_PK: torch.Tensor, logp_PK: torch.Tensor, k: int) -> torch.Tensor:
    """The k most likely of a remote teacher's ids (servers send them in any order)."""
    return ids_PK.gather(1, logp_PK.topk(k, dim=-1).indices)
