"""Request and response shapes of `opd serve`'s `/v1/completions`: the part of vLLM's OpenAI-compatible API opd uses.

Request fields follow vLLM's `CompletionRequest` (unknown fields are ignored, as vLLM does). A response choice is
`{index, text, logprobs, finish_reason, stop_reason, prompt_logprobs, prompt_token_ids, token_ids}` where `logprobs` is
the OpenAI legacy `{tokens, token_logprobs, top_logprobs, text_offset}` and `prompt_logprobs` is vLLM's list with a
null first entry and then, per prompt token, `{"<token id>": {"logprob", "rank", "decoded_token"}}` holding the
top-k plus the prompt token itself (so k or k+1 entries). Log-probs are clamped at -9999.0 like vLLM (JSON has no -inf).
"""

from __future__ import annotations

import secrets
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from opd.lm.serve_engine import Row

_INT64 = 2**63
_MIN_LOGPROB = -9999.0


class ServerLimits(Protocol):
    """The server settings a request is checked against; `opd.lm.serve.ServeArgs` has them (this module does not
    import it: serve.py imports this one)."""

    # Read-only properties, so that a frozen dataclass satisfies the protocol.
    @property
    def max_tokens(self) -> int: ...
    @property
    def max_prompt_len(self) -> int | None: ...
    @property
    def max_logprobs(self) -> int: ...
    @property
    def max_seqs_per_request(self) -> int: ...


class BadRequest(ValueError):
    """A request the server refuses; answered with HTTP 400 and this message."""


