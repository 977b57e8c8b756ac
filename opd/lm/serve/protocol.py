"""Request and response shapes of `opd serve`'s `/v1/completions`: the part of vLLM's OpenAI-compatible API opd uses.

Request fields follow vLLM's `CompletionRequest`: unknown fields are ignored, as vLLM does, an explicit null is the
field's default, and the vLLM fields that would change sampling but that opd does not implement are refused unless
neutral (`_UNSUPPORTED`). The sampling fields (`SamplingRequest`) are shared with `/v1/chat/completions`
(`opd.lm.serve.chat`); a stop string cuts the text before it (`finish_reason` "stop", `stop_reason` the string), while
`token_ids` and `logprobs` keep every generated token up to the one that completed it, as in vLLM. A response choice is
`{index, text, logprobs, finish_reason, stop_reason, prompt_logprobs, prompt_token_ids, token_ids}` where `logprobs` is
the OpenAI legacy `{tokens, token_logprobs, top_logprobs, text_offset}` and `prompt_logprobs` is vLLM's list with a
null first entry and then, per prompt token, `{"<token id>": {"logprob", "rank", "decoded_token"}}` holding the
top-k plus the prompt token itself (so k or k+1 entries). Log-probs are clamped at -9999.0 like vLLM (JSON has no -inf).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from opd.lm.serve.engine import Row

_INT64 = 2**63


MIN_LOGPROB = -9999.0
"""The floor of every reported log-prob (as vLLM does): -inf is not valid JSON."""


class ServerLimits(Protocol):
    """The server settings a request is checked against; `opd.lm.serve.app.ServeArgs` has them (this module does not
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


MAX_STOP_STRINGS, MAX_STOP_CHARS = 64, 1000
"""Most stop strings in one request, and their longest (OpenAI takes 4; vLLM sets no limit)."""


class BadRequest(ValueError):
    """A request the server refuses; answered with HTTP 400 and this message."""


def _neutral_none(v: Any) -> bool:
    return v is None


def _neutral_empty(v: Any) -> bool:
    return not v


_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    # vLLM fields that would change what is sampled (or the prompt) and that opd serve does not implement: accepted
    # only at their neutral value, refused otherwise, so that no request is silently answered as another one.
    "best_of": lambda v: v in (None, 1),
    "use_beam_search": _neutral_empty,
    "length_penalty": lambda v: v in (None, 1, 1.0),
    "allowed_token_ids": _neutral_none,
    "bad_words": _neutral_empty,
    "logits_processors": _neutral_empty,
    "structured_outputs": _neutral_none,
    "guided_json": _neutral_none,
    "guided_regex": _neutral_none,
    "guided_choice": _neutral_none,
    "guided_grammar": _neutral_none,
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "prompt_embeds": _neutral_none,
    "suffix": _neutral_none,
    "truncate_prompt_tokens": _neutral_none,
    "vllm_xargs": _neutral_none,
    "tools": _neutral_empty,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "chat_template": _neutral_none,
    "documents": _neutral_none,
}


