"""RemoteTeacher / RemoteSampler against a real `opd serve`: same numbers as the local model, clear errors when down."""

import json
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from opd.lm.remote.client import BadAnswer, CompletionsClient, ServerRefused, TeacherUnreachable
from opd.lm.remote.hidden import HiddenStateTeacher
from opd.lm.remote.sampler import RemoteSampler
from opd.lm.remote.teacher import RemoteTeacher, _position_entries
from opd.lm.serve.app import ServeArgs, build_app
from opd.lm.teachers.local import LocalTeacher
from tests.lm.serve_helpers import free_port, live_server, sequence_logp, served_model


@pytest.fixture(scope="module")
def model(tokenizer):
    return served_model(tokenizer)


@pytest.fixture(scope="module")
def url(model, tokenizer):
    with live_server(build_app(model, tokenizer, ServeArgs(model_dir="tiny", batch_window_ms=2))) as u:
        yield u


def left_padded_batch(lengths: list[int], vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids_BL = torch.zeros(len(lengths), L, dtype=torch.long)
    mask_BL = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids_BL[b, L - n :] = torch.randint(4, vocab, (n,), generator=g)
        mask_BL[b, L - n :] = 1
    return ids_BL, mask_BL


def forwarding_transport(app_client: TestClient, fail_first: int = 0):
    """An httpx transport that answers 503 `fail_first` times, then hands requests to the app; counts the calls."""
    calls = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) <= fail_first:
            return httpx.Response(503, json={"error": {"message": "warming up"}})
        headers = {k: v for k, v in request.headers.items() if k != "host"}  # the app's own name, not *.test
        r = app_client.request(request.method, request.url.path, content=request.content, headers=headers)
        return httpx.Response(r.status_code, content=r.content, headers=r.headers)

    return httpx.MockTransport(handle), calls