class CompletionRequest(BaseModel):
    """Body of `POST /v1/completions`."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: list[StrictStr | list[StrictInt]]
    max_tokens: int | None = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    stream: bool = False
    prompt_logprobs: int | None = Field(None, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[StrictInt] | None = None
    add_special_tokens: bool = True
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_of_four_shapes(cls, value: Any) -> list:
        """Accept str | list[str] | list[int] | list[list[int]] and return a list of prompts."""
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not value:
            raise ValueError("prompt must be a non-empty string, list of strings, or (list of) list of token ids")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return [value]
        if all(isinstance(x, str) for x in value) or all(isinstance(x, list) for x in value):
            return value
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of such lists")


def _derived_seeds(seed: int | None, count: int) -> list[int]:
    # One independent seed per choice, so equal prompts in one request still get different samples.
    base = secrets.randbits(62) if seed is None else seed % 2**64
    return torch.randint(0, 2**62, (count,), generator=torch.Generator().manual_seed(base)).tolist()


def rows_for_request(
    req: CompletionRequest, tokenizer: Any, vocab_size: int, max_model_len: int, limits: ServerLimits
) -> tuple[list[list[int]], list[str | None], list[Row]]:
    """Check a request against the model and the server's limits; return (prompt ids, prompt texts, rows).

    Rows are prompt-major: row `i * n + j` is choice j of prompt i. Only choice 0 of a prompt scores the prompt;
    the others share its scores.
    """
    if req.stream:
        raise BadRequest("stream=true is not supported by opd serve; send stream=false")
    if req.n * len(req.prompt) > limits.max_seqs_per_request:
        raise BadRequest(
            f"{len(req.prompt)} prompts x n={req.n} is over this server's {limits.max_seqs_per_request} sequences per "
            "request; split the request"
        )
    for name, k in (("logprobs", req.logprobs), ("prompt_logprobs", req.prompt_logprobs)):
        if k is not None and k > limits.max_logprobs:
            raise BadRequest(f"{name}={k} is over this server's limit of {limits.max_logprobs} (--max-logprobs)")
    if req.max_tokens is not None and req.max_tokens > limits.max_tokens:
        raise BadRequest(f"max_tokens={req.max_tokens} is over this server's limit of {limits.max_tokens}")
    max_prompt_len = min(limits.max_prompt_len or max_model_len, max_model_len)
    prompts, texts, budgets = [], [], []
    for i, p in enumerate(req.prompt):
        if isinstance(p, str) and not p.isascii():
            try:  # JSON can carry lone surrogates ("\ud800"), which no tokenizer can encode
                p.encode("utf-8")
            except UnicodeEncodeError as e:
                raise BadRequest(
                    f"prompt {i} is not valid Unicode text ({e.reason} at character {e.start}); send UTF-8 text"
                ) from None
        ids = tokenizer(p, add_special_tokens=req.add_special_tokens)["input_ids"] if isinstance(p, str) else p
        if not ids:
            raise BadRequest(f"prompt {i} is empty (no tokens); send at least one token")
        if bad := [t for t in ids if not 0 <= t < vocab_size]:
            raise BadRequest(f"prompt {i} has token id {bad[0]} outside the model's vocabulary [0, {vocab_size})")
        if len(ids) > max_prompt_len:
            raise BadRequest(f"prompt {i} has {len(ids)} tokens, over the limit of {max_prompt_len}; shorten it")
        max_tokens = req.max_tokens if req.max_tokens is not None else min(limits.max_tokens, max_model_len - len(ids))
        if len(ids) + max_tokens > max_model_len:
            raise BadRequest(
                f"prompt {i} has {len(ids)} tokens and max_tokens={max_tokens}: over the model's context of "
                f"{max_model_len} tokens; shorten the prompt or lower max_tokens"
            )
        prompts.append(ids)
        texts.append(p if isinstance(p, str) else None)
        budgets.append(max_tokens)
    stop_ids = frozenset(req.stop_token_ids or ())
    if not req.ignore_eos and tokenizer.eos_token_id is not None:
        stop_ids |= {tokenizer.eos_token_id}
    wants_prompt = req.prompt_logprobs is not None or (req.echo and req.logprobs is not None)
    prompt_topk = max(req.prompt_logprobs or 0, req.logprobs or 0) if wants_prompt else None
    seeds = iter(_derived_seeds(req.seed, len(prompts) * req.n))
    rows = [
        Row(
            prompt_ids=ids, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=next(seeds),
            logprobs=req.logprobs,
            prompt_topk=prompt_topk if j == 0 else None, stop_ids=stop_ids,
        )
        for ids, max_tokens in zip(prompts, budgets)
        for j in range(req.n)
    ]
    return prompts, texts, rows


def _clamp(logp: float) -> float:
    return max(logp, _MIN_LOGPROB)


def completion_response(
    req: CompletionRequest, prompts: list[list[int]], texts: list[str | None], rows: list[Row], tokenizer: Any,
    model_name: str, request_id: str, created: int,
) -> dict:
    """The JSON body answering `req`, once the engine has run its rows."""

    decoded: dict[int, str] = {}

    def decode_one(t: int) -> str:
        if t not in decoded:
            decoded[t] = tokenizer.decode([t])
        return decoded[t]

    def token_str(t: int) -> str:
        return f"token_id:{t}" if req.return_tokens_as_token_ids else decode_one(t)

    choices, completion_tokens = [], 0
    for index, row in enumerate(rows):
        prompt_ids = prompts[index // req.n]
        scores = rows[index - index % req.n].prompt_scores
        prompt_text = texts[index // req.n]
        if prompt_text is None:
            prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        text = tokenizer.decode(row.token_ids, skip_special_tokens=True)
        completion_tokens += len(row.token_ids)
        logprobs = None
        if req.logprobs is not None:
            steps: list[tuple[int, float | None, dict | None]] = []
            if req.echo:
                steps.append((prompt_ids[0], None, None))
                top_ids, top_logp = scores.top_ids[:, : req.logprobs].tolist(), scores.top_logp.tolist()
                for j, taken in enumerate(scores.taken_logp.tolist(), start=1):
                    top = dict(zip(top_ids[j - 1], top_logp[j - 1]))
                    steps.append((prompt_ids[j], taken, {prompt_ids[j]: taken, **top}))
            for t, logp, (top_ids, top_logp) in zip(row.token_ids, row.token_logp, row.token_top):
                steps.append((t, logp, {t: logp, **dict(zip(top_ids, top_logp))}))
            strs = [token_str(t) for t, _, _ in steps]
            offsets = [sum(len(s) for s in strs[:i]) for i in range(len(strs))]
            logprobs = {
                "text_offset": offsets,
                "token_logprobs": [None if lp is None else _clamp(lp) for _, lp, _ in steps],
                "tokens": strs,
                "top_logprobs": [
                    None if top is None else {token_str(t): _clamp(lp) for t, lp in top.items()} for _, _, top in steps
                ],
            }
        prompt_logprobs = None
        if req.prompt_logprobs is not None:
            prompt_logprobs = [None]
            top_ids = scores.top_ids[:, : req.prompt_logprobs].tolist()
            top_logp = scores.top_logp[:, : req.prompt_logprobs].tolist()
            taken = zip(scores.taken_logp.tolist(), scores.taken_rank.tolist())
            for j, (taken_logp, taken_rank) in enumerate(taken, start=1):
                # The prompt token first, with its own rank; a top-k entry for the same id overwrites it in place.
                entry = {prompt_ids[j]: (taken_logp, taken_rank)}
                entry.update({t: (lp, r + 1) for r, (t, lp) in enumerate(zip(top_ids[j - 1], top_logp[j - 1]))})
                prompt_logprobs.append(
                    {
                        str(t): {"logprob": _clamp(lp), "rank": rank, "decoded_token": decode_one(t)}
                        for t, (lp, rank) in entry.items()
                    }
                )
        last = row.token_ids[-1] if row.token_ids else None
        choices.append(
            {
                "index": index,
                "text": (prompt_text if req.echo else "") + text,
                "logprobs": logprobs,
                "finish_reason": row.finish_reason,
                "stop_reason": last if row.finish_reason == "stop" and last in (req.stop_token_ids or ()) else None,
                "prompt_logprobs": prompt_logprobs,
                "prompt_token_ids": prompt_ids if req.return_token_ids else None,
                "token_ids": row.token_ids if req.return_token_ids else None,
            }
        )
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
