"""`opd serve MODEL_DIR`: a small vLLM-compatible completions server around a local Hugging Face causal LM.

It serves the subset of vLLM's OpenAI-compatible API that opd's remote teacher and sampler use
(`opd.lm.remote.client`), so the same client code talks to this server on a laptop and to vLLM on a GPU box:

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

The weight update reads only regular safetensors files under `--weights-root` (no root: no pushes), refuses weights
that are not finite, and tells the client only that it refused (the server's log says why). Requests whose Host
header is not an IP address, localhost, `--host` or one of `--allowed-hosts` get a 421 (DNS rebinding from a
browser). Keep the default host 127.0.0.1, or set `api_key` (or OPD_API_KEY), before exposing the server.
Concurrent requests are batched on the model (`opd.lm.serve.engine.BatchingEngine`). With `api_key` set, `/v1/*` and
`/opd/*` need `Authorization: Bearer <key>`; `/health` stays open, as in vLLM. Bad requests get a 4xx with a one-line
message in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import fastapi
import torch
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from opd.args import ServeArgs  # noqa: F401 (re-exported)
from opd.lm.serve.chat import ChatRequest, chat_response, chat_rows
from opd.lm.serve.engine import BatchingEngine, Busy
from opd.lm.serve.hidden import (
    HiddenStatesRequest,
    check_hidden_request,
    head_piece,
    head_spec,
    hidden_response,
    hidden_states,
)
from opd.lm.serve.protocol import BadRequest, CompletionRequest, completion_response, rows_for_request
from opd.lm.serve.weights import UpdateWeightsRequest, WeightsRefused, load_weights
from opd.lm.serve.wire import WireDtype
from opd.threads import set_threads

log = logging.getLogger("opd.serve")


_MAX_MESSAGE_CHARS = 1000
"""Longest error message sent: a 10 MB body of bad fields must not get a 100 MB list of what was wrong back."""


def _error(status: int, message: str) -> JSONResponse:
    kind = {401: "AuthenticationError", 403: "PermissionDenied", 404: "NotFoundError", 413: "RequestTooLarge",
            421: "MisdirectedRequest", 503: "ServiceUnavailable"}.get(status, "BadRequestError")
    # a lone surrogate echoed from the request ("\ud800" in a field name or a model name) cannot be encoded as UTF-8
    # JSON: written as its escape, so the answer is a 4xx and not a 500
    message = message[: _MAX_MESSAGE_CHARS * 2].encode("utf-8", "backslashreplace").decode("utf-8")
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + " ..."
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

    def __init__(self, app, max_bytes: int, api_key: str | None, hosts: frozenset[str] = frozenset({"*"})):
        self.app, self.max_bytes, self.api_key, self.hosts = app, max_bytes, api_key, hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            # /health stays open to any name, as to any client (a load balancer's probe): it tells nothing
            if scope["path"] != "/health" and not allowed_host(headers.get("host", ""), self.hosts):
                return await _error(421, "this server does not answer to that Host name; start it with "
                                         "--allowed-hosts NAME to accept it")(scope, receive, send)
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


_LOOPBACK_NAMES = frozenset({"localhost", "testserver"})
"""Host names always accepted: localhost, and Starlette's TestClient's name (one label, which no DNS rebinding page
can be served from)."""


def allowed_host(host_header: str, allowed: frozenset[str]) -> bool:
    """Whether a request's Host header names this server: an IP address, localhost (or *.localhost), or one of
    `allowed`. A browser page on an attacker's domain that was re-pointed at 127.0.0.1 sends that domain here."""
    if "*" in allowed:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if _is_ip(host):
        return True
    return host in _LOOPBACK_NAMES or host.endswith(".localhost") or host in allowed


def host_allowlist(args: ServeArgs) -> frozenset[str]:
    """The Host names `args` accepts besides IP addresses and localhost: --host, this machine's names when listening
    on every address, and --allowed-hosts."""
    names = {args.host.lower(), *(h.lower() for h in args.allowed_hosts)}
    if args.host in ("0.0.0.0", "::", ""):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(names)


