"""A completions server (`opd serve`, or vLLM's OpenAI-compatible server) as a teacher and as a rollout sampler.

`RemoteTeacher.score` sends each sequence's token ids with `prompt_logprobs=top_k` and turns vLLM's per-prompt-token
answer into a `TeacherSignal` in target coordinates (entry i >= 1 of `prompt_logprobs` is the distribution over token
i given tokens < i, which is target position i - 1 of the unpadded sequence). `RemoteSampler.sample` generates
completions and returns the sampler's log-prob of each sampled token, for importance-ratio corrections.

Network faults (connection refused, timeouts, 429/5xx) are retried with exponential back-off; when the server stays
unreachable the call raises `TeacherUnreachable`, naming the URL and what to do. Other 4xx answers are not retried:
they raise `ServerRefused` (a RuntimeError) with the server's message, cut short and without control characters.

A server is not trusted: each attempt has a wall-clock deadline (not only a per-read timeout, which a server sending a
byte at a time never hits), an answer over `max_answer_bytes` or that is not a JSON object raises `BadAnswer`, and
the teacher and sampler check every number they read (`check_logp`, `check_ids`). `BadAnswer` is a
`TeacherUnreachable`, so the training loop stops with a checkpoint and one line naming the server, as for a dead one.
"""

from __future__ import annotations

import json
import math
import os
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from opd.lm.teachers.base import TeacherUnreachable

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


NEUTRAL_SAMPLING = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                    "frequency_penalty": 0.0}
"""Sent with every sampling request: vLLM fills each field a request leaves out from the model's
generation_config.json (`--generation-config auto`, its default), and a top_k or repetition penalty there would make
the samples follow another distribution than the log-probs used for the loss and the importance ratios. top_k=-1 is
vLLM's "no top-k" in every version (0 only in recent ones)."""


class ServerRefused(RuntimeError):
    """The server answered a 4xx that retrying will not fix; `status` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BadAnswer(TeacherUnreachable):
    """The server answered something opd cannot use (not JSON, too large, NaN or positive log-probs, token ids out of
    range, lengths other than asked); the message names the URL and what was wrong."""


MAX_ANSWER_BYTES = 2**30
"""Largest answer a client reads (1 GiB: 16 hidden-state rows of 2,048 tokens x 4,096 float32 in base64 fit)."""

LOGP_SLACK = 1e-3
"""How far above 0 a reported log-prob may be (float rounding of a log-softmax) before the answer is refused."""


def check_logp(url: str, what: str, values: list) -> list[float]:
    """`values` as floats, each finite and <= 0 (up to LOGP_SLACK, then clipped to 0); BadAnswer otherwise."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > LOGP_SLACK:
            raise BadAnswer(f"{url} sent {what} {_quoted(repr(v), 40)}; a log-prob must be a finite number <= 0")
        out.append(min(float(v), 0.0))
    return out


def check_ids(url: str, what: str, values: list, vocab_size: int | None) -> list[int]:
    """`values` as token ids, each an int in [0, vocab_size) (>= 0 when the vocabulary is not known); BadAnswer
    otherwise (a negative id trips a device-side assert on CUDA)."""
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (vocab_size is not None and v >= vocab_size):
            where = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise BadAnswer(f"{url} sent {what} {_quoted(repr(v), 40)}; token ids must be integers in {where}")
    return list(values)


def _quoted(text: str, limit: int = 300) -> str:
    """A server's text made safe to print on one line: control characters (terminal escapes, newlines) dropped, cut
    to `limit` characters, in quotes."""
    clean = "".join(c for c in text[: limit * 4] if unicodedata.category(c)[0] != "C")
    return f"'{clean[:limit]}{'...' if len(clean) > limit else ''}'"


class _Deadline(Exception):
    """One attempt ran past its wall-clock deadline (retried like a timeout)."""


