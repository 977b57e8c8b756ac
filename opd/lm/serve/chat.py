"""`POST /v1/chat/completions` of `opd serve`: messages through the served tokenizer's chat template, then the same
engine rows as `/v1/completions`.

The prompt is `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` (vLLM's default; the template
adds any BOS itself, so the text is tokenized without special tokens, as vLLM does). The answer is OpenAI's chat
shape: `choices[i].message = {role: "assistant", content}`, `finish_reason`, vLLM's `stop_reason`, and with
`logprobs: true` the chat log-probs `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`
holding the `top_logprobs` most likely tokens per step. Which log-probs those are follows the server's
`--logprobs-mode`, as for completions.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from opd.lm.serve.engine import Row
from opd.lm.serve.protocol import (
    MIN_LOGPROB,
    BadRequest,
    SamplingRequest,
    ServerLimits,
    check_prompt,
    check_request,
    check_text,
    completion_text,
    sampling_rows,
    stop_reason,
)


class ChatMessage(BaseModel):
    """One message: a role and text content (a string, or OpenAI's list of `{"type": "text", "text": ...}` parts)."""

    model_config = ConfigDict(extra="allow")  # name, tool_call_id...: handed to the template as they are

    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None

    def for_template(self, i: int) -> dict:
        """The message as the chat template reads it, its parts joined by newlines (as vLLM does)."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadRequest(f"message {i} has a content part of type {part.get('type')!r}; opd serve takes "
                                     "text parts only ({\"type\": \"text\", \"text\": ...})")
                texts.append(part["text"])
            content = "\n".join(texts)
        return {**(self.model_extra or {}), "role": self.role, "content": content}


class ChatRequest(SamplingRequest):
    """Body of `POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    """OpenAI's newer name for max_tokens; wins when both are given."""
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo=true is not supported by opd serve's chat endpoint; send echo=false")
        return value


_TEMPLATE_OWN_ARGS = frozenset({
    "chat_template", "tools", "documents", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "add_generation_prompt",
    "continue_final_message", "conversation", "messages",
})
"""`apply_chat_template`'s own arguments: a request may not set them through chat_template_kwargs (a template of its
own is a way to build any prompt, of any size; `tools` would get past the refusal of the top-level field)."""


def check_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The chat_template_kwargs a request may pass: template variables (`enable_thinking`, ...) holding a bool, a
    number, null or a short string. vLLM likewise refuses request templates unless started with
    --trust-request-chat-template; opd serve has no such switch."""
    for key, value in (kwargs or {}).items():
        if key in _TEMPLATE_OWN_ARGS or not key.isidentifier():
            raise BadRequest(f"chat_template_kwargs may not set {key[:40]!r}: opd serve takes template variables "
                             "(e.g. enable_thinking), not templates, tools or tokenizer arguments")
        scalar = value is None or isinstance(value, (bool, int, float))
        if not (scalar or (isinstance(value, str) and len(value) <= 256)):
            raise BadRequest(f"chat_template_kwargs.{key} must be a bool, a number, null or a string of at most 256 "
                             "characters")
    return dict(kwargs or {})


def chat_rows(
    req: ChatRequest, tokenizer: Any, vocab_size: int, max_model_len: int, limits: ServerLimits
) -> tuple[list[int], list[Row]]:
    """Check a chat request and render its prompt; return (prompt ids, rows: one per choice)."""
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("top_logprobs needs logprobs=true; send both")
    top_k = (req.top_logprobs or 0) if req.logprobs else None
    check_request(req, 1, {"top_logprobs": top_k}, limits)
    if getattr(tokenizer, "chat_template", None) is None:
        raise BadRequest("the served tokenizer has no chat template; use /v1/completions, or serve a model whose "
                         "tokenizer_config.json has one")
    messages = [m.for_template(i) for i, m in enumerate(req.messages)]
    for i, m in enumerate(messages):
        if isinstance(m["content"], str):
            check_text(i, m["content"])
    kwargs = check_template_kwargs(req.chat_template_kwargs)
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message, **kwargs)
    except Exception as e:  # jinja's raise_exception ("roles must alternate") or transformers' argument checks
        message = " ".join(str(e).split())  # one line
        raise BadRequest(f"the chat template refused the messages: {message}") from None
    try:  # a lone surrogate in a role or another message field, rendered into the prompt
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"the messages are not valid Unicode text ({e.reason}); send UTF-8 text") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    budget = check_prompt(0, ids, max_tokens, vocab_size, max_model_len, limits)
    return ids, sampling_rows(req, [ids], [budget], tokenizer, vocab_size, top_k)


def _chat_logprobs(row: Row, req: ChatRequest, tokenizer: Any) -> dict:
    def entry(t: int, logp: float) -> dict:
        token = f"token_id:{t}" if req.return_tokens_as_token_ids else tokenizer.decode([t])
        return {"token": token, "logprob": max(logp, MIN_LOGPROB), "bytes": list(token.encode("utf-8"))}

    content = []
    for t, logp, (top_ids, top_logp) in zip(row.token_ids, row.token_logp, row.token_top):
        content.append({**entry(t, logp), "top_logprobs": [entry(i, lp) for i, lp in zip(top_ids, top_logp)]})
    return {"content": content}


def chat_response(
    req: ChatRequest, prompt_ids: list[int], rows: list[Row], tokenizer: Any, model_name: str, request_id: str,
    created: int,
) -> dict:
    """The JSON body answering `req`, once the engine has run its rows."""
    choices = []
    for index, row in enumerate(rows):
        message = {"role": "assistant", "content": completion_text(row, tokenizer, req.skip_special_tokens),
                   "tool_calls": []}
        choices.append({
            "index": index,
            "message": message,
            "logprobs": _chat_logprobs(row, req, tokenizer) if req.logprobs else None,
            "finish_reason": row.finish_reason,
            "stop_reason": stop_reason(row, req.stop_token_ids),
            "token_ids": row.token_ids if req.return_token_ids else None,
        })
    completion_tokens = sum(len(r.token_ids) for r in rows)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model_name,
        "choices": choices,
        "prompt_token_ids": prompt_ids if req.return_token_ids else None,
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                  "total_tokens": len(prompt_ids) + completion_tokens},
    }