def build_app(model: torch.nn.Module, tokenizer: Any, args: ServeArgs) -> fastapi.FastAPI:
    """The FastAPI app serving `model` (put in eval mode) and `tokenizer` (a Hugging Face tokenizer)."""
    model.eval()
    name = args.served_model_name or args.model_dir
    vocab_size = model.get_input_embeddings().num_embeddings
    max_model_len = args.max_model_len or getattr(model.config, "max_position_embeddings", None)
    if max_model_len is None:
        raise ValueError("the model config has no max_position_embeddings; pass --max-model-len")
    engine = BatchingEngine(model, args.max_batch_size, args.batch_window_ms / 1000, args.logprobs_mode,
                            args.max_queued_seqs)
    weights_version = 0
    # Tokenizing, rendering chats and building answers take seconds for a 15 MB prompt or a 67 MB answer: done in one
    # worker thread (made per lifespan), so the event loop keeps answering (/health, other requests' batches)
    # meanwhile. One thread: a Hugging Face tokenizer is not safe to call from two at once.
    text_worker: list[concurrent.futures.ThreadPoolExecutor | None] = [None]

    @contextlib.asynccontextmanager
    async def lifespan(app: fastapi.FastAPI):
        engine.start()
        text_worker[0] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="opd-serve-text")
        yield
        await engine.stop()
        text_worker[0].shutdown(wait=False, cancel_futures=True)

    app = fastapi.FastAPI(title="opd serve", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: fastapi.Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # a few, each cut short: joining them all turned a 10 MB body into a 121 MB answer
        parts = [f"{'.'.join(str(x)[:50] for x in e['loc'][1:])[:100] or 'body'}: {str(e['msg'])[:200]}"
                 for e in errors[:5]]
        more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
        return _error(400, "invalid request: " + "; ".join(parts) + more)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: fastapi.Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:  # the body limit, hit while a chunked upload was arriving (_LimitsAndAuth)
            return _error(413, _too_large(args.max_request_bytes))
        return _error(exc.status_code, str(exc.detail))

    app.add_middleware(_LimitsAndAuth, max_bytes=args.max_request_bytes, api_key=args.api_key,
                       hosts=host_allowlist(args))

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

    async def off_loop(fn, *fn_args):
        return await asyncio.get_running_loop().run_in_executor(text_worker[0], fn, *fn_args)

    async def run_for(request: fastapi.Request, rows: list) -> JSONResponse | None:
        """Run `rows` on the engine; None when done, else the answer that says why not: a full queue (503 with
        Retry-After, which clients retry), or a client that hung up first (checked twice a second while they wait:
        their job is cancelled and leaves the queue). Uvicorn does not stop a handler whose client is gone, and five
        abandoned heavy requests made the next 1-token one wait 40 s."""
        job = asyncio.ensure_future(engine.run(rows))
        while not (await asyncio.wait({job}, timeout=0.5))[0]:
            if await request.is_disconnected():
                job.cancel()
                return _error(400, "the client disconnected")  # read by no one
        try:
            job.result()  # the batch's error, if any
        except Busy as e:
            refused = _error(503, str(e))
            refused.headers["Retry-After"] = "1"
            return refused
        return None

    def rendered(body: dict) -> fastapi.Response:
        return fastapi.Response(JSONResponse(body).body, media_type="application/json")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: fastapi.Request) -> fastapi.Response:
        if (refused := wrong_model(req.model)) is not None:
            return refused
        try:
            prompts, texts, rows = await off_loop(rows_for_request, req, tokenizer, vocab_size, max_model_len, args)
        except BadRequest as e:
            return _error(400, str(e))
        if (refused := await run_for(request, rows)) is not None:
            return refused
        return await off_loop(lambda: rendered(completion_response(
            req, prompts, texts, rows, tokenizer, name, f"cmpl-{uuid.uuid4().hex}", int(time.time()))))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: fastapi.Request) -> fastapi.Response:
        if (refused := wrong_model(req.model)) is not None:
            return refused
        try:
            prompt_ids, rows = await off_loop(chat_rows, req, tokenizer, vocab_size, max_model_len, args)
        except BadRequest as e:
            return _error(400, str(e))
        if (refused := await run_for(request, rows)) is not None:
            return refused
        return await off_loop(lambda: rendered(chat_response(
            req, prompt_ids, rows, tokenizer, name, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))))

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
            spec = await head()  # a model whose logits are not its head of these states is refused up front
            starts = check_hidden_request(req, vocab_size, max_model_len, args, spec["weight"].shape[1])
            async with engine.lock:
                states = await asyncio.to_thread(hidden_states, model, req.sequences, starts, args.max_batch_size)
            # base64 of megabytes: in a thread, so the event loop keeps answering
            return JSONResponse(await asyncio.to_thread(hidden_response, req, starts, states, name))
        except BadRequest as e:
            return _error(400, str(e))

    @app.get("/opd/lm_head")
    async def lm_head(start: int = 0, stop: int | None = None, dtype: WireDtype = "float32") -> JSONResponse:
        try:
            return JSONResponse(await asyncio.to_thread(head_piece, await head(), start, stop, dtype,
                                                        args.max_response_bytes))
        except BadRequest as e:
            return _error(400, str(e))

    @app.post("/opd/update_weights")
    async def update_weights(req: UpdateWeightsRequest) -> JSONResponse:
        nonlocal weights_version
        if args.weights_root is None:
            return _error(403, "this server takes no weight pushes; restart it with --weights-root DIR (for opd "
                               "train --sampler: its OUT_DIR/sampler_weights or a parent)")
        async with engine.lock:  # no batch runs on half-loaded weights
            try:
                count = await asyncio.to_thread(load_weights, model, req.path, args.weights_root)
            except WeightsRefused as e:
                # what exists on the server's disk, and what is inside, is for its log, not for any client
                log.warning("refused a weight push: %s", e)
                return _error(400, "the server did not load these weights (not a readable safetensors file or "
                                   "directory under its --weights-root that fits the served model, with finite "
                                   "values); its log says why")
            weights_version += 1
            head_cache.clear()  # new weights, new head (and the check runs again)
        return JSONResponse({"status": "ok", "num_tensors": count, "weights_version": weights_version})

    return app