class CompletionsClient:
    """POSTs JSON to a completions server with timeouts, retries and exponential back-off; thread-safe."""

    def __init__(
        self, base_url: str, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 5,
        backoff: float = 0.5, transport: httpx.BaseTransport | None = None, max_answer_bytes: int = MAX_ANSWER_BYTES,
    ):
        # Accept both "http://host:port" and the OpenAI-client style "http://host:port/v1".
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.max_retries, self.backoff, self.timeout = max_retries, backoff, timeout
        self.max_answer_bytes = max_answer_bytes
        api_key = api_key or os.environ.get("OPD_API_KEY") or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def post(self, path: str, body: dict | None) -> dict:
        """POST `body` to `path` (GET when `body` is None) and return the decoded JSON answer (a dict)."""
        url = f"{self.base_url}{path}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            try:
                status, content, location = self._send(path, body, url)
            except (httpx.TransportError, _Deadline) as e:
                last = f"{type(e).__name__}: {_quoted(str(e))}" if isinstance(e, httpx.TransportError) else str(e)
                continue
            if status in _RETRY_STATUS:
                last = f"HTTP {status}: {_message(content)}"
                continue
            if 300 <= status < 400:
                raise BadAnswer(f"{url} redirected (HTTP {status}) to {_quoted(location or '', 100)}; opd does not "
                                f"follow redirects: pass the server's own URL")
            if status == 401:
                raise ServerRefused(401, f"{url}: the server refused the key: pass --remote-api-key or set "
                                    f"OPD_API_KEY (HTTP 401: {_message(content)})")
            if status >= 400:
                raise ServerRefused(status, f"{url} refused the request (HTTP {status}): {_message(content)}")
            try:
                answer = json.loads(content)
            except ValueError:  # not JSON, or not UTF-8
                answer = None
            if not isinstance(answer, dict):
                start = _quoted(content[:60].decode("utf-8", "replace"), 60)
                raise BadAnswer(f"{url} answered HTTP {status} with {start}, not a JSON object; is it vLLM or `opd "
                                "serve`?")
            return answer
        raise TeacherUnreachable(
            f"{url} did not answer after {self.max_retries + 1} attempts (last error: {last}); start the server "
            "(`opd serve MODEL_DIR --port PORT`, or vLLM) or fix the URL, or raise the client's timeout/max_retries "
            "(opd train: --remote-timeout, --remote-max-retries)."
        )

    def _send(self, path: str, body: dict | None, url: str) -> tuple[int, bytes, str | None]:
        """One attempt: (status, body bytes, Location header), read within the wall-clock deadline `timeout` and
        the byte cap (the per-read timeout alone lets a server that sends a byte at a time hold a call forever)."""
        deadline = time.monotonic() + self.timeout
        request = self._http.build_request("GET" if body is None else "POST", path, json=body)
        response = self._http.send(request, stream=True)
        try:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_answer_bytes:
                raise BadAnswer(f"{url} announced an answer of {int(declared)} bytes, over the client's limit of "
                                f"{self.max_answer_bytes} bytes; ask for less per request")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > self.max_answer_bytes:
                    raise BadAnswer(f"{url} sent an answer over the client's limit of {self.max_answer_bytes} bytes; "
                                    "ask for less per request")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise _Deadline(f"the answer took over {self.timeout:g} s")
            return response.status_code, b"".join(chunks), response.headers.get("location")
        finally:
            response.close()

    def post_many(self, path: str, bodies: list[dict], max_concurrency: int) -> list[dict]:
        """POST several bodies concurrently (the server batches them); answers in the order of `bodies`."""
        if len(bodies) <= 1 or max_concurrency <= 1:
            return [self.post(path, b) for b in bodies]
        with ThreadPoolExecutor(max_workers=min(max_concurrency, len(bodies))) as pool:
            return list(pool.map(lambda b: self.post(path, b), bodies))

    def model_card(self) -> dict:
        """The first model the server lists at /v1/models; a one-line ValueError when the URL answers but is not an
        OpenAI-compatible server (an HTML page, a 404, a JSON without a model list)."""
        def refuse(why: str) -> ValueError:
            return ValueError(f"{self.base_url} is not an OpenAI-compatible server (GET /v1/models: {why}); pass the "
                              "base URL of vLLM or `opd serve`, e.g. http://127.0.0.1:8000/v1")
        try:
            answer = self.post("/v1/models", None)
        except BadAnswer as e:  # a 200 that is not a JSON object, a redirect
            raise refuse(str(e).removeprefix(f"{self.base_url}/v1/models ")) from None
        except ServerRefused as e:
            if e.status == 401:
                raise ValueError(f"{self.base_url}: the server refused the key: pass --remote-api-key or set "
                                 "OPD_API_KEY (GET /v1/models: HTTP 401)") from None
            raise refuse(f"HTTP {e.status}") from None
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise refuse("no model list")
        return data[0]

    def served_model(self) -> str:
        """The first model the server lists at /v1/models (what `model=None` resolves to)."""
        return self.model_card()["id"]

    def close(self) -> None:
        self._http.close()


