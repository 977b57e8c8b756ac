"""Malformed requests for `opd serve` as hypothesis strategies, and the rule every answer must follow.

A `Case` is one HTTP request and whether the server must refuse it. Most cases are wrong in one known way: bytes
that are not JSON, JSON that is not an object, a missing prompt, one field of the wrong type or out of range, a
server limit exceeded, a wrong method or path, a weight update from a path that holds no weights. Those must get a
4xx. The others (`in_schema`) are well-typed requests with random small values, which the server may answer (200,
with one choice per prompt and sample) or refuse, never with a 5xx. Every 4xx must carry a one-line message in
OpenAI's error shape. `judge` states the rule; `tests/lm/test_fuzz_serve.py` and `opd bench reliability` share it.

"Wrong type" means wrong after pydantic's lax coercion, which the server keeps (as vLLM does): `"3"` is a fine
`max_tokens`, `"yes"` a fine `echo`, so neither appears among the values that must be refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import strategies as st

KNOWN_PATHS = ("/v1/completions", "/v1/models", "/health", "/opd/update_weights")


@dataclass(frozen=True)
class Target:
    """What the strategies need to know about the server under test (its `ServeArgs` limits and its model)."""

    served_name: str
    """The name `model` must carry (or be left out)."""
    vocab_size: int
    """Token ids must lie in [0, vocab_size)."""
    max_model_len: int
    """Context length: prompt + generated tokens."""
    max_prompt_len: int
    """Most prompt tokens."""
    max_tokens: int
    """Most generated tokens per sequence."""
    max_logprobs: int
    """Largest `logprobs` / `prompt_logprobs`."""
    max_seqs_per_request: int
    """Most prompts x n per request."""

    @classmethod
    def of(cls, args, vocab_size: int, max_model_len: int) -> Target:
        """The target an `opd serve` with `args` (a `ServeArgs`) presents for a model of this vocabulary and context."""
        return cls(
            served_name=args.served_model_name or args.model_dir, vocab_size=vocab_size, max_model_len=max_model_len,
            max_prompt_len=min(args.max_prompt_len or max_model_len, max_model_len), max_tokens=args.max_tokens,
            max_logprobs=args.max_logprobs, max_seqs_per_request=args.max_seqs_per_request,
        )


@dataclass(frozen=True)
class Case:
    """One request to send and what the answer must be."""

    kind: str
    """Which family of cases it comes from (counted in the benchmark's report)."""
    method: str
    path: str
    body: bytes | None
    content_type: str | None
    must_fail: bool
    """The request is wrong: only a 4xx is a right answer."""
    choices: int | None = None
    """For a well-typed completions request: how many choices a 200 must hold (prompts x n)."""

    def send(self, client):
        """Send through an httpx-style client (a `fastapi.testclient.TestClient` or an `httpx.Client` with base_url)."""
        headers = {} if self.content_type is None else {"content-type": self.content_type}
        return client.request(self.method, self.path, content=self.body, headers=headers)


def judge(case: Case, status: int, body: bytes) -> str | None:
    """Why the answer (`status`, `body`) breaks the rule for `case`, or None when it follows it."""
    if status >= 500:
        return f"HTTP {status}: {body[:200]!r}"
    if 400 <= status < 500:
        try:
            error = json.loads(body)["error"]
            message = error["message"]
        except (ValueError, KeyError, TypeError):
            return f"HTTP {status} without an OpenAI error body: {body[:200]!r}"
        if not isinstance(message, str) or not message.strip() or "\n" in message:
            return f"HTTP {status} with an unclear message: {message!r}"
        if error.get("code") != status:
            return f"HTTP {status} whose error body says code {error.get('code')!r}"
        return None
    if case.must_fail:
        return f"HTTP {status} for a request that must be refused: {body[:200]!r}"
    if status != 200:
        return f"HTTP {status}, neither 200 nor 4xx"
    if case.choices is not None:
        try:
            got = len(json.loads(body)["choices"])
        except (ValueError, KeyError, TypeError):
            return f"HTTP 200 without choices: {body[:200]!r}"
        if got != case.choices:
            return f"HTTP 200 with {got} choices for {case.choices} prompts x n"
    return None


# Values that stay wrong after pydantic's lax coercion (see the module docstring).
_LETTERS = st.text(alphabet="xzq", min_size=1, max_size=6)  # never a number, "inf", "nan", "yes", "true", ...
_CONTAINERS = st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
_FRACTIONS = st.floats(-1e6, 1e6).filter(lambda x: x != int(x))
_NOT_INT = _LETTERS | _CONTAINERS | _FRACTIONS | st.just(float("nan"))
_NOT_FLOAT = _LETTERS | _CONTAINERS
_NOT_BOOL = _LETTERS | _CONTAINERS | st.integers().filter(lambda x: x not in (0, 1)) | _FRACTIONS
_NOT_STR = st.integers() | st.floats(allow_nan=False) | st.booleans() | _CONTAINERS
_TEXT = st.text(alphabet="0123456789+= ans", min_size=1, max_size=12)


def _ids(t: Target, min_size: int = 1, max_size: int = 12):
    return st.lists(st.integers(0, t.vocab_size - 1), min_size=min_size, max_size=max_size)


def _prompt(t: Target):
    """A prompt in one of the four shapes, with its number of prompts."""
    return st.one_of(
        (_TEXT | st.text(min_size=1, max_size=12)).map(lambda p: (p, 1)),
        st.lists(_TEXT, min_size=1, max_size=3).map(lambda p: (p, len(p))),
        _ids(t).map(lambda p: (p, 1)),
        st.lists(_ids(t), min_size=1, max_size=3).map(lambda p: (p, len(p))),
    )


def _optional_fields(t: Target) -> dict:
    return {
        "model": st.sampled_from([None, t.served_name]),
        "max_tokens": st.sampled_from([0, 1, 2, 8, None]),  # None: up to the context (the slowest)
        # Edge values next to random ones: float32 rounds 1e-320 to 0, and 1e-40 overflows logits divided by it.
        "temperature": st.floats(0, 5) | st.sampled_from([0.0, 5e-324, 1e-300, 1e-40, 1e-38, 1e-6, 1e-5, 1e4, 1e300]),
        "top_p": st.floats(0, 1, exclude_min=True) | st.sampled_from([5e-324, 1e-320, 1e-45, 1e-40, 1e-7, 1.0]),
        "n": st.integers(1, 2),
        "seed": st.none() | st.integers(-(2**63), 2**63 - 1),
        "logprobs": st.none() | st.integers(0, t.max_logprobs),
        "prompt_logprobs": st.none() | st.integers(0, t.max_logprobs),
        "echo": st.booleans(),
        "ignore_eos": st.booleans(),
        "stop_token_ids": st.none() | st.lists(st.integers(0, t.vocab_size - 1), max_size=3),
        "add_special_tokens": st.booleans(),
        "return_token_ids": st.booleans(),
        "return_tokens_as_token_ids": st.booleans(),
        "an_unknown_field": st.integers(),  # ignored, as vLLM does
    }


@st.composite
def well_typed_body(draw, t: Target) -> tuple[dict, int]:
    """A completions body within the schema and small enough to run fast; with its prompt count."""
    prompt, count = draw(_prompt(t))
    body = draw(st.fixed_dictionaries({}, optional=_optional_fields(t)))
    body["prompt"] = prompt
    return body, count


def _bad_values(t: Target) -> dict:
    """Field -> values that make a request wrong whatever the other fields are."""
    counts = _NOT_INT | st.integers(max_value=-1)
    return {
        "max_tokens": _NOT_INT | st.integers(max_value=-1) | st.integers(t.max_tokens + 1, 10**12),
        "temperature": _NOT_FLOAT | st.floats(max_value=-1e-12) | st.just(float("nan")),
        "top_p": _NOT_FLOAT | st.floats(max_value=0) | st.floats(min_value=1, exclude_min=True) | st.just(float("nan")),
        "n": _NOT_INT | st.integers(max_value=0) | st.integers(t.max_seqs_per_request + 1, 10**9),
        "seed": _NOT_INT | st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1),
        "logprobs": counts | st.integers(t.max_logprobs + 1, 10**9),
        "prompt_logprobs": counts | st.integers(t.max_logprobs + 1, 10**9),
        "stream": st.just(True) | _NOT_BOOL,
        "echo": _NOT_BOOL,
        "ignore_eos": _NOT_BOOL,
        "add_special_tokens": _NOT_BOOL,
        "return_token_ids": _NOT_BOOL,
        "return_tokens_as_token_ids": _NOT_BOOL,
        "stop_token_ids": _LETTERS | st.integers() | st.lists(_LETTERS | st.booleans() | _FRACTIONS, min_size=1),
        "model": _NOT_STR | st.text(max_size=8).filter(lambda s: s != t.served_name),
        "prompt": _bad_prompt(t),
    }