def test_score_matches_local_topk_on_left_padded_batch(url, model, tokenizer):
    ids_BL, attn_BL = left_padded_batch([7, 12, 4], len(tokenizer))
    mask_BT = attn_BL[:, 1:].clone()
    mask_BT[:, :-3] = 0  # the last three targets of each row are the "completion"
    top_k = 3
    signal = RemoteTeacher(url, top_k=top_k).score(ids_BL, attn_BL, mask_BT)  # model=None: asks /v1/models

    with torch.no_grad():
        pos_BL = (attn_BL.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids_BL, attention_mask=attn_BL, position_ids=pos_BL).logits[:, :-1]
    logp_BTV = logits.float().log_softmax(-1)
    local_top_logp, local_top_ids = logp_BTV.topk(top_k, dim=-1)
    local_taken = logp_BTV.gather(-1, ids_BL[:, 1:, None])[..., 0]
    # Every target whose context and token are both real is scored, not only the masked ones.
    real_BT = (attn_BL[:, :-1] * attn_BL[:, 1:]).bool()
    assert torch.equal(signal.topk_ids_BTK[real_BT], local_top_ids[real_BT])
    torch.testing.assert_close(signal.topk_logp_BTK[real_BT], local_top_logp[real_BT], atol=1e-5, rtol=0)
    torch.testing.assert_close(signal.taken_logp_BT[real_BT], local_taken[real_BT], atol=1e-5, rtol=0)
    assert signal.taken_logp_BT[~real_BT].eq(float("-inf")).all()
    assert signal.topk_logp_BTK[~real_BT].eq(float("-inf")).all() and signal.topk_ids_BTK[~real_BT].eq(0).all()
    # The server's extra (k+1-th) entry for a taken token outside the top-k was met and kept out of the top-k.
    outside = (local_taken[real_BT][:, None] < local_top_logp[real_BT][:, -1:]).sum()
    assert outside > 0
    # Interchangeable with the in-process teacher on the targets that count.
    local = LocalTeacher(model).score(ids_BL, attn_BL, mask_BT)
    torch.testing.assert_close(signal.taken_logp_BT[mask_BT.bool()], local.taken_logp_BT[mask_BT.bool()], atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("seqs_per_request", [16, 5, 1])
def test_many_rows_over_concurrent_requests_each_get_their_own_scores(url, model, tokenizer, seqs_per_request):
    # 45 rows of 2..24 tokens: several requests in flight at once (max_concurrency 4), which the server batches
    # together and splits again; every row must get back its own answer
    lengths = [2 + (7 * b) % 23 for b in range(45)]
    ids_BL, attn_BL = left_padded_batch(lengths, len(tokenizer), seed=1)
    mask_BT = attn_BL[:, :-1] * attn_BL[:, 1:]
    top_k = 3
    teacher = RemoteTeacher(url, model="tiny", top_k=top_k, seqs_per_request=seqs_per_request, max_concurrency=4)
    signal = teacher.score(ids_BL, attn_BL, mask_BT)
    L = ids_BL.shape[1]
    for b, n in enumerate(lengths):
        row = ids_BL[b, L - n :].tolist()
        logp_TV = sequence_logp(model, row)  # this row alone
        top_logp, top_ids = logp_TV.topk(top_k, dim=-1)
        span = slice(L - n, L - 1)
        assert torch.equal(signal.topk_ids_BTK[b, span], top_ids), b
        torch.testing.assert_close(signal.topk_logp_BTK[b, span], top_logp, atol=1e-5, rtol=0)
        taken = logp_TV.gather(1, torch.tensor(row[1:])[:, None])[:, 0]
        torch.testing.assert_close(signal.taken_logp_BT[b, span], taken, atol=1e-5, rtol=0)


def test_score_skips_rows_without_targets_and_rejects_masks_on_padding(url, tokenizer):
    teacher = RemoteTeacher(url, model="tiny", top_k=2)
    ids_BL, attn_BL = left_padded_batch([5, 3], len(tokenizer))
    mask_BT = torch.zeros(2, 4, dtype=torch.long)
    mask_BT[0, -1] = 1
    signal = teacher.score(ids_BL, attn_BL, mask_BT)
    assert torch.isfinite(signal.taken_logp_BT[0]).all() and signal.taken_logp_BT[1].eq(float("-inf")).all()
    mask_BT[1, 0] = 1  # target 0 of row 1 is padding
    with pytest.raises(ValueError, match="without context"):
        teacher.score(ids_BL, attn_BL, mask_BT)
    teacher.close()  # what distill does when it ends: the connection pool is closed
    assert teacher.client._http.is_closed


def test_position_entries_use_ranks_and_drop_the_extra_taken_token():
    entries = {
        "7": {"logprob": -3.0, "rank": 5, "decoded_token": "7"},  # the prompt token, outside the top-2
        "4": {"logprob": -1.2, "rank": 2, "decoded_token": "4"},
        "1": {"logprob": -0.5, "rank": 1, "decoded_token": "1"},
    }
    assert _position_entries(entries, 7, 2) == ([1, 4], [-0.5, -1.2], -3.0)
    assert _position_entries({k: entries[k] for k in ("4", "1")}, 4, 2) == ([1, 4], [-0.5, -1.2], -1.2)
    # A prompt token tied with the k-th one has rank <= k but is still the extra entry, not part of the top-k.
    tied = {"7": {"logprob": -1.2, "rank": 2, "decoded_token": "7"}, "1": entries["1"], "4": entries["4"]}
    assert _position_entries(tied, 7, 2) == ([1, 4], [-0.5, -1.2], -1.2)
    with pytest.raises(RuntimeError, match="lack the prompt token"):
        _position_entries(entries, 9, 2)


def test_sampler_returns_the_models_logprobs_and_is_seeded(url, model, tokenizer):
    sampler = RemoteSampler(url + "/v1", model="tiny")  # OpenAI-client style URL works too
    prompts = [tokenizer("1+2=")["input_ids"], tokenizer("1+2=")["input_ids"], tokenizer("40+5=")["input_ids"]]
    ids, logps = sampler.sample(prompts, max_new_tokens=8, temperature=1.0, seed=7)
    again_ids, again_logps = sampler.sample(prompts, max_new_tokens=8, temperature=1.0, seed=7)
    assert again_ids == ids  # log-probs may differ in the last float bit: the batches are made up differently
    assert [x for lp in again_logps for x in lp] == pytest.approx([x for lp in logps for x in lp], abs=1e-5)
    assert ids[0] != ids[1]  # equal prompts get different seeds
    for prompt, gen, lp in zip(prompts, ids, logps):
        assert 1 <= len(gen) == len(lp) <= 8
        assert gen[-1] == tokenizer.eos_token_id or len(gen) == 8
        logp_LV = sequence_logp(model, prompt + gen)
        expected = [logp_LV[len(prompt) - 1 + i, t].item() for i, t in enumerate(gen)]
        assert lp == pytest.approx(expected, abs=1e-4)


def test_transient_errors_are_retried(model, tokenizer):
    with TestClient(build_app(model, tokenizer, ServeArgs(model_dir="tiny"))) as app_client:
        transport, calls = forwarding_transport(app_client, fail_first=2)
        teacher = RemoteTeacher("http://teacher.test", model="tiny", top_k=2, backoff=0.001, transport=transport)
        ids_BL, attn_BL = left_padded_batch([4], len(tokenizer))
        signal = teacher.score(ids_BL, attn_BL, attn_BL[:, 1:])
    assert len(calls) == 3 and torch.isfinite(signal.taken_logp_BT).all()


def test_client_errors_are_not_retried(model, tokenizer):
    args = ServeArgs(model_dir="tiny", api_key="k")
    with TestClient(build_app(model, tokenizer, args)) as app_client:
        transport, calls = forwarding_transport(app_client)
        ids_BL, attn_BL = left_padded_batch([4], len(tokenizer))
        too_many = RemoteTeacher("http://t.test", model="tiny", top_k=21, api_key="k", transport=transport)
        with pytest.raises(RuntimeError, match="HTTP 400.*max-logprobs") as err:
            too_many.score(ids_BL, attn_BL, attn_BL[:, 1:])
        assert not isinstance(err.value, TeacherUnreachable) and len(calls) == 1
        no_key = RemoteSampler("http://t.test", model="tiny", transport=transport)
        with pytest.raises(RuntimeError, match="HTTP 401"):
            no_key.sample([[5, 6]], max_new_tokens=2)
        assert len(calls) == 2


def test_unreachable_server_raises_one_clear_error(tokenizer):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    teacher = RemoteTeacher(url, model="tiny", timeout=0.5, max_retries=2, backoff=0.01)
    ids_BL, attn_BL = left_padded_batch([4], len(tokenizer))
    start = time.monotonic()
    with pytest.raises(TeacherUnreachable, match=rf"{url}/v1/completions did not answer after 3 attempts") as err:
        teacher.score(ids_BL, attn_BL, attn_BL[:, 1:])
    assert time.monotonic() - start < 5
    assert "\n" not in str(err.value) and "opd serve" in str(err.value)


def test_the_clients_send_a_key_and_say_so_when_it_is_refused(model, tokenizer, monkeypatch, tmp_path):
    """Issue 30: opd train could not send a key to a teacher or sampler, and a 401 read 'not an OpenAI server'."""
    from opd.config import DistillConfig, save_config

    monkeypatch.delenv("OPD_API_KEY", raising=False)
    with TestClient(build_app(model, tokenizer, ServeArgs(model_dir="tiny", api_key="k"))) as app_client:
        transport, _ = forwarding_transport(app_client)
        with pytest.raises(ValueError, match="the server refused the key: pass --remote-api-key or set OPD_API_KEY"):
            RemoteTeacher("http://t.test", top_k=2, transport=transport).check(tokenizer, len(tokenizer))
        with pytest.raises(ServerRefused, match="the server refused the key: pass --remote-api-key or set OPD_API_KEY"):
            RemoteSampler("http://t.test", model="tiny", transport=transport).sample([[5, 6]], max_new_tokens=2)
        monkeypatch.setenv("OPD_API_KEY", "k")  # what the clients send when no key is passed
        ids, logps = RemoteSampler("http://t.test", model="tiny", transport=transport).sample([[5, 6]],
                                                                                           max_new_tokens=2)
        # answered: up to 2 tokens, each with its log-prob (an unseeded sample may end at once with end-of-sequence)
        assert len(ids) == 1 and 1 <= len(ids[0]) <= 2 and len(logps[0]) == len(ids[0])
        monkeypatch.delenv("OPD_API_KEY")
        hidden = HiddenStateTeacher("http://t.test", api_key="k", transport=transport)
        assert hidden.vocab_size() == model.get_output_embeddings().weight.shape[0]
    cfg = DistillConfig(student="s", teacher="http://t.test/v1", remote_api_key="secret", out_dir=str(tmp_path))
    save_config(cfg, tmp_path)
    assert "secret" not in (tmp_path / "config.json").read_text()  # the record of a run holds no key


def fake_server(answer):
    """An httpx transport whose server answers `answer(path, body)`: an httpx.Response, or a JSON-able value."""
    def handle(request: httpx.Request) -> httpx.Response:
        out = answer(request.url.path, json.loads(request.content) if request.content else None)
        # json.dumps writes NaN and Infinity, as a broken server's JSON library would (httpx's json= refuses them)
        return out if isinstance(out, httpx.Response) else httpx.Response(200, content=json.dumps(out).encode())

    return httpx.MockTransport(handle)


def scoring_answer(body, logp=-0.1, top_id=None):
    """A vLLM prompt_logprobs answer with k=1: each prompt token at `logp`, or `top_id` ranked above it."""
    def entry(t):
        if top_id is None:
            return {str(t): {"logprob": logp, "rank": 1}}
        return {str(t): {"logprob": -5.0, "rank": 2}, str(top_id): {"logprob": logp, "rank": 1}}

    return {"choices": [{"index": i, "prompt_token_ids": seq, "prompt_logprobs": [None] + [entry(t) for t in seq[1:]]}
                        for i, seq in enumerate(body["prompt"])]}


def one_line_bad_answer(call, url="t.test"):
    with pytest.raises(BadAnswer) as err:
        call()
    # a TeacherUnreachable: the training loop saves a checkpoint and stops with this one line
    assert isinstance(err.value, TeacherUnreachable) and url in str(err.value) and "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("bad", [dict(logp=float("nan")), dict(logp=0.5), dict(logp=float("-inf")),
                                 dict(top_id=-1), dict(top_id=50), "no choices", "not json"])
