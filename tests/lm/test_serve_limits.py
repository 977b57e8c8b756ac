"""`opd serve` under hostile or heavy clients: keys, hosts, request and header sizes, the weight push's root and
checks, and load (a long prompt, a client that hangs up, a full queue, slow connections) without freezing or failing
the other requests."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from opd.lm.serve.app import ServeArgs, build_app
from tests.lm.serve_helpers import complete, live_server, sequence_logp, served_model


@pytest.fixture(scope="module")
def model(tokenizer):
    return served_model(tokenizer)


def test_api_key_and_request_size_are_enforced(model, tokenizer):
    app = build_app(model, tokenizer, ServeArgs(model_dir="tiny", api_key="sekret", max_request_bytes=1000))
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200  # open, as in vLLM
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = {"Authorization": "Bearer sekret"}
        assert c.get("/v1/models", headers=ok).json()["data"][0]["id"] == "tiny"
        r = c.post("/v1/completions", json={"prompt": "1+1=", "max_tokens": 1}, headers=ok)
        assert r.status_code == 200
        assert c.post("/v1/completions", json={"prompt": "1+1=", "max_tokens": 1}).status_code == 401
        r = c.post("/v1/completions", json={"prompt": "1" * 2000}, headers=ok)
        assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
        # a chunked upload has no Content-Length to check up front: the limit must hold on the bytes received
        body = json.dumps({"prompt": "1" * 2000}).encode()
        chunks = (body[i : i + 100] for i in range(0, len(body), 100))
        r = c.post("/v1/completions", content=chunks, headers={**ok, "Content-Type": "application/json"})
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
        assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]


def test_update_weights_loads_strictly(tokenizer, tmp_path, caplog):
    model, new = served_model(tokenizer, seed=0), served_model(tokenizer, seed=5)
    save_file({k: v.contiguous() for k, v in new.state_dict().items()}, str(tmp_path / "new.safetensors"))
    small = served_model(tokenizer, seed=0, hidden=16)
    save_file(dict(small.state_dict()), str(tmp_path / "small.safetensors"))
    save_file({"not.a.weight": torch.zeros(2)}, str(tmp_path / "extra.safetensors"))
    nan = {k: v.contiguous().clone() for k, v in new.state_dict().items()}
    nan["lm_head.weight"][0, 0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    ids = tokenizer("12+34=")["input_ids"]
    with TestClient(build_app(model, tokenizer, ServeArgs(model_dir="tiny", weights_root=str(tmp_path)))) as c:
        def scores():
            entries = complete(c, prompt=ids, max_tokens=0, prompt_logprobs=1)["choices"][0]["prompt_logprobs"]
            return [e[str(t)]["logprob"] for e, t in zip(entries[1:], ids[1:])]

        def taken(m):
            return sequence_logp(m, ids).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()

        assert scores() == pytest.approx(taken(served_model(tokenizer, seed=0)), abs=1e-5)
        r = c.post("/opd/update_weights", json={"path": str(tmp_path / "new.safetensors")})
        assert r.status_code == 200 and r.json()["weights_version"] == 1
        assert scores() == pytest.approx(taken(new), abs=1e-5)
        for name, needle in (("small.safetensors", "shape mismatch"), ("extra.safetensors", "unexpected"),
                             ("absent.safetensors", "no safetensors"), ("nan.safetensors", "not finite")):
            caplog.clear()
            r = c.post("/opd/update_weights", json={"path": str(tmp_path / name)})
            message = r.json()["error"]["message"]
            # the client learns that it was refused; which files exist and what is in them goes to the server's log
            assert r.status_code == 400 and "did not load" in message, r.text
            assert name not in message and "weight" not in message.replace("weights", "")
            assert needle in caplog.text
        assert scores() == pytest.approx(taken(new), abs=1e-5)  # a refused file changes nothing
        assert c.get("/health").json()["weights_version"] == 1
        # found by the reliability fuzzer: a path with a newline (and an unpaired surrogate) still gets one line
        r = c.post("/opd/update_weights", content=b'{"path": "/nonexistent/a\\nb\\udc80"}',
                   headers={"content-type": "application/json"})
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and "\n" not in message and "did not load" in message, r.text


def test_update_weights_reads_only_regular_files_under_its_root(tokenizer, tmp_path, caplog):
    """Issue 30: any readable file was loaded (`../` included), and a FIFO in a pushed directory froze the server."""
    import os

    model, new = served_model(tokenizer, seed=0), served_model(tokenizer, seed=5)
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    weights = {k: v.contiguous() for k, v in new.state_dict().items()}
    save_file(weights, str(outside / "w.safetensors"))
    (root / "link.safetensors").symlink_to(outside / "w.safetensors")
    (root / "linkdir").symlink_to(outside)
    fifo_dir = root / "fifo"
    fifo_dir.mkdir()
    save_file(weights, str(fifo_dir / "a.safetensors"))
    os.mkfifo(fifo_dir / "b.safetensors")
    with TestClient(build_app(model, tokenizer, ServeArgs(model_dir="tiny", weights_root=str(root)))) as c:
        for path in (str(outside / "w.safetensors"), "../outside/w.safetensors", str(root / "link.safetensors"),
                     str(root / "linkdir"), "linkdir/w.safetensors", str(fifo_dir), "/etc/passwd", "/dev/zero"):
            r = c.post("/opd/update_weights", json={"path": path})  # a FIFO opened would hang here
            assert r.status_code == 400 and str(outside) not in r.text, (path, r.text)
        assert "not a regular file" in caplog.text and "outside the weights root" in caplog.text
        assert c.get("/health").json()["weights_version"] == 0
        save_file(weights, str(root / "ok.safetensors"))
        assert c.post("/opd/update_weights", json={"path": "ok.safetensors"}).status_code == 200  # under the root
    with TestClient(build_app(model, tokenizer, ServeArgs(model_dir="tiny"))) as c:  # no root: no pushes at all
        r = c.post("/opd/update_weights", json={"path": str(root / "ok.safetensors")})
        assert r.status_code == 403 and "--weights-root" in r.json()["error"]["message"]


def test_foreign_host_names_are_refused(model, tokenizer):
    """Issue 30: a push with a foreign Host header was accepted, so DNS rebinding reached the server from a browser."""
    with TestClient(build_app(model, tokenizer, ServeArgs(model_dir="tiny"))) as c:
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "app.localhost"):
            assert c.get("/v1/models", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            r = c.post("/opd/update_weights", json={"path": "x"}, headers={"host": host})
            assert r.status_code == 421 and "--allowed-hosts" in r.json()["error"]["message"], host
            assert c.get("/v1/models", headers={"host": host}).status_code == 421
        assert c.get("/health", headers={"host": "evil.example"}).status_code == 200  # open, tells nothing
    args = ServeArgs(model_dir="tiny", allowed_hosts=("gpu-box.lan",))
    with TestClient(build_app(model, tokenizer, args)) as c:
        assert c.get("/v1/models", headers={"host": "gpu-box.lan:8000"}).status_code == 200
        assert c.get("/v1/models", headers={"host": "evil.example"}).status_code == 421


def test_the_server_key_comes_from_the_environment_and_an_open_host_warns(monkeypatch, caplog):
    from opd.lm.serve.app import resolved_args

    monkeypatch.setenv("OPD_API_KEY", "from-env")
    assert resolved_args(ServeArgs(model_dir="m")).api_key == "from-env"
    assert resolved_args(ServeArgs(model_dir="m", api_key="flag")).api_key == "flag"
    assert "no API key" not in caplog.text
    monkeypatch.delenv("OPD_API_KEY")
    resolved_args(ServeArgs(model_dir="m"))
    assert "no API key" not in caplog.text  # loopback
    resolved_args(ServeArgs(model_dir="m", host="0.0.0.0"))
    assert "0.0.0.0 listens beyond this machine with no API key" in caplog.text


def test_a_long_prompt_does_not_stall_the_other_clients(model, tokenizer):
    """Issue 30: tokenization ran on the event loop, and one 15 MB prompt froze every client for 21 s before its
    400. It runs in a worker thread now: /health answers while it tokenizes."""
    import threading
    import time

    with TestClient(build_app(model, tokenizer, ServeArgs(model_dir="tiny"))) as c:
        done = threading.Event()
        result = {}

        def long_prompt():
            result["status"] = c.post("/v1/completions", json={"prompt": "1+2=" * 600_000, "max_tokens": 1}
                                      ).status_code
            done.set()

        thread = threading.Thread(target=long_prompt)
        thread.start()
        time.sleep(0.3)  # the body is parsed, the tokenizer has started
        start = time.monotonic()
        assert c.get("/health").status_code == 200
        waited = time.monotonic() - start
        still_tokenizing = not done.is_set()
        thread.join()
    assert result["status"] == 400  # over the context
    assert still_tokenizing and waited < 0.5, waited


def test_a_client_that_hangs_up_leaves_the_queue(model, tokenizer, monkeypatch):
    """Issue 30: a client that disconnected left its work running (five abandoned heavy requests made the next
    1-token request wait 40.8 s). A job whose client is gone before its batch starts is dropped from the queue."""
    import socket
    import threading
    import time

    import opd.lm.serve.engine as engine_module

    gate, ran = threading.Event(), []
    real_run_rows = engine_module.run_rows

    def gated_run_rows(model, rows, *rest):
        gate.wait(30)  # the first batch holds the model while the abandoned requests queue up behind it
        ran.append(len(rows))
        return real_run_rows(model, rows, *rest)

    monkeypatch.setattr(engine_module, "run_rows", gated_run_rows)
    app = build_app(model, tokenizer, ServeArgs(model_dir="tiny", batch_window_ms=1))
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        first = threading.Thread(target=lambda: httpx.post(f"{url}/v1/completions", timeout=60,
                                                           json={"prompt": "1+1=", "max_tokens": 1}))
        first.start()
        time.sleep(0.3)
        body = json.dumps({"prompt": "1+1=", "max_tokens": 8, "n": 4}).encode()
        for _ in range(3):  # send, then hang up without reading the answer
            with socket.create_connection((host, int(port))) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                time.sleep(0.05)
        time.sleep(1.5)  # the server notices the hang-ups (it checks twice a second)
        gate.set()
        first.join()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "2+2=", "max_tokens": 1}, timeout=60)
        assert r.status_code == 200
    assert ran == [1, 1], ran  # the first request and the last: none of the abandoned 3 x 4 rows


def test_a_full_queue_is_refused_at_once_with_503_and_retry_after(model, tokenizer, monkeypatch):
    """Issue 30: the queue had no bound. With --max-queued-seqs 4, the sequences waiting behind a running batch stop
    at 4: the next request gets 503 (which opd's clients retry) instead of waiting, and the queue drains normally."""
    import threading
    import time

    import opd.lm.serve.engine as engine_module

    gate = threading.Event()
    real_run_rows = engine_module.run_rows
    monkeypatch.setattr(engine_module, "run_rows", lambda *a: (gate.wait(30), real_run_rows(*a))[1])
    app = build_app(model, tokenizer, ServeArgs(model_dir="tiny", batch_window_ms=1, max_queued_seqs=4))
    with live_server(app) as url:
        def post(n):
            return httpx.post(f"{url}/v1/completions", json={"prompt": "1+1=", "max_tokens": 1, "n": n}, timeout=60)

        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(post, 1)  # taken by the worker: holds the model
            time.sleep(0.3)
            waiting = [pool.submit(post, 2) for _ in range(2)]  # 4 sequences wait
            time.sleep(0.3)
            refused = post(1)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
            assert "waiting for the model" in refused.json()["error"]["message"]
            gate.set()
            assert [f.result().status_code for f in (running, *waiting)] == [200, 200, 200]
        assert post(4).status_code == 200  # drained: the bound counts only what waits


def test_oversized_headers_close_the_connection(model, tokenizer):
    """Issue 30: 32 MB of headers were accepted. `opd serve` runs uvicorn on h11 with --max-header-bytes."""
    from opd.lm.serve.http import uvicorn_config

    args = ServeArgs(model_dir="tiny", max_header_bytes=8192)
    with live_server(build_app(model, tokenizer, args), config=lambda app, port: uvicorn_config(
            app, args, host="127.0.0.1", port=port, log_level="warning")) as url:
        assert httpx.get(f"{url}/health", headers={"X-Pad": "a" * 4000}).status_code == 200
        try:
            status = httpx.get(f"{url}/health", headers={"X-Pad": "a" * 200_000}).status_code
        except httpx.HTTPError:  # closed without an answer
            status = None
        assert status in (None, 400, 431), status


def test_a_request_that_does_not_arrive_in_time_closes_its_connection(model, tokenizer):
    """Issue 30: slow connections were never closed. A client that connects and says nothing, or dribbles its request
    head a header at a time, is cut off --read-timeout seconds after it started; a prompt request is served."""
    import socket
    import time

    from opd.lm.serve.http import uvicorn_config

    args = ServeArgs(model_dir="tiny", read_timeout=1.0)
    with live_server(build_app(model, tokenizer, args), config=lambda app, port: uvicorn_config(
            app, args, host="127.0.0.1", port=port, log_level="warning")) as url:
        host, port = url.removeprefix("http://").split(":")

        def closed_after(dribble: list[bytes]) -> float:
            """Seconds until the server hangs up, while sending `dribble` one piece every 0.25 s (then nothing)."""
            with socket.create_connection((host, int(port))) as s:
                s.settimeout(0.25)
                start = time.monotonic()
                while time.monotonic() - start < 10:
                    if dribble:
                        try:
                            s.sendall(dribble.pop(0))
                        except OSError:
                            return time.monotonic() - start
                    try:
                        if s.recv(1024) == b"":
                            return time.monotonic() - start
                    except socket.timeout:
                        continue
                    except OSError:
                        return time.monotonic() - start
                return float("inf")

        assert 0.9 < closed_after([]) < 3  # connected, never wrote
        head = [b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"] + [b"X-%d: a\r\n" % i for i in range(40)]
        assert 0.9 < closed_after(list(head)) < 3  # 40 headers over 10 s: cut off at about 1 s
        body = [b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 400\r\n\r\n{"] + [b" " * 10] * 40
        assert 0.9 < closed_after(body) < 3  # a body dribbled likewise
        kept_alive = [b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"] + head  # answered, then a second dribbled
        assert 0.9 < closed_after(kept_alive) < 3
        with httpx.Client(base_url=url) as c:  # kept alive across requests, each in time
            for _ in range(3):
                assert c.post("/v1/completions", json={"prompt": "1+1=", "max_tokens": 1}).status_code == 200
                time.sleep(0.6)
