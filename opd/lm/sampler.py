"""Sampling completions with a KV cache, where each row leaves the batch at its end-of-sequence token.

HF `generate` keeps every row in the batch until the last one stops (finished rows keep being computed, their output
replaced by padding) and runs a general machinery of processors and stopping criteria around every forward pass.
On-policy distillation needs far less: draw from softmax(logits / temperature), optionally nucleus-filtered, until
eos or `max_new_tokens`. `sample_completions` does exactly that: the scores of `generate` (HF's own temperature and
top-p warpers), then an exact draw from their softmax, so every completion has the same distribution as under
`generate(do_sample=True, top_k=0)`, and greedy decoding gives the same tokens. Finished rows are dropped from the
batch and its KV cache, so the remaining ones run on a smaller batch.

What is not applied: sampling settings stored in the model's `generation_config` (repetition penalty, min length,
suppressed tokens, ...). The on-policy losses assume the student samples from its own softmax, so those would be
wrong here anyway.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, TemperatureLogitsWarper, TopPLogitsWarper

from opd.lm.model import lm_head, position_ids

_COMPACT_FRACTION = 0.25
"""Drop finished rows from the batch once they are this share of the rows still in it: each drop copies the KV
cache, so doing it for every single finished row would cost more than the rows it saves."""


def _check(prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token; got an empty batch or an empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _pick(logits_BV: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The next token of each row, drawn from softmax(logits / temperature), nucleus-filtered when top_p < 1.

    Scores and filtering are `generate`'s own (HF's warpers, in float32). The draw is by inverse CDF: one uniform per
    row against the cumulative probabilities (in float64, so rounding moves no probability that matters), which is
    the same categorical distribution as `torch.multinomial` at a fraction of its cost at large vocabularies (it
    draws one exponential variate per vocabulary entry).
    """
    scores_BV = logits_BV.to(dtype=torch.float32, copy=True)
    if temperature == 0:
        return scores_BV.argmax(-1)
    if temperature != 1.0:
        scores_BV = TemperatureLogitsWarper(temperature)(None, scores_BV)
    if top_p < 1.0:
        scores_BV = TopPLogitsWarper(top_p=top_p)(None, scores_BV)
    cdf_BV = scores_BV.softmax(-1).to(torch.float64).cumsum(-1)
    u_B1 = torch.rand((cdf_BV.shape[0], 1), dtype=torch.float64, device=cdf_BV.device) * cdf_BV[:, -1:]
    # first index whose cumulative probability exceeds u: a token of probability 0 is never drawn
    return torch.searchsorted(cdf_BV, u_B1, right=True).squeeze(1).clamp_(max=cdf_BV.shape[1] - 1)


def next_token_logits(model, cache: DynamicCache, fast_head: bool = True):
    """(input ids, attention mask, positions) -> logits [B, V] of each row's last position, through `cache`.

    Where the model's logits are its plain linear head applied to its decoder's last hidden state (what
    `opd.lm.model.lm_head` reports), the decoder runs alone and the head is applied as `_head_logits` does, several
    times faster on CPU at a large vocabulary; any other model (or `fast_head=False`, for the benchmark's "before")
    runs whole with `logits_to_keep=1`.
    """
    head, decoder = lm_head(model), getattr(model, "get_decoder", lambda: None)()
    fast = fast_head and (type(head) is torch.nn.Linear and not (head._forward_hooks or head._forward_pre_hooks)
            and decoder is not None and decoder is not model)
    target = decoder if fast else model
    params = inspect.signature(target.forward).parameters
    # transformers 5 names the argument `cache`; older models and releases `past_key_values`
    extra = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if not fast and "logits_to_keep" in params:
        extra["logits_to_keep"] = 1

    def next_logits(ids_BL, attn_BL, pos_BL):
        out = target(input_ids=ids_BL, attention_mask=attn_BL, position_ids=pos_BL, **extra)
        if not fast:
            return out.logits[:, -1]
        return _head_logits(out.last_hidden_state[:, -1], head.weight, head.bias)

    return next_logits


