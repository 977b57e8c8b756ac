"""`opd serve`: answers are the model's own log-probs, batching does not change them, bad input gets a 4xx (keys,
sizes, the weight push and load: test_serve_limits.py)."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import tyro
from fastapi.testclient import TestClient
from transformers import GPT2Config, GPT2LMHeadModel

from opd.lm.serve.app import ServeArgs, build_app, load_served
from tests.lm.serve_helpers import complete, live_server, sequence_logp, served_model


@pytest.fixture(scope="module")
def model(tokenizer):
    return served_model(tokenizer)


@pytest.fixture(scope="module")
def client(model, tokenizer):
    with TestClient(build_app(model, tokenizer, ServeArgs(model_dir="tiny", batch_window_ms=1))) as c:
        yield c


def test_prompt_logprobs_are_the_models_with_vllm_ranks(client, model, tokenizer):
    prompts = [tokenizer("12+34=1+3+0")["input_ids"], tokenizer("7+5=")["input_ids"]]  # different lengths: padding
    out = complete(client, prompt=prompts, max_tokens=0, prompt_logprobs=3)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for ids, choice in zip(prompts, out["choices"]):
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(ids) and entries[0] is None
        logp_LV = sequence_logp(model, ids)
        for j in range(1, len(ids)):
            dist, actual = logp_LV[j - 1], ids[j]
            top = dist.topk(3).indices.tolist()
            assert set(entries[j]) == {str(t) for t in top} | {str(actual)}
            for t, e in entries[j].items():
                assert e["logprob"] == pytest.approx(dist[int(t)].item(), abs=1e-5)
                assert e["decoded_token"] == tokenizer.decode([int(t)])
                brute_rank = top.index(int(t)) + 1 if int(t) in top else int((dist > dist[int(t)]).sum()) + 1
                assert e["rank"] == brute_rank
    # A text prompt is tokenized the same way as the ids.
    text = complete(client, prompt="7+5=", max_tokens=0, prompt_logprobs=3)["choices"][0]["prompt_logprobs"]
    assert text == out["choices"][1]["prompt_logprobs"]


def test_left_padding_is_invisible_to_absolute_position_models(tokenizer):
    # GPT-2 adds learned position embeddings: wrong position ids under left padding would change its numbers
    # (Llama's rotary embeddings are blind to a constant shift, so they cannot catch that).
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    gpt2 = GPT2LMHeadModel(cfg).eval()
    prompts = [tokenizer("1+2=")["input_ids"], tokenizer("123+456=")["input_ids"]]
    with TestClient(build_app(gpt2, tokenizer, ServeArgs(model_dir="gpt2"))) as c:
        out = complete(c, prompt=prompts, max_tokens=4, temperature=0.0, prompt_logprobs=0, logprobs=0,
                       ignore_eos=True, return_token_ids=True)
    for ids, choice in zip(prompts, out["choices"]):
        full = ids + choice["token_ids"]
        logp_LV = sequence_logp(gpt2, full)
        scored = [e[str(t)]["logprob"] for e, t in zip(choice["prompt_logprobs"][1:], ids[1:])]
        assert scored == pytest.approx([logp_LV[j - 1, ids[j]].item() for j in range(1, len(ids))], abs=1e-5)
        assert choice["token_ids"] == logp_LV[len(ids) - 1 :].argmax(-1).tolist()[: len(choice["token_ids"])]
        gen_logp = [logp_LV[len(ids) - 1 + i, t].item() for i, t in enumerate(choice["token_ids"])]
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(gen_logp, abs=1e-4)


def test_echo_logprobs_cover_the_prompt(client, model, tokenizer):
    ids = tokenizer("45+6=")["input_ids"]
    choice = complete(client, prompt="45+6=", max_tokens=0, echo=True, logprobs=2)["choices"][0]
    assert choice["text"] == "45+6="
    lp = choice["logprobs"]
    assert lp["tokens"] == list("45+6=") and lp["text_offset"] == [0, 1, 2, 3, 4]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    logp_LV = sequence_logp(model, ids)
    for j in range(1, len(ids)):
        assert lp["token_logprobs"][j] == pytest.approx(logp_LV[j - 1, ids[j]].item(), abs=1e-5)
        top = logp_LV[j - 1].topk(2).indices.tolist()
        assert set(lp["top_logprobs"][j]) == {tokenizer.decode([t]) for t in top + [ids[j]]}


def test_generated_logprobs_are_the_models(client, model, tokenizer):
    ids = tokenizer("3+4=")["input_ids"]
    choice = complete(client, prompt=ids, max_tokens=8, seed=3, logprobs=2, ignore_eos=True, return_token_ids=True,
                      return_tokens_as_token_ids=True)["choices"][0]
    gen = choice["token_ids"]
    assert len(gen) == 8 and choice["finish_reason"] == "length" and choice["prompt_token_ids"] == ids
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in gen]
    logp_LV = sequence_logp(model, ids + gen)
    for i, t in enumerate(gen):
        dist = logp_LV[len(ids) - 1 + i]
        assert choice["logprobs"]["token_logprobs"][i] == pytest.approx(dist[t].item(), abs=1e-4)
        top = {f"token_id:{k}": v for v, k in zip(*dist.topk(2))} | {f"token_id:{t}": dist[t]}
        assert choice["logprobs"]["top_logprobs"][i] == pytest.approx({k: v.item() for k, v in top.items()}, abs=1e-4)


def test_processed_logprobs_are_the_tempered_nucleus(model, tokenizer):
    args = ServeArgs(model_dir="tiny", logprobs_mode="processed_logprobs")
    ids = tokenizer("9+9=")["input_ids"]
    with TestClient(build_app(model, tokenizer, args)) as c:
        choice = complete(c, prompt=ids, max_tokens=10, temperature=0.7, top_p=0.8, seed=1, logprobs=0,
                          ignore_eos=True, return_token_ids=True)["choices"][0]
    gen = choice["token_ids"]
    with torch.no_grad():
        logits_LV = model(torch.tensor([ids + gen])).logits[0].float()
    for i, t in enumerate(gen):
        probs = (logits_LV[len(ids) - 1 + i] / 0.7).softmax(-1)
        sorted_p, order = probs.sort(descending=True)
        keep = order[(sorted_p.cumsum(0) - sorted_p) < 0.8].tolist()
        assert t in keep  # never sampled outside the nucleus
        expected = (probs[t] / probs[keep].sum()).log().item()
        assert choice["logprobs"]["token_logprobs"][i] == pytest.approx(expected, abs=1e-4)


def test_greedy_follows_the_argmax(client, model, tokenizer):
    ids = tokenizer("12+9=")["input_ids"]
    gen = complete(client, prompt=ids, max_tokens=6, temperature=0.0, ignore_eos=True, return_token_ids=True)
    seq = list(ids)
    for _ in range(6):  # brute force: full forward, argmax, append
        seq.append(int(sequence_logp(model, seq + [0])[-1].argmax()))
    assert gen["choices"][0]["token_ids"] == seq[len(ids) :]


def test_seeded_sampling_is_reproducible_and_per_choice(client, tokenizer):
    body = dict(prompt=["1+1=", "1+1="], n=2, max_tokens=12, seed=11, ignore_eos=True, return_token_ids=True)
    first = [c["token_ids"] for c in complete(client, **body)["choices"]]
    again = [c["token_ids"] for c in complete(client, **body)["choices"]]
    other = [c["token_ids"] for c in complete(client, **{**body, "seed": 12})["choices"]]
    assert first == again
    assert other != first
    assert len({tuple(t) for t in first}) == 4  # same prompt twice and n=2: four different samples


def test_batch_prompts_and_n_layout_and_usage(client, tokenizer):
    prompts = [tokenizer("5+5=")["input_ids"], tokenizer("10+20=")["input_ids"]]
    out = complete(client, prompt=prompts, n=2, max_tokens=3, prompt_logprobs=1, return_token_ids=True, seed=0)
    choices = out["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["prompt_token_ids"] for c in choices] == [prompts[0], prompts[0], prompts[1], prompts[1]]
    assert choices[0]["prompt_logprobs"] == choices[1]["prompt_logprobs"] != choices[2]["prompt_logprobs"]
    generated = sum(len(c["token_ids"]) for c in choices)
    assert out["usage"] == {"prompt_tokens": 4 + 6, "completion_tokens": generated, "total_tokens": 10 + generated}


def test_concurrent_requests_are_batched_and_match_sequential(model, tokenizer):
    app = build_app(model, tokenizer, ServeArgs(model_dir="tiny", batch_window_ms=150))
    bodies = [
        dict(prompt=tokenizer(p)["input_ids"], max_tokens=6, seed=i, logprobs=1, return_token_ids=True)
        for i, p in enumerate(["1+2=", "33+44=", "5+6=", "777+1=", "8+9=", "0+0="])
    ] + [dict(prompt=tokenizer("12+34=46")["input_ids"], max_tokens=0, prompt_logprobs=2)]
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        def post(body):
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

        sequential = [post(b) for b in bodies]
        before = app.state.engine.stats["batches"]
        with ThreadPoolExecutor(len(bodies)) as pool:
            concurrent = list(pool.map(post, bodies))
        batches = app.state.engine.stats["batches"] - before
    assert batches < len(bodies)  # the worker ran several requests per batch
    for s, c in zip(sequential, concurrent):
        assert c["token_ids"] == s["token_ids"]
        if s["logprobs"] is not None:
            assert c["logprobs"]["token_logprobs"] == pytest.approx(s["logprobs"]["token_logprobs"], abs=1e-5)
    for s_entry, c_entry in zip(sequential[-1]["prompt_logprobs"][1:], concurrent[-1]["prompt_logprobs"][1:]):
        assert s_entry.keys() == c_entry.keys()
        for t in s_entry:
            assert c_entry[t]["logprob"] == pytest.approx(s_entry[t]["logprob"], abs=1e-5)


@pytest.mark.parametrize(
    "body, needle",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "empty"),
        ({"prompt": []}, "non-empty"),
        ({"prompt": [[]]}, "empty"),
        ({"prompt": [20]}, "vocabulary"),
        ({"prompt": [-1]}, "vocabulary"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [True]}, "prompt"),
        ({"prompt": 7}, "prompt"),
        ({"prompt": "1+1", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "1+1", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "1+1", "max_tokens": 5000}, "max_tokens"),
        ({"prompt": "1+1", "logprobs": 21}, "logprobs"),
        ({"prompt": "1+1", "prompt_logprobs": 100}, "prompt_logprobs"),
        ({"prompt": "1+1", "temperature": -1}, "temperature"),
        ({"prompt": "1+1", "top_p": 0}, "top_p"),
        ({"prompt": "1+1", "n": 0}, "n"),
        ({"prompt": "1+1", "seed": 2**70}, "seed"),
        ({"prompt": "1" * 200}, "over the limit"),
        ({"prompt": "1" * 100, "max_tokens": 100}, "context"),
        ({"prompt": "1+1", "stream": True}, "stream"),
        ({"prompt": ["1+1"] * 300}, "split the request"),
        ({"prompt": "1+1", "model": "other"}, "does not exist"),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_message(client, body, needle):
    r = client.post("/v1/completions", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert needle in r.json()["error"]["message"]


def test_non_json_body_is_a_400(client):
    r = client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_serves_a_saved_model_directory_parsed_like_the_cli(tokenizer, tmp_path):
    saved = served_model(tokenizer, seed=3)
    saved.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    args = tyro.cli(ServeArgs, args=[str(tmp_path), "--port", "9001", "--api-key", "k", "--dtype", "float32"])
    assert (args.model_dir, args.port, args.api_key, args.host) == (str(tmp_path), 9001, "k", "127.0.0.1")
    model, tok = load_served(args)
    ids = tokenizer("2+2=")["input_ids"]
    with TestClient(build_app(model, tok, args)) as c:
        r = c.post("/v1/completions", json={"model": str(tmp_path), "prompt": "2+2=", "max_tokens": 0,
                                            "prompt_logprobs": 0}, headers={"Authorization": "Bearer k"})
    entries = r.json()["choices"][0]["prompt_logprobs"]
    expected = sequence_logp(saved, ids)
    assert [e[str(t)]["logprob"] for e, t in zip(entries[1:], ids[1:])] == pytest.approx(
        [expected[j - 1, ids[j]].item() for j in range(1, len(ids))], abs=1e-5
    )
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_served(ServeArgs(model_dir=str(tmp_path / "nope")))