class SamplingRequest(BaseModel):
    """The sampling fields `/v1/completions` and `/v1/chat/completions` share (vLLM's names and defaults).

    An explicit JSON null for any optional field means its default, as in vLLM. Unknown fields are ignored, as vLLM
    does; the vLLM fields in `_UNSUPPORTED` are refused unless neutral."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    """-1 or 0: off (vLLM's convention)."""
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, OpenAI's format) -> bias added to its logit; values are clipped to [-100, 100]."""
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    stream: bool = False
    stop: list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults_and_unsupported_fields_neutral(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        for name, neutral in _UNSUPPORTED.items():
            if name in value and not neutral(value[name]):
                raise ValueError(f"{name}={value[name]!r} is not supported by opd serve (it would change what is "
                                 f"sampled); leave {name} out")
        # max_tokens=null has a meaning of its own in vLLM's completions (up to the context), unlike the others
        return {k: v for k, v in value.items() if v is not None or k == "max_tokens"}

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value and not all(value):
            raise ValueError("a stop string is empty; send non-empty strings")
        # every stop string is searched for after every token: 20,000 of them turned 0.3 s into 20 s
        if value and (len(value) > MAX_STOP_STRINGS or max(map(len, value)) > MAX_STOP_CHARS):
            raise ValueError(f"send at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _float_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and not all(math.isfinite(b) for b in value.values()):
            raise ValueError("logit_bias values must be finite numbers")
        return value


class CompletionRequest(SamplingRequest):
    """Body of `POST /v1/completions`."""

    prompt: list[StrictStr | list[StrictInt]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0)
    add_special_tokens: bool = True

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


def check_request(req: SamplingRequest, n_prompts: int, logprobs: dict[str, int | None], limits: ServerLimits) -> None:
    """Refuse a request over the server's limits: sequences, top-k log-probs (`logprobs`: field name -> k), tokens."""
    if req.stream:
        raise BadRequest("stream=true is not supported by opd serve; send stream=false")
    if req.n * n_prompts > limits.max_seqs_per_request:
        raise BadRequest(
            f"{n_prompts} prompts x n={req.n} is over this server's {limits.max_seqs_per_request} sequences per "
            "request; split the request"
        )
    for name, k in logprobs.items():
        if k is not None and k > limits.max_logprobs:
            raise BadRequest(f"{name}={k} is over this server's limit of {limits.max_logprobs} (--max-logprobs)")


def check_prompt(
    i: int, ids: list[int], max_tokens: int | None, vocab_size: int, max_model_len: int, limits: ServerLimits
) -> int:
    """Refuse prompt `i` if it cannot run; return its token budget (`max_tokens`, or what the context leaves)."""
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise BadRequest(f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}")
    max_prompt_len = min(limits.max_prompt_len or max_model_len, max_model_len)
    if not ids:
        raise BadRequest(f"prompt {i} is empty (no tokens); send at least one token")
    if bad := [t for t in ids if not 0 <= t < vocab_size]:
        raise BadRequest(f"prompt {i} has token id {bad[0]} outside the model's vocabulary [0, {vocab_size})")
    if len(ids) > max_prompt_len:
        raise BadRequest(f"prompt {i} has {len(ids)} tokens, over the limit of {max_prompt_len}; shorten it")
    budget = max_tokens if max_tokens is not None else min(limits.max_tokens, max_model_len - len(ids))
    if len(ids) + budget > max_model_len:
        raise BadRequest(
            f"prompt {i} has {len(ids)} tokens and max_tokens={budget}: over the model's context of "
            f"{max_model_len} tokens; shorten the prompt or lower max_tokens"
        )
    return budget


def check_text(i: int, text: str) -> None:
    """Refuse text no tokenizer can encode: JSON can carry lone surrogates ("\ud800")."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRequest(
                f"prompt {i} is not valid Unicode text ({e.reason} at character {e.start}); send UTF-8 text"
            ) from None


def sampling_rows(
    req: SamplingRequest, prompts: list[list[int]], budgets: list[int], tokenizer: Any, vocab_size: int,
    logprobs: int | None, prompt_topk: int | None = None,
) -> list[Row]:
    """The engine rows of a checked request: prompt-major (row `i * n + j` is choice j of prompt i), each with its own
    seed derived from `req.seed`. Only choice 0 of a prompt scores the prompt (`prompt_topk`); the others share it."""
    for t in req.stop_token_ids or ():
        # checked here, not in the batch: an id out of range raised there (with min_tokens), failing every request
        # batched with this one; and -1 would silently mean the last token
        if not 0 <= t < vocab_size:
            raise BadRequest(f"stop_token_ids holds {t}, not a token id in [0, {vocab_size})")
    stop_ids = frozenset(req.stop_token_ids or ())
    if not req.ignore_eos and tokenizer.eos_token_id is not None:
        stop_ids |= {tokenizer.eos_token_id}
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        # ASCII digits only: "²".isdigit() is true but int("²") raises, and "--1" passed lstrip("-")
        if not (key.isascii() and key.isdigit() and len(key) < 12) or not 0 <= int(key) < vocab_size:
            raise BadRequest(f"logit_bias key {key[:20]!r} is not a token id in [0, {vocab_size}); key it by token "
                             "id")
        bias[int(key)] = min(max(value, -100.0), 100.0)  # OpenAI's range, which vLLM clips to too
    stop_strings = tuple(req.stop or ())
    skip = req.skip_special_tokens

    def detokenize(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip)

    seeds = iter(_derived_seeds(req.seed, len(prompts) * req.n))
    return [
        Row(
            prompt_ids=ids, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=next(seeds),
            logprobs=logprobs, prompt_topk=prompt_topk if j == 0 else None, stop_ids=stop_ids,
            top_k=max(req.top_k, 0), min_p=req.min_p, repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, logit_bias=bias or None,
            min_tokens=req.min_tokens, stop_strings=stop_strings, detokenize=detokenize if stop_strings else None,
            include_stop_str=req.include_stop_str_in_output,
        )
        for ids, max_tokens in zip(prompts, budgets)
        for j in range(req.n)
    ]


def rows_for_request(
    req: CompletionRequest, tokenizer: Any, vocab_size: int, max_model_len: int, limits: ServerLimits
) -> tuple[list[list[int]], list[str | None], list[Row]]:
    """Check a completions request against the model and the server's limits; return (prompt ids, prompt texts,
    rows)."""
    check_request(req, len(req.prompt), {"logprobs": req.logprobs, "prompt_logprobs": req.prompt_logprobs}, limits)
    prompts, texts, budgets = [], [], []
    for i, p in enumerate(req.prompt):
        if isinstance(p, str):
            check_text(i, p)
        ids = tokenizer(p, add_special_tokens=req.add_special_tokens)["input_ids"] if isinstance(p, str) else p
        budgets.append(check_prompt(i, ids, req.max_tokens, vocab_size, max_model_len, limits))
        prompts.append(ids)
        texts.append(p if isinstance(p, str) else None)
    wants_prompt = req.prompt_logprobs is not None or (req.echo and req.logprobs is not None)
    prompt_topk = max(req.prompt_logprobs or 0, req.logprobs or 0) if wants_prompt else None
    return prompts, texts, sampling_rows(req, prompts, budgets, tokenizer, vocab_size, req.logprobs, prompt_topk)


def stop_reason(row: Row, stop_token_ids: list[int] | None) -> int | str | None:
    """vLLM's `stop_reason`: the stop string or stop token id that ended the row (None for EOS or the length)."""
    if row.stop_reason is not None:
        return row.stop_reason
    last = row.token_ids[-1] if row.token_ids else None
    return last if row.finish_reason == "stop" and last in (stop_token_ids or ()) else None


def completion_text(row: Row, tokenizer: Any, skip_special_tokens: bool = True) -> str:
    """The row's generated text, cut before a stop string that ended it."""
    text = tokenizer.decode(row.token_ids, skip_special_tokens=skip_special_tokens)
    return text if row.text_end is None else text[: row.text_end]


def _clamp(logp: float) -> float:
    return max(logp, MIN_LOGPROB)


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
        text = completion_text(row, tokenizer, req.skip_special_tokens)
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
        choices.append(
            {
                "index": index,
                "text": (prompt_text if req.echo else "") + text,
                "logprobs": logprobs,
                "finish_reason": row.finish_reason,
                "stop_reason": stop_reason(row, req.stop_token_ids),
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