def _bad_prompt(t: Target):
    ids = st.integers(0, t.vocab_size - 1)
    out_of_vocab = st.integers(max_value=-1) | st.integers(min_value=t.vocab_size)
    return st.one_of(
        st.sampled_from([[], "", [[]], [[1], []], [1, "a"], [[1, "a"]], [1, [2]], [[[1]]], [True], [[True]], [1.5],
                         {"a": 1}, 5, True, None, [None]]),
        st.tuples(_ids(t, 0, 6), out_of_vocab, _ids(t, 0, 6)).map(lambda x: [*x[0], x[1], *x[2]]),
        st.lists(ids, min_size=t.max_prompt_len + 1, max_size=t.max_prompt_len + 8),
        st.lists(_TEXT, min_size=t.max_seqs_per_request + 1, max_size=t.max_seqs_per_request + 4),
        # A lone surrogate survives JSON ("\ud800") but no tokenizer can encode it.
        st.tuples(st.text(max_size=4), st.characters(categories=["Cs"]), st.text(max_size=4)).map("".join),
    )


@st.composite
def bad_field(draw, t: Target) -> Case:
    """A well-typed body with one field replaced by a wrong value."""
    body, _ = draw(well_typed_body(t))
    values = _bad_values(t)
    name = draw(st.sampled_from(sorted(values)) | st.just("prompt"))  # the prompt has the most ways to be wrong
    body[name] = draw(values[name])
    return Case(f"field:{name}", "POST", "/v1/completions", json.dumps(body).encode(), "application/json", True)