def test_the_remote_teacher_refuses_a_bad_answer(bad):
    """Issue 30: NaN and positive log-probs were let in (a tail bucket of 168), a negative top-k id crashed CUDA."""
    def answer(path, body):
        if bad == "no choices":
            return {"choices": []}
        if bad == "not json":
            return httpx.Response(200, content=b"<html>hi</html>")
        return scoring_answer(body, **bad)

    teacher = RemoteTeacher("http://t.test", model="m", top_k=1, transport=fake_server(answer), max_retries=0)
    teacher.vocab_size = 50
    ids_BL, attn_BL = left_padded_batch([4, 3], 50)
    mask_BT = attn_BL[:, 1:] * attn_BL[:, :-1]
    one_line_bad_answer(lambda: teacher.score(ids_BL, attn_BL, mask_BT))
    good = RemoteTeacher("http://t.test", model="m", top_k=1,
                         transport=fake_server(lambda path, body: scoring_answer(body)))
    good.vocab_size = 50
    assert torch.isfinite(good.score(ids_BL, attn_BL, mask_BT).topk_logp_BTK[mask_BT.bool()]).all()


@pytest.mark.parametrize("ids,logps", [([5, 50], [-1.0, -1.0]), ([-1], [-1.0]), ([1, 2, 3], [-1.0] * 3),
                                       ([1], [float("nan")]), ([1], [float("inf")]), ([1], [0.7]), ([1, 2], [-1.0]),
                                       (None, None)])