def _message(content: bytes) -> str:
    """The message in an error answer (OpenAI's or FastAPI's shape, or the raw text), safe to print."""
    try:
        body = json.loads(content)
    except ValueError:
        return _quoted(content[:2000].decode("utf-8", "replace"))
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        err = err.get("message") or err.get("detail") or err
    return _quoted(str(err))


def server_kind(card: dict) -> str:
    """Which server a /v1/models card comes from: 'vllm', 'opd' (opd serve), or whatever its owned_by says."""
    return str(card.get("owned_by") or "unknown")


_PROBE_TEXT = "Hello, world! 4827+596=5423\n"


def check_served_vocabulary(client: CompletionsClient, model: str, tokenizer, vocab_size: int,
                            top_k: int = 1) -> None:
    """Before training: one scoring request with prompt_logprobs=top_k, and (where the server has vLLM's /tokenize)
    the server's tokenization of a probe text, against the student's tokenizer and output vocabulary `vocab_size`.

    Each problem is a one-line ValueError naming the fix: a limit below top_k (vLLM's --max-logprobs), a vocabulary
    smaller (the student's last token id refused) or larger (an id >= vocab_size in the answer) than the student's,
    a tokenizer that splits text differently, a server without vLLM's prompt_logprobs.
    """
    url = client.base_url
    text = _PROBE_TEXT + tokenizer.decode(list(range(min(len(tokenizer), 200))), skip_special_tokens=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    last = len(tokenizer) - 1
    seq = (ids[:16] or [0]) + [last]
    body = {"model": model, "prompt": [seq], "max_tokens": 0, "echo": True, "prompt_logprobs": top_k,
            "return_token_ids": True}
    try:
        answer = client.post("/v1/completions", body)
    except ServerRefused as e:
        if "vocabulary" in str(e):
            raise ValueError(f"{url} serves a model with a smaller vocabulary than the student's (it refused the "
                             f"student's token id {last}: {e}); serve a model that shares the student's "
                             "tokenizer") from None
        if "logprobs" in str(e):
            raise ValueError(f"{url} refused prompt_logprobs={top_k} ({e}); restart it with --max-logprobs {top_k} "
                             f"or more, or lower --top-k to its limit") from None
        raise ValueError(f"{url} refused opd's scoring request ({e}); opd needs vLLM's prompt_logprobs: point it at "
                         f"vLLM or `opd serve`") from None
    choices = answer.get("choices") if isinstance(answer, dict) else None
    entries = (choices[0].get("prompt_logprobs") if choices and isinstance(choices[0], dict) else None) or []
    if len(entries) != len(seq) or not all(isinstance(e, dict) for e in entries[1:]):
        raise ValueError(f"{url} answered a scoring request without vLLM's prompt_logprobs (one per prompt token); "
                         f"point opd at vLLM or `opd serve`")
    served_ids = {int(t) for e in entries[1:] for t in e}
    if max(served_ids) >= vocab_size:
        raise ValueError(f"{url} serves a model with a larger vocabulary than the student's (token id "
                         f"{max(served_ids)} >= {vocab_size}); serve a model that shares the student's tokenizer")
    if (got := min(len(e) for e in entries[1:])) < min(top_k, vocab_size):
        raise ValueError(f"{url} returned {got} log-probs per position for prompt_logprobs={top_k}; raise its "
                         f"limit (vLLM: --max-logprobs {top_k}) or lower --top-k to {got}")
    try:
        served = client.post("/tokenize", {"model": model, "prompt": text, "add_special_tokens": False})
    except ServerRefused:
        return  # no /tokenize (opd serve): the id probe above is what can be checked
    if served.get("tokens") != ids:
        raise ValueError(f"{url} tokenizes text differently from the student's tokenizer (vocabulary of "
                         f"{len(tokenizer)} tokens); serve a model that shares the student's tokenizer")


def score_shapes(input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, mask_BT: torch.Tensor) -> tuple[int, int]:
    """(B, L) of a batch a remote teacher scores; a ValueError naming all three shapes when they do not fit."""
    B, L = input_ids_BL.shape
    if mask_BT.shape != (B, L - 1) or attention_mask_BL.shape != (B, L):
        raise ValueError(
            f"shapes: input_ids {tuple(input_ids_BL.shape)}, attention_mask {tuple(attention_mask_BL.shape)}, "
            f"mask {tuple(mask_BT.shape)}; need [B, L], [B, L], [B, L-1]"
        )
    return B, L