@st.composite
def over_context(draw, t: Target) -> Case:
    """A prompt that fits on its own, with a max_tokens that pushes it past the context."""
    length = draw(st.integers(1, t.max_prompt_len))
    budget = draw(st.integers(min(max(0, t.max_model_len - length + 1), t.max_tokens), t.max_tokens))
    prompt = draw(_ids(t, length, length))
    body = json.dumps({"prompt": prompt, "max_tokens": budget}).encode()
    return Case("limit:context", "POST", "/v1/completions", body, "application/json",
                must_fail=length + budget > t.max_model_len)


def _is_request_object(raw: bytes) -> bool:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and "prompt" in value


@st.composite
def bad_body(draw, t: Target) -> Case:
    """Bytes that are not a request object: garbage, cut or padded JSON, other JSON values, no prompt, deep nests."""
    valid = json.dumps(draw(well_typed_body(t))[0])
    # Without a JSON content type the body is not parsed at all, so any body is refused.
    content_type = draw(st.sampled_from(["application/json", "application/json", None, "text/plain"]))
    kind = draw(st.sampled_from(["bytes", "truncated", "trailing", "not_object", "no_prompt", "nested", "literal"]))
    if kind == "bytes":
        raw = draw(st.binary(max_size=300))
    elif kind == "truncated":
        raw = valid[: draw(st.integers(0, len(valid) - 1))].encode()
    elif kind == "trailing":
        raw = (valid + draw(st.text(alphabet="x}]{,:\"", min_size=1, max_size=5))).encode()
    elif kind == "not_object":
        value = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | _CONTAINERS
        raw = json.dumps(draw(st.lists(value, max_size=3) | value)).encode()
    elif kind == "no_prompt":
        raw = json.dumps(draw(st.fixed_dictionaries({}, optional=_optional_fields(t)))).encode()
    elif kind == "nested":
        depth = draw(st.integers(2, 100_000))
        raw = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    else:  # JSON's missing numbers, which Python's parser accepts
        field = draw(st.sampled_from(["temperature", "top_p", "max_tokens", "n", "seed", "logprobs"]))
        literal = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        raw = f'{{"prompt": "1+1=", "{field}": {literal}}}'.encode()
        if field == "temperature" and literal == "Infinity" and content_type == "application/json":
            return Case(f"body:{kind}", "POST", "/v1/completions", raw, content_type, False, 1)  # a valid request
    # Random bytes are almost never a request object; when they are, the server may accept them.
    must_fail = content_type != "application/json" or kind != "bytes" or not _is_request_object(raw)
    return Case(f"body:{kind}", "POST", "/v1/completions", raw, content_type, must_fail)


@st.composite
def bad_endpoint(draw, t: Target) -> Case:
    """Wrong methods, unknown paths, and weight updates that point at no weights."""
    kind = draw(st.sampled_from(["method", "path", "update_weights"]))
    if kind == "method":
        path = draw(st.sampled_from(KNOWN_PATHS))
        allowed = "POST" if path in ("/v1/completions", "/opd/update_weights") else "GET"
        methods = [m for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS") if m != allowed]
        method = draw(st.sampled_from(methods))
        return Case("endpoint:method", method, path, b'{"prompt": "1"}', "application/json", True)
    if kind == "path":
        path = draw(st.sampled_from(["/v2/", "/x", "/v1/models/", "/opd/"])) + draw(
            st.text(alphabet="abcxyz019_-/", max_size=20))  # no "." or "%": the client would normalise them
        path = path if path.rstrip("/") not in KNOWN_PATHS else "/x" + path
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
        return Case("endpoint:path", method, path, b"{}", "application/json", True)
    weights = st.one_of(
        st.sampled_from(["", ".", "/", "/etc/passwd", "/dev/zero", "/dev/urandom", "/proc/self/mem", "a\x00b",
                         "/nonexistent/model.safetensors", "../../../../etc/hostname"]),
        st.text(max_size=30).map(lambda s: "/nonexistent/" + s),
    )
    body = st.one_of(weights.map(lambda p: {"path": p}), st.just({}), _NOT_STR.map(lambda p: {"path": p}))
    return Case("endpoint:update_weights", "POST", "/opd/update_weights", json.dumps(draw(body)).encode(),
                "application/json", True)


@st.composite
def in_schema(draw, t: Target) -> Case:
    """A well-typed request with random small values: answered or refused, never a 5xx."""
    body, count = draw(well_typed_body(t))
    n = body.get("n", 1)
    return Case("in_schema", "POST", "/v1/completions", json.dumps(body).encode(), "application/json", False,
                count * n)


def cases(t: Target):
    """Every family of cases, mixed."""
    return st.one_of(bad_field(t), bad_body(t), bad_endpoint(t), over_context(t), in_schema(t))
