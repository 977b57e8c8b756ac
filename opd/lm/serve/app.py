"""`opd serve MODEL_DIR`: a small vLLM-compatible completions server around a local Hugging Face causal LM.

It serves the subset of vLLM's OpenAI-compatible API that opd's remote teacher and sampler use (`opd.lm.remote.client`), so
the same client code talks to this server on a laptop and to vLLM on a GPU box:

- `POST /v1/completions`: text or token-id prompts (single or batch), `max_tokens` (0 = score only), `echo`,
  `logprobs`, vLLM's `prompt_logprobs`, and the sampling fields of `opd.lm.serve.protocol.SamplingRequest`:
  `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, `presence_penalty`, `frequency_penalty`,
  `logit_bias`, `seed`, `n`, `stop` strings, `stop_token_ids`, `min_tokens`, `ignore_eos`, ... An explicit null is
  the field's default, as in vLLM; vLLM fields opd does not implement (beam search, guided decoding, ...) are
  refused with a 400 unless neutral, never ignored.
- `POST /v1/chat/completions`: messages through the tokenizer's chat template (`opd.lm.serve.chat`), the same
  sampling fields, OpenAI's chat `logprobs` / `top_logprobs`.
- `POST /opd/hidden_states`, `GET /opd/lm_head`: final hidden states and the LM head, for a full-vocabulary remote
  teacher (`opd.lm.serve.hidden`, client `opd.lm.remote.hidden`).
- `GET /v1/models`, `GET /health`.

Generated-token log-probs follow `--logprobs-mode`: `raw_logprobs` (default, as vLLM) are the model's own
distribution, before temperature, penalties, logit bias, min_p, top-k and top-p; `processed_logprobs` are those of the
distribution actually sampled from, after all of them. The sampled tokens always follow all of them.
- `POST /opd/update_weights {"path": ...}`: load a safetensors file (or a directory of them) from the server's disk
  into the served model, for server-side rollouts with the latest student weights. vLLM has no such endpoint under
  this name; there the same job is done by its weight-update hooks (collective RPC / `update_weights` in RL
  integrations), `POST /v1/load_lora_adapter` for LoRA students, or its sleep / wake-up endpoints with a reload.

The weight update reads any path the server process can read: keep the default host 127.0.0.1, or set `api_key`,
before exposing the server. Concurrent requests are batched on the model (`opd.lm.serve.engine.BatchingEngine`). With `api_key` set, `/v1/*` and
`/opd/*` need `Authorization: Bearer <key>`; `/health` stays open, as in vLLM. Bad requests get a 4xx with a one-line
message in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import fastapi
import torch
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from opd.args import ServeArgs  # noqa: F401 (re-exported)
from opd.lm.serve.chat import ChatRequest, chat_response, chat_rows
from opd.lm.serve.engine import BatchingEngine
from opd.lm.serve.hidden import (
    HiddenStatesRequest,
    check_hidden_request,
    head_piece,
    head_spec,
    hidden_response,
    hidden_states,
)
from opd.lm.serve.protocol import BadRequest, CompletionRequest, completion_response, rows_for_request
from opd.lm.serve.wire import WireDtype
from opd.threads import set_threads


def _error(status: int, message: str) -> JSONResponse:
    kind = {401: "AuthenticationError", 404: "NotFoundError", 413: "RequestTooLarge"}.get(status, "BadRequestError")
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": None, "code": status}}
    )


def _too_large(max_bytes: int) -> str:
    return f"request body over {max_bytes} bytes; send fewer or shorter prompts"


class _LimitsAndAuth:
    """Size and API-key checks before a request reaches a route. The size is checked twice: the declared
    Content-Length up front, and the bytes as they arrive, since a chunked upload declares none. A plain ASGI
    middleware (not `@app.middleware`, whose BaseHTTPMiddleware reads the body in a task of its own and would turn the
    413 raised while reading into an exception group and a 500)."""

    def __init__(self, app, max_bytes: int, api_key: str | None):
        self.app, self.max_bytes, self.api_key = app, max_bytes, api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                return await _error(413, _too_large(self.max_bytes))(scope, receive, send)
            if self.api_key is not None and scope["path"].startswith(("/v1", "/opd")):
                given = headers.get("authorization", "")
                if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    return await _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")(
                        scope, receive, send)
        received = 0

        async def receive_within_limit():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI re-raises it from body parsing: answered by _http_error
                    raise StarletteHTTPException(413)
            return message

        await self.app(scope, receive_within_limit, send)


class UpdateWeightsRequest(BaseModel):
    """Body of `POST /opd/update_weights`."""

    path: str


def load_weights(model: torch.nn.Module, path: str | Path) -> int:
    """Load safetensors weights (a file, or every *.safetensors in a directory) into `model` in place; return #tensors.

    The check is strict: every tensor must name a model parameter or buffer of the same shape, and every model tensor
    must be given, except a tied one whose twin is given (`save_pretrained` drops the tied `lm_head.weight`).
    Raises ValueError before touching the model when anything does not match. Dtypes are cast to the model's.
    """
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        # repr: a path may hold newlines or unpaired surrogates, and the answer must stay one printable line
        raise ValueError(f"no safetensors weights at {str(path)!r} (on the server's disk); pass a .safetensors file "
                         f"or dir")
    new: dict[str, torch.Tensor] = {}
    for f in files:
        new.update(load_file(str(f)))
    own = model.state_dict()
    unexpected = sorted(set(new) - set(own))
    given_ptrs = {own[k].data_ptr() for k in new if k in own}
    missing = sorted(k for k in set(own) - set(new) if own[k].data_ptr() not in given_ptrs)
    wrong = sorted(k for k in new if k in own and new[k].shape != own[k].shape)
    if unexpected or missing or wrong:
        parts = [f"{name}: {keys[:3]}{' ...' if len(keys) > 3 else ''}" for name, keys in
                 (("unexpected", unexpected), ("missing", missing), ("shape mismatch", wrong)) if keys]
        raise ValueError(f"weights at {str(path)!r} do not fit the served model ({'; '.join(parts)})")
    with torch.no_grad():
        for k, tensor in new.items():
            own[k].copy_(tensor)
    return len(new)


def build_app(model: torch.nn.Module, tokenizer: Any, args: ServeArgs) -> fastapi.FastAPI:
    """The FastAPI app serving `model` (put in eval mode) and `tokenizer` (a Hugging Face tokenizer)."""
    model.eval()
    name = args.served_model_name or args.model_dir
    vocab_size = model.get_input_embeddings().num_embeddings
    max_model_len = args.max_model_len or getattr(model.config, "max_position_embeddings", None)
    if max_model_len is None:
        raise ValueError("the model config has no max_position_embeddings; pass --max-model-len")
    engine = BatchingEngine(model, args.max_batch_size, args.batch_window_ms / 1000, args.logprobs_mode)
    weights_version = 0

    @contextlib.asynccontextmanager
    async def lifespan(app: fastapi.FastAPI):
        engine.start()
        yield
        await engine.stop()

    app = fastapi.FastAPI(title="opd serve", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: fastapi.Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()]
        return _error(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: fastapi.Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:  # the body limit, hit while a chunked upload was arriving (_LimitsAndAuth)
            return _error(413, _too_large(args.max_request_bytes))
        return _error(exc.status_code, str(exc.detail))

    app.add_middleware(_LimitsAndAuth, max_bytes=args.max_request_bytes, api_key=args.api_key)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "weights_version": weights_version}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": name, "object": "model", "created": 0, "owned_by": "opd", "root": args.model_dir,
                "max_model_len": max_model_len}
        return {"object": "list", "data": [card]}

    def wrong_model(requested: str | None) -> JSONResponse | None:
        if requested is not None and requested != name:
            return _error(404, f"The model `{requested}` does not exist; this server serves `{name}`")
        return None

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> JSONResponse:
        if (refused := wrong_model(req.model)) is not None:
            return refused
        try:
            prompts, texts, rows = rows_for_request(req, tokenizer, vocab_size, max_model_len, args)
        except BadRequest as e:
            return _error(400, str(e))
        await engine.run(rows)
        body = completion_response(
            req, prompts, texts, rows, tokenizer, name, f"cmpl-{uuid.uuid4().hex}", int(time.time())
        )
        return JSONResponse(body)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> JSONResponse:
        if (refused := wrong_model(req.model)) is not None:
            return refused
        try:
            prompt_ids, rows = chat_rows(req, tokenizer, vocab_size, max_model_len, args)
        except BadRequest as e:
            return _error(400, str(e))
        await engine.run(rows)
        return JSONResponse(chat_response(req, prompt_ids, rows, tokenizer, name, f"chatcmpl-{uuid.uuid4().hex}",
                                          int(time.time())))

    head_cache: dict[str, dict] = {}

    async def head() -> dict:
        """The head spec, checked once (under the engine's lock: the check runs the model); a refusal is kept too."""
        if not head_cache:
            async with engine.lock:
                try:
                    head_cache["spec"] = await asyncio.to_thread(head_spec, model)
                except BadRequest as e:
                    head_cache["refused"] = e
        if "refused" in head_cache:
            raise head_cache["refused"]
        return head_cache["spec"]

    @app.post("/opd/hidden_states")
    async def hidden(req: HiddenStatesRequest) -> JSONResponse:
        if (refused := wrong_model(req.model)) is not None:
            return refused
        try:
            await head()  # a model whose logits are not its head of these states is refused up front
            starts = check_hidden_request(req, vocab_size, max_model_len, args)
            async with engine.lock:
                states = await asyncio.to_thread(hidden_states, model, req.sequences, starts, args.max_batch_size)
            # base64 of megabytes: in a thread, so the event loop keeps answering
            return JSONResponse(await asyncio.to_thread(hidden_response, req, starts, states, name))
        except BadRequest as e:
            return _error(400, str(e))

    @app.get("/opd/lm_head")
    async def lm_head(start: int = 0, stop: int | None = None, dtype: WireDtype = "float32") -> JSONResponse:
        try:
            return JSONResponse(await asyncio.to_thread(head_piece, await head(), start, stop, dtype))
        except BadRequest as e:
            return _error(400, str(e))

    @app.post("/opd/update_weights")
    async def update_weights(req: UpdateWeightsRequest) -> JSONResponse:
        nonlocal weights_version
        async with engine.lock:  # no batch runs on half-loaded weights
            try:
                count = await asyncio.to_thread(load_weights, model, req.path)
            except (ValueError, OSError, SafetensorError) as e:  # a bad path or file is the client's mistake
                return _error(400, str(e))
            weights_version += 1
            head_cache.clear()  # new weights, new head (and the check runs again)
        return JSONResponse({"status": "ok", "path": req.path, "num_tensors": count,
                             "weights_version": weights_version})

    return app


def load_served(args: ServeArgs) -> tuple[torch.nn.Module, Any]:
    """The model (on `args.device`, in `args.dtype`) and tokenizer saved in `args.model_dir`; sets this process's
    torch threads (`--threads`, else the free cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(args.model_dir).is_dir():
        raise FileNotFoundError(f"{args.model_dir} is not a directory; pass a saved Hugging Face model directory")
    if args.dtype != "auto" and not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        raise ValueError(f"dtype={args.dtype!r}: use auto, float32, bfloat16 or float16")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    set_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(device)
    return model, AutoTokenizer.from_pretrained(args.model_dir)


def serve_main(args: ServeArgs) -> None:
    """Load `args.model_dir` and serve it until interrupted."""
    import socket

    import uvicorn

    # Before the model loads: a port in use would otherwise surface as uvicorn's error among its shutdown lines.
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as e:
            raise ValueError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port or stop "
                             f"what holds it") from None
    model, tokenizer = load_served(args)
    uvicorn.run(build_app(model, tokenizer, args), host=args.host, port=args.port, log_level="info")