def test_the_remote_sampler_refuses_a_bad_answer(ids, logps):
    """Issue 30: token ids >= V or negative, more tokens than asked and NaN/inf log-probs came through."""
    def answer(path, body):
        if ids is None:
            return {"choices": []}
        return {"choices": [{"index": 0, "token_ids": ids, "logprobs": {"token_logprobs": logps}}]}

    sampler = RemoteSampler("http://t.test", model="m", transport=fake_server(answer), max_retries=0)
    sampler.vocab_size = 50
    one_line_bad_answer(lambda: sampler.sample([[1, 2]], max_new_tokens=2))


def test_the_hidden_state_teacher_refuses_nan_states(model, tokenizer):
    from opd.lm.serve.wire import decode_array, encode_array

    with TestClient(build_app(model, tokenizer, ServeArgs(model_dir="tiny"))) as app_client:
        forward, _ = forwarding_transport(app_client)

        def nan_states(request):
            r = forward.handle_request(request)
            if request.url.path != "/opd/hidden_states":
                return r
            body = json.loads(r.read())
            for d in body["data"]:
                d["hidden"] = encode_array(decode_array(d["hidden"], "float32") * float("nan"), "float32")
            return httpx.Response(200, json=body)

        teacher = HiddenStateTeacher("http://t.test", model="tiny", transport=httpx.MockTransport(nan_states))
        ids_BL, attn_BL = left_padded_batch([4], len(tokenizer))
        assert "NaN" in one_line_bad_answer(lambda: teacher.score(ids_BL, attn_BL, attn_BL[:, 1:]))