def _head_logits(hidden_BD: torch.Tensor, weight_VD: torch.Tensor, bias_V: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(hidden, weight, bias)`, computed as `weight @ hidden.T` and transposed back (contiguous [B, V]).

    The same product, but CPU BLAS (MKL) is far faster this way round for a few rows against a vocabulary of
    outputs: 2.1 against 9.9 ms for 4 rows at V = 49,152, D = 256, two threads (1.6-4x at the shapes we measured;
    no gain for a single row). Float rounding may differ from `F.linear` in the last bits.
    """
    logits_BV = (weight_VD @ hidden_BD.T).T.contiguous()
    return logits_BV if bias_V is None else logits_BV.add_(bias_V)


@torch.no_grad()
def sample_completions(
    model,
    prompt_ids: list[list[int]],
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    with_logprobs: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """One completion per prompt from `model` (a Hugging Face causal LM), each ending at its first eos (kept).

    temperature 0 means greedy. A completion cut by `max_new_tokens` has no eos. Draws come from torch's global RNG
    (seed it for reproducible samples). The model is run in eval mode and put back in the mode it was in.
    With `with_logprobs`, also each sampled token's log-prob under the model's own distribution, log_softmax(logits)
    before temperature and top-p (vLLM's default `raw_logprobs`): what importance ratios against the trained student
    compare with.
    """
    _check(prompt_ids, max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    B, P = len(prompt_ids), max(len(p) for p in prompt_ids)
    ids_BP = torch.full((B, P), pad_id, dtype=torch.long)
    attn_BL = torch.zeros((B, P), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids_BP[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        attn_BL[i, P - len(p) :] = 1
    ids_BP, attn_BL = ids_BP.to(device), attn_BL.to(device)
    pos_BL = position_ids(attn_BL)

    cache = DynamicCache(config=model.config)
    next_logits = next_token_logits(model, cache)
    was_training = model.training
    model.eval()
    try:
        logits_BV = next_logits(ids_BP, attn_BL, pos_BL)
        completions: list[list[int]] = [[] for _ in range(B)]
        logprobs: list[list[float]] = [[] for _ in range(B)]
        rows = list(range(B))  # which prompt each row of the (shrinking) batch belongs to
        done_B = torch.zeros(B, dtype=torch.bool)  # rows that have finished but are still in the batch
        next_pos_B1 = pos_BL[:, -1:] + 1
        for step in range(max_new_tokens):
            token_B = _pick(logits_BV, temperature, top_p)
            if with_logprobs:
                logits_BV = logits_BV.float()
                taken = (logits_BV.gather(1, token_B[:, None]).squeeze(1) - logits_BV.logsumexp(-1)).tolist()
            for i, (row, tok, done) in enumerate(zip(rows, token_B.tolist(), done_B.tolist())):
                if not done:
                    completions[row].append(tok)
                    if with_logprobs:
                        logprobs[row].append(taken[i])
            if eos_id is not None:
                done_B |= (token_B == eos_id).cpu()
            if bool(done_B.all()) or step + 1 == max_new_tokens:
                break
            n_done = int(done_B.sum())
            if n_done and n_done >= _COMPACT_FRACTION * len(rows):
                keep = (~done_B).nonzero().squeeze(1)
                rows = [rows[k] for k in keep.tolist()]
                keep = keep.to(device)
                cache.batch_select_indices(keep)
                token_B, attn_BL, next_pos_B1 = token_B[keep], attn_BL[keep], next_pos_B1[keep]
                done_B = torch.zeros(len(rows), dtype=torch.bool)
            attn_BL = torch.cat([attn_BL, attn_BL.new_ones((attn_BL.shape[0], 1))], dim=1)
            logits_BV = next_logits(token_B[:, None], attn_BL, next_pos_B1)
            next_pos_B1 = next_pos_B1 + 1
    finally:
        model.train(was_training)
    return (completions, logprobs) if with_logprobs else completions
