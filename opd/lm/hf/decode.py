"""Sampling completions with a KV cache, where each row leaves the batch at its end-of-sequence token.

HF `generate` keeps every row in the batch until the last one stops (finished rows keep being computed, their output
replaced by padding) and runs a general machinery of processors and stopping criteria around every forward pass.
On-policy distillation needs far less: draw from softmax(logits / temperature), optionally nucleus-filtered, until
eos or `max_new_tokens`. `sample_completions` does exactly that: the scores of `generate` (HF's own temperature and
top-p warpers), then an exact draw from their softmax, so every completion has the same distribution as under
`generate(do_sample=True, top_k=0)`, and greedy decoding gives the same tokens. Finished rows are dropped from the
batch and its KV cache, so the remaining ones run on a smaller batch.

With `compile=True` each decoding step (forward pass, draw and log-prob) runs as one `torch.compile`d graph over a
static KV cache instead (`_sample_static`): fixed shapes, so finished rows stay in the batch (their draws are
discarded), and the cache is sized to the prompt plus `max_new_tokens`, rounded up to a multiple of
`STATIC_CACHE_MULTIPLE` so that batches of similar prompts reuse one compiled step. The first call at a new shape
compiles (10-20 s on a CPU, a few seconds once inductor's on-disk cache holds it); on a small model, where a step is
mostly per-token Python overhead, later calls are much faster (the arithmetic task's 0.1M-parameter student, 32
prompts, one thread: ~55 ms a batch against 100-190 ms). Same distribution; not the same draws for a seed as the
eager path (the batch does not shrink, and the draws come from the compiled graph's generator, seeded from torch's).

What is not applied: sampling settings stored in the model's `generation_config` (repetition penalty, min length,
suppressed tokens, ...). The on-policy losses assume the student samples from its own softmax, so those would be
wrong here anyway.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache, StaticCache, TemperatureLogitsWarper, TopPLogitsWarper

from opd.lm.hf.model import hf_model, lm_head, position_ids

_COMPACT_FRACTION = 0.25
"""Drop finished rows from the batch once they are this share of the rows still in it: each drop copies the KV
cache, so doing it for every single finished row would cost more than the rows it saves."""


STATIC_CACHE_MULTIPLE = 64
"""The compiled path's cache length is prompt + max_new_tokens rounded up to this: one compiled step (and no
recompilation) for all batches whose longest prompt falls in the same bucket."""


def left_pad(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one left-padded batch: (ids [B, P], attention mask [B, P]), P the longest."""
    B, P = len(prompt_ids), max(len(p) for p in prompt_ids)
    ids_BP = torch.full((B, P), pad_id, dtype=torch.long)
    attn_BP = torch.zeros((B, P), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids_BP[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        attn_BP[i, P - len(p) :] = 1
    return ids_BP, attn_BP


def check_sampling(prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token; got an empty batch or an empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def pick_tokens(logits_BV: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
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


def next_token_logits(model, cache, fast_head: bool = True):
    """(input ids, attention mask, positions) -> logits [B, V] of each row's last position, through `cache`.

    Where the model's logits are its plain linear head applied to its decoder's last hidden state (what
    `opd.lm.hf.model.lm_head` reports), the decoder runs alone and the head is applied as `_head_logits` does, several
    times faster on CPU at a large vocabulary; any other model (or `fast_head=False`, for the benchmark's "before")
    runs whole with `logits_to_keep=1`.
    """
    target, head, how = _decode_target(model, fast_head)

    def next_logits(ids_BL, attn_BL, pos_BL):
        return _forward_last(target, head, how, ids_BL, attn_BL, pos_BL, cache, None)

    return next_logits


def _decode_target(model, fast_head: bool):
    """(module to call, the head, how to call it: (name of its cache argument, whether the head is applied
    separately, whether it takes `logits_to_keep`))."""
    head, decoder = lm_head(model), getattr(model, "get_decoder", lambda: None)()
    fast = fast_head and (type(head) is torch.nn.Linear and not (head._forward_hooks or head._forward_pre_hooks)
            and decoder is not None and decoder is not model)
    target = decoder if fast else model
    # transformers 5 names the argument `cache`; older models and releases `past_key_values`
    params = inspect.signature(hf_model(target).forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return target, head, (cache_arg, fast, not fast and "logits_to_keep" in params)


def _forward_last(target, head, how: tuple[str, bool, bool], ids_BL, attn_BL, pos_BL, cache, cache_position):
    """Logits [B, V] at each row's last position. A plain function of its arguments (the cache among them), so that
    `torch.compile` of it is reused for every fresh cache of the same shape."""
    cache_arg, fast, keep_one = how
    extra = {cache_arg: cache, "use_cache": True}
    if cache_position is not None:
        extra["cache_position"] = cache_position
    if keep_one:
        extra["logits_to_keep"] = 1
    out = target(input_ids=ids_BL, attention_mask=attn_BL, position_ids=pos_BL, **extra)
    if not fast:
        return out.logits[:, -1]
    return _head_logits(out.last_hidden_state[:, -1], head.weight, head.bias)


def _next_token(target, head, how, ids_BL, attn_BL, pos_BL, cache, cache_position, temperature: float,
                top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: (the next token of each row drawn as `_pick` draws it, its log-prob as `_taken_logprobs`
    gives it). One function, so that `torch.compile` makes the forward pass and the draw a single graph."""
    logits_BV = _forward_last(target, head, how, ids_BL, attn_BL, pos_BL, cache, cache_position)
    token_B = pick_tokens(logits_BV, temperature, top_p)
    return token_B, _taken_logprobs(logits_BV, token_B)


@functools.cache
def _compiled_next_token():
    return torch.compile(_next_token, dynamic=False)


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
    compile: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """One completion per prompt from `model` (a Hugging Face causal LM), each ending at its first eos (kept).

    temperature 0 means greedy. A completion cut by `max_new_tokens` has no eos. Draws come from torch's global RNG
    (seed it for reproducible samples). The model is run in eval mode and put back in the mode it was in.
    With `with_logprobs`, also each sampled token's log-prob under the model's own distribution, log_softmax(logits)
    before temperature and top-p (vLLM's default `raw_logprobs`): what importance ratios against the trained student
    compare with. `compile`: decode through a `torch.compile`d step over a static KV cache (see the module's doc);
    the model must support `transformers.StaticCache`.
    """
    check_sampling(prompt_ids, max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    ids_BP, attn_BP = (t.to(device) for t in left_pad(prompt_ids, pad_id))
    was_training = model.training
    model.eval()
    try:
        run = _sample_static if compile else _sample_dynamic
        completions, logprobs = run(model, ids_BP, attn_BP, eos_id, max_new_tokens, temperature, top_p, with_logprobs)
    finally:
        model.train(was_training)
    return (completions, logprobs) if with_logprobs else completions


def _taken_logprobs(logits_BV: torch.Tensor, token_B: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits) at the drawn tokens, in float32."""
    logits_BV = logits_BV.float()
    return logits_BV.gather(1, token_B[:, None]).squeeze(1) - logits_BV.logsumexp(-1)


def _sample_dynamic(model, ids_BP, attn_BL, eos_id, max_new_tokens, temperature, top_p, with_logprobs):
    """Eager decoding over a `DynamicCache`; finished rows leave the batch (and the cache) as they accumulate."""
    device, B = ids_BP.device, ids_BP.shape[0]
    pos_BL = position_ids(attn_BL)
    cache = DynamicCache(config=model.config)
    next_logits = next_token_logits(model, cache)
    logits_BV = next_logits(ids_BP, attn_BL, pos_BL)
    completions: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    rows = list(range(B))  # which prompt each row of the (shrinking) batch belongs to
    done_B = torch.zeros(B, dtype=torch.bool)  # rows that have finished but are still in the batch
    next_pos_B1 = pos_BL[:, -1:] + 1
    for step in range(max_new_tokens):
        token_B = pick_tokens(logits_BV, temperature, top_p)
        if with_logprobs:
            taken = _taken_logprobs(logits_BV, token_B).tolist()
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
    return completions, logprobs


def _sample_static(model, ids_BP, attn_BP, eos_id, max_new_tokens, temperature, top_p, with_logprobs):
    """Decoding through a compiled step over a `StaticCache`: every row stays in the batch until all have finished.

    The prompt (whose length varies from batch to batch) is run eagerly into the cache; only the one-token steps,
    whose shapes are fixed by (batch, cache length), go through `torch.compile`.
    """
    device, (B, P) = ids_BP.device, ids_BP.shape
    L = -(-(P + max_new_tokens) // STATIC_CACHE_MULTIPLE) * STATIC_CACHE_MULTIPLE
    try:
        cache = StaticCache(config=model.config, max_cache_len=L)
    except Exception as e:  # noqa: BLE001  (the model's own reason, in one line)
        raise ValueError(f"compiled sampling needs a model that supports transformers' StaticCache; "
                         f"{type(model).__name__} does not ({type(e).__name__}: {e}); sample without compile") from e
    target, head, how = _decode_target(model, fast_head=True)
    step_fn = _compiled_next_token()
    attn_BL = torch.zeros((B, L), dtype=attn_BP.dtype, device=device)
    attn_BL[:, :P] = attn_BP
    pos_BP = position_ids(attn_BP)
    token_B, taken_B = _next_token(target, head, how, ids_BP, attn_BP, pos_BP, cache, torch.arange(P, device=device),
                                   temperature, top_p)
    tokens_BS = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    taken_BS = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    next_pos_B1 = pos_BP[:, -1:] + 1
    steps = 0
    for step in range(max_new_tokens):
        tokens_BS[:, step], taken_BS[:, step] = token_B, taken_B
        steps = step + 1
        if eos_id is not None:
            done_B |= token_B == eos_id
        if bool(done_B.all()) or steps == max_new_tokens:
            break
        attn_BL[:, P + step] = 1
        token_B, taken_B = step_fn(target, head, how, token_B[:, None], attn_BL, next_pos_B1, cache,
                                   torch.tensor([P + step], device=device), temperature, top_p)
        next_pos_B1 = next_pos_B1 + 1
    # each row ends at its first eos (kept); the draws after it were made for a finished row and are dropped
    tokens_BS, taken_BS = tokens_BS[:, :steps].cpu(), taken_BS[:, :steps].cpu()
    lengths = [steps] * B
    if eos_id is not None:
        is_eos_BS = tokens_BS == eos_id
        first_B = is_eos_BS.int().argmax(1)
        lengths = [int(f) + 1 if any_eos else steps for f, any_eos in zip(first_B, is_eos_BS.any(1).tolist())]
    completions = [row[:n] for row, n in zip(tokens_BS.tolist(), lengths)]
    logprobs = [row[:n] for row, n in zip(taken_BS.tolist(), lengths)] if with_logprobs else [[] for _ in range(B)]
    return completions, logprobs
