"""Helpers shared by the server and remote-client tests: a tiny served model, a live server, brute-force log-probs."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import torch
import uvicorn

from tests.conftest import tiny_llama


def served_model(tokenizer, seed: int = 0, hidden: int = 32) -> torch.nn.Module:
    """A tiny Llama whose output head is scaled up so its distributions are peaked (distinct top-k, clear samples)."""
    model = tiny_llama(tokenizer, hidden, 2, seed).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app, config=None) -> Iterator[str]:
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a background thread; yields its base URL. `config(app,
    port)`: the uvicorn.Config to use (default: uvicorn's defaults)."""
    port = free_port()
    config = config or (lambda app, port: uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    server = uvicorn.Server(config(app, port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


@torch.no_grad()
def sequence_logp(model, ids: list[int]) -> torch.Tensor:
    """[len-1, V]: row j is the model's log-distribution over token j+1 of `ids` given tokens <= j (no padding)."""
    return model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def complete(client, **body) -> dict:
    """The JSON answer of a /v1/completions request that must succeed (the failure shows the server's message)."""
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()
