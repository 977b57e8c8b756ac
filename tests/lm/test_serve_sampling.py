"""`opd serve`'s sampling fields (vLLM semantics): each one changes what is sampled as vLLM's would, the log-probs
follow --logprobs-mode, nulls and neutral values change nothing, and what opd does not implement is refused."""

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import RepetitionPenaltyLogitsProcessor

from opd.lm.serve.app import ServeArgs, build_app
from tests.lm.serve_helpers import served_model


@pytest.fixture(scope="module")
def model(tokenizer):
    return served_model(tokenizer)


@pytest.fixture(scope="module")
def client(model, tokenizer):
    with TestClient(build_app(model, tokenizer, ServeArgs(model_dir="tiny", batch_window_ms=1))) as c:
        yield c


@pytest.fixture(scope="module")
def processed(model, tokenizer):
    """A server reporting the log-probs of the distribution actually sampled from."""
    args = ServeArgs(model_dir="tiny", batch_window_ms=1, logprobs_mode="processed_logprobs")
    with TestClient(build_app(model, tokenizer, args)) as c:
        yield c


def choice(client, **body) -> dict:
    r = client.post("/v1/completions", json={"return_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@torch.no_grad()
def logits_along(model, ids: list[int], gen: list[int]) -> torch.Tensor:
    """[len(gen), V]: the model's logits for each generated token given everything before it."""
    return model(torch.tensor([ids + gen])).logits[0, len(ids) - 1 : len(ids) - 1 + len(gen)].float()


PROMPT = "12+34="


def test_top_k_1_is_greedy(client, tokenizer):
    greedy = choice(client, prompt=PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)
    for seed in (0, 1, 2):
        top1 = choice(client, prompt=PROMPT, max_tokens=8, temperature=1.0, top_k=1, seed=seed, ignore_eos=True)
        assert top1["token_ids"] == greedy["token_ids"]


def test_top_k_and_min_p_sample_from_the_cut_distribution(processed, model, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    for fields, keep in (({"top_k": 3}, lambda p: p >= p.topk(3).values[-1]),
                         ({"min_p": 0.2}, lambda p: p >= 0.2 * p.max())):
        out = choice(processed, prompt=ids, max_tokens=12, temperature=1.5, seed=4, logprobs=0, ignore_eos=True,
                     **fields)
        gen = out["token_ids"]
        for i, (t, logits) in enumerate(zip(gen, logits_along(model, ids, gen))):
            p = (logits / 1.5).softmax(-1)
            kept = keep(p)
            assert kept[t], (fields, i)  # never outside the cut
            expected = (p[t] / p[kept].sum()).log().item()
            assert out["logprobs"]["token_logprobs"][i] == pytest.approx(expected, abs=1e-4)


def test_raw_logprobs_stay_the_models_whatever_the_processing(client, model, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    out = choice(client, prompt=ids, max_tokens=8, temperature=0.8, top_k=2, min_p=0.1, repetition_penalty=1.5,
                 presence_penalty=0.5, logit_bias={"5": 3.0}, seed=1, logprobs=0, ignore_eos=True)
    gen = out["token_ids"]
    raw = logits_along(model, ids, gen).log_softmax(-1)
    assert out["logprobs"]["token_logprobs"] == pytest.approx([raw[i, t].item() for i, t in enumerate(gen)], abs=1e-4)


def test_repetition_penalty_is_hfs(processed, model, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    hf = RepetitionPenaltyLogitsProcessor(penalty=1.8)
    greedy = choice(processed, prompt=ids, max_tokens=10, temperature=0.0, ignore_eos=True)["token_ids"]
    for temperature in (0.0, 1.0):
        out = choice(processed, prompt=ids, max_tokens=10, temperature=temperature, repetition_penalty=1.8, seed=2,
                     logprobs=0, ignore_eos=True)
        gen = out["token_ids"]
        for i, logits in enumerate(logits_along(model, ids, gen)):
            seen = torch.tensor([ids + gen[:i]])
            expected = hf(seen, logits[None])[0]
            if temperature == 0.0:
                assert gen[i] == int(expected.argmax())
            assert out["logprobs"]["token_logprobs"][i] == pytest.approx(
                expected.log_softmax(-1)[gen[i]].item(), abs=1e-4)
        if temperature == 0.0:
            assert gen != greedy  # the penalty did change the greedy path


def test_presence_and_frequency_penalties_count_the_output_only(processed, model, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    out = choice(processed, prompt=ids, max_tokens=10, temperature=1.0, presence_penalty=0.7, frequency_penalty=0.4,
                 seed=3, logprobs=0, ignore_eos=True)
    gen = out["token_ids"]
    for i, logits in enumerate(logits_along(model, ids, gen)):
        counts = torch.bincount(torch.tensor(gen[:i], dtype=torch.long), minlength=logits.shape[-1]).float()
        expected = (logits - 0.4 * counts - 0.7 * (counts > 0)).log_softmax(-1)
        assert out["logprobs"]["token_logprobs"][i] == pytest.approx(expected[gen[i]].item(), abs=1e-4)


def test_logit_bias_moves_the_choice(client, tokenizer):
    greedy = choice(client, prompt=PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True)["token_ids"]
    forced = tokenizer("7")["input_ids"][0]
    out = choice(client, prompt=PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={str(forced): 100})
    assert out["token_ids"] == [forced] * 4
    banned = choice(client, prompt=PROMPT, max_tokens=1, temperature=0.0, logit_bias={str(greedy[0]): -100})
    assert banned["token_ids"] != greedy[:1]


def test_min_tokens_holds_back_the_stop_token(client, tokenizer):
    eos = tokenizer.eos_token_id
    eager = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.0, "logit_bias": {str(eos): 100}}
    assert choice(client, **eager)["token_ids"] == [eos]
    out = choice(client, **eager, min_tokens=3)
    assert len(out["token_ids"]) == 4 and out["token_ids"][-1] == eos and eos not in out["token_ids"][:3]
    assert out["finish_reason"] == "stop"


def test_a_stop_string_cuts_the_text_before_it(client, tokenizer):
    full = choice(client, prompt=PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True)
    text = full["text"]
    stop = text[3:5]  # two characters, so a stop string that spans two tokens (one character each) is found
    assert len(stop) == 2 and stop not in text[:4]
    for given in (stop, [stop, "never there"]):
        out = choice(client, prompt=PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True, stop=given)
        assert (out["text"], out["finish_reason"], out["stop_reason"]) == (text[:3], "stop", stop)
        assert out["token_ids"] == full["token_ids"][:5]  # generation stopped at the token that completed it
    kept = choice(client, prompt=PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True, stop=stop,
                  include_stop_str_in_output=True)
    assert kept["text"] == text[:5]


def test_n_gives_independently_seeded_choices(client):
    body = {"prompt": PROMPT, "n": 3, "max_tokens": 10, "seed": 5, "ignore_eos": True, "return_token_ids": True}
    first = [c["token_ids"] for c in client.post("/v1/completions", json=body).json()["choices"]]
    again = [c["token_ids"] for c in client.post("/v1/completions", json=body).json()["choices"]]
    assert len(first) == 3 and len({tuple(t) for t in first}) == 3 and first == again


NEUTRAL = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


@pytest.mark.parametrize("extra", [
    NEUTRAL,  # what opd's RemoteSampler sends, so vLLM does not fill them in from generation_config.json
    {"top_k": 0, "logit_bias": {}, "stop": [], "min_tokens": 0, "best_of": 1, "use_beam_search": False,
     "length_penalty": 1.0, "response_format": {"type": "text"}},
    {name: None for name in ("model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                             "presence_penalty", "frequency_penalty", "logit_bias", "n", "stop", "stop_token_ids",
                             "logprobs", "echo", "prompt_logprobs", "ignore_eos", "min_tokens", "best_of",
                             "allowed_token_ids", "structured_outputs", "stream", "user")},
])
def test_nulls_and_neutral_values_change_nothing(client, extra):
    body = {"prompt": PROMPT, "max_tokens": 6, "seed": 9, "logprobs": 1, "ignore_eos": True}
    plain = choice(client, **body)
    same = choice(client, **{**body, **extra, "seed": 9, "ignore_eos": True})
    if extra.get("max_tokens", 0) is None:  # null max_tokens: up to the context (vLLM), so compare the prefix
        same["token_ids"] = same["token_ids"][:6]
    assert same["token_ids"] == plain["token_ids"]
    if extra.get("logprobs", 1) is not None:
        assert same["logprobs"]["token_logprobs"] == plain["logprobs"]["token_logprobs"]


@pytest.mark.parametrize("field, value, needle", [
    ("best_of", 2, "best_of"), ("use_beam_search", True, "use_beam_search"), ("allowed_token_ids", [3], "allowed"),
    ("bad_words", ["1"], "bad_words"), ("guided_json", {"type": "object"}, "guided_json"),
    ("structured_outputs", {"regex": "1"}, "structured_outputs"),
    ("response_format", {"type": "json_object"}, "response_format"), ("suffix", "x", "suffix"),
    ("length_penalty", 0.5, "length_penalty"), ("tools", [{"type": "function"}], "tools"),
    ("top_k", -2, "top_k"), ("min_p", 1.5, "min_p"), ("repetition_penalty", 0, "repetition_penalty"),
    ("presence_penalty", 2.5, "presence_penalty"), ("frequency_penalty", -3, "frequency_penalty"),
    ("logit_bias", {"99": 1.0}, "logit_bias"), ("logit_bias", {"a": 1.0}, "logit_bias"),
    ("logit_bias", {"3": "x"}, "logit_bias"), ("stop", [""], "stop"), ("stop", [1], "stop"),
    ("min_tokens", -1, "min_tokens"), ("stream", True, "stream"),
])
def test_unsupported_or_invalid_sampling_fields_are_refused_by_name(client, field, value, needle):
    r = client.post("/v1/completions", json={"prompt": PROMPT, field: value})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert needle in message and "\n" not in message