def test_a_slow_large_redirecting_or_shouting_server_is_cut_short():
    """Issue 30: a per-chunk timeout let a slow server hold a 2 s call for 15 s; answers had no size limit; a redirect
    or a 5 MB error message with terminal escapes came through unfiltered."""
    def drip():
        for _ in range(40):
            time.sleep(0.1)
            yield b" "
        yield b"{}"

    slow = CompletionsClient("http://t.test", timeout=0.5, max_retries=0,
                             transport=httpx.MockTransport(lambda r: httpx.Response(200, content=drip())))
    start = time.monotonic()
    with pytest.raises(TeacherUnreachable, match="took over 0.5 s"):
        slow.post("/v1/completions", {})
    assert time.monotonic() - start < 1.5
    big = {"choices": [], "pad": "x" * 5000}
    for transport in (fake_server(lambda path, body: big),  # declared length
                      httpx.MockTransport(lambda r: httpx.Response(200, content=iter([json.dumps(big).encode()])))):
        capped = CompletionsClient("http://t.test", max_answer_bytes=1000, transport=transport)
        assert "over the client's limit of 1000 bytes" in one_line_bad_answer(lambda c=capped: c.post("/x", {}))
    moved = CompletionsClient("http://t.test", transport=httpx.MockTransport(
        lambda r: httpx.Response(302, headers={"location": "http://elsewhere.test/" + "a" * 5000})))
    assert "redirected (HTTP 302)" in (message := one_line_bad_answer(lambda: moved.post("/x", {})))
    assert len(message) < 400
    shout = {"error": {"message": "\x1b[31mALERT\r\n" + "A" * 5_000_000}}
    loud = CompletionsClient("http://t.test", transport=httpx.MockTransport(lambda r: httpx.Response(400, json=shout)))
    with pytest.raises(ServerRefused) as err:
        loud.post("/x", {})
    message = str(err.value)
    assert "ALERT" in message and len(message) < 500 and not any(c in message for c in "\x1b\r\n")
