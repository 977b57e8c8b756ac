"""Rollouts in this process: a local model (the student, or a local teacher) samples a batch with the KV-cache
decoder of `opd.lm.hf.decode`."""

from __future__ import annotations

import torch

from opd.lm.batch import Batch, layout
from opd.lm.hf.decode import sample_completions


@torch.no_grad()
def sample(
    model,
    prompt_ids: list[list[int]],
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    compile: bool = False,
) -> Batch:
    """Sample one completion per prompt from `model` (KV cache; each row stops at its eos and leaves the batch).

    temperature 0 means greedy. Completions end at their first eos (kept, so the model learns to stop);
    a completion cut by `max_new_tokens` has no eos. Same distribution as HF `generate(do_sample=True, top_k=0)`,
    faster: see `opd.lm.hf.decode` (also for `compile`).
    """
    completions = sample_completions(model, prompt_ids, pad_id, eos_id, max_new_tokens, temperature, top_p,
                                     compile=compile)
    # Not build_batch: a completion cut by max_new_tokens stays as sampled, without an eos it never produced.
    return layout(prompt_ids, completions, pad_id)