def load_served(args: ServeArgs) -> tuple[torch.nn.Module, Any]:
    """The model (on `args.device`, in `args.dtype`) and tokenizer saved in `args.model_dir`; sets this process's
    torch threads (`--threads`, else the free cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(args.model_dir).is_dir():
        raise FileNotFoundError(f"{args.model_dir} is not a directory; pass a saved Hugging Face model directory")
    if args.dtype != "auto" and not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        raise ValueError(f"dtype={args.dtype!r}: use auto, float32, bfloat16 or float16")
    set_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(device)
    return model, AutoTokenizer.from_pretrained(args.model_dir)


def resolved_args(args: ServeArgs) -> ServeArgs:
    """`args` with the API key from OPD_API_KEY when --api-key is not given; warns when the server listens beyond
    this machine without a key."""
    import dataclasses

    if args.api_key is None and os.environ.get("OPD_API_KEY"):
        args = dataclasses.replace(args, api_key=os.environ["OPD_API_KEY"])
    loopback = args.host == "localhost" or (_is_ip(args.host) and ipaddress.ip_address(args.host).is_loopback)
    if not loopback and args.api_key is None:
        log.warning("--host %s listens beyond this machine with no API key: anyone who reaches it can use it%s; set "
                    "--api-key or OPD_API_KEY", args.host, " and push weights" if args.weights_root else "")
    return args


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def serve_main(args: ServeArgs) -> None:
    """Load `args.model_dir` and serve it until interrupted."""
    import uvicorn

    args = resolved_args(args)

    # Before the model loads: a port in use would otherwise surface as uvicorn's error among its shutdown lines.
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as e:
            raise ValueError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port or stop "
                             f"what holds it") from None
    model, tokenizer = load_served(args)
    from opd.lm.serve.http import uvicorn_config

    uvicorn.Server(uvicorn_config(build_app(model, tokenizer, args), args)).run()

