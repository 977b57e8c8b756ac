"""`opd serve`'s /v1/chat/completions: the chat template's prompt, OpenAI's chat answer and log-probs, refusals."""

import copy

import pytest
from fastapi.testclient import TestClient

from opd.lm.serve.app import ServeArgs, build_app
from tests.lm.serve_helpers import sequence_logp, served_model

# Only characters of the arithmetic tokenizer; the template refuses a conversation that does not alternate, as many do.
TEMPLATE = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
    "{{ m['content'] }}{% if m['role'] == 'user' %}={% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} {% endif %}"
)


@pytest.fixture(scope="module")
def model(tokenizer):
    return served_model(tokenizer)


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def client(model, chat_tokenizer):
    with TestClient(build_app(model, chat_tokenizer, ServeArgs(model_dir="tiny", batch_window_ms=1))) as c:
        yield c


def chat(client, **body) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "12+34"}], **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_prompt_is_the_chat_template_with_a_generation_prompt(client, chat_tokenizer):
    out = chat(client, max_tokens=6, temperature=0.0, ignore_eos=True, return_token_ids=True)
    assert out["object"] == "chat.completion"
    assert out["prompt_token_ids"] == chat_tokenizer("12+34= ", add_special_tokens=False)["input_ids"]
    completion = client.post("/v1/completions", json={"prompt": out["prompt_token_ids"], "max_tokens": 6,
                                                      "temperature": 0.0, "ignore_eos": True}).json()
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"] == completion["choices"][0]["text"]
    assert out["usage"]["prompt_tokens"] == 7 and out["usage"]["completion_tokens"] == 6
    # OpenAI's content parts are joined, and max_completion_tokens wins over max_tokens
    parts = {"role": "user", "content": [{"type": "text", "text": "12+"}, {"type": "text", "text": "34"}]}
    r = client.post("/v1/chat/completions", json={"messages": [parts], "max_tokens": 9, "max_completion_tokens": 2,
                                                  "return_token_ids": True})
    assert r.json()["prompt_token_ids"] == chat_tokenizer("12+\n34= ", add_special_tokens=False)["input_ids"]
    assert len(r.json()["choices"][0]["token_ids"]) <= 2


def test_chat_logprobs_are_the_models_in_openais_shape(client, model, chat_tokenizer):
    out = chat(client, max_tokens=5, seed=1, logprobs=True, top_logprobs=2, ignore_eos=True, return_token_ids=True)
    prompt, gen = out["prompt_token_ids"], out["choices"][0]["token_ids"]
    logp_LV = sequence_logp(model, prompt + gen)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == len(gen)
    for i, (t, step) in enumerate(zip(gen, content)):
        dist = logp_LV[len(prompt) - 1 + i]
        assert step["logprob"] == pytest.approx(dist[t].item(), abs=1e-4)
        assert step["bytes"] == list(step["token"].encode())
        top_logp, top_ids = dist.topk(2)
        assert [e["logprob"] for e in step["top_logprobs"]] == pytest.approx(top_logp.tolist(), abs=1e-4)
        assert [e["token"] for e in step["top_logprobs"]] == [chat_tokenizer.decode([i]) for i in top_ids.tolist()]
    assert chat(client, max_tokens=2)["choices"][0]["logprobs"] is None


def test_n_stop_and_seed_work_as_in_completions(client):
    out = chat(client, n=3, max_tokens=10, seed=7, ignore_eos=True, return_token_ids=True)
    samples = [c["token_ids"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2] and len({tuple(s) for s in samples}) == 3
    assert samples == [c["token_ids"] for c in chat(client, n=3, max_tokens=10, seed=7, ignore_eos=True,
                                                   return_token_ids=True)["choices"]]
    text = chat(client, max_tokens=10, temperature=0.0, ignore_eos=True)["choices"][0]["message"]["content"]
    cut = chat(client, max_tokens=10, temperature=0.0, ignore_eos=True, stop=text[2:4])["choices"][0]
    assert (cut["message"]["content"], cut["finish_reason"], cut["stop_reason"]) == (text[:2], "stop", text[2:4])


def test_nulls_are_defaults_in_chat_too(client):
    body = dict(max_tokens=4, temperature=0.0, ignore_eos=True, return_token_ids=True)
    nulls = {name: None for name in ("model", "max_completion_tokens", "top_p", "top_k", "min_p", "n", "seed",
                                      "logprobs", "top_logprobs", "stop", "logit_bias", "presence_penalty",
                                      "chat_template_kwargs", "tools", "tool_choice", "response_format", "stream")}
    assert chat(client, **body, **nulls)["choices"] == chat(client, **body)["choices"]


@pytest.mark.parametrize("body, needle", [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "1"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text parts"),
    ({"messages": [{"role": "assistant", "content": "1"}]}, "roles must alternate"),
    ({"top_logprobs": 2}, "logprobs=true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stream": True}, "stream"),
    ({"echo": True}, "echo"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"model": "other"}, "does not exist"),
    ({"max_completion_tokens": 5000}, "max_tokens"),
])
def test_bad_chat_requests_get_a_4xx_with_one_line(client, body, needle):
    body = {"messages": [{"role": "user", "content": "1+1"}], **body}
    r = client.post("/v1/chat/completions", json=body)
    assert 400 <= r.status_code < 500, r.text
    message = r.json()["error"]["message"]
    assert needle in message and "\n" not in message


def test_a_tokenizer_without_a_chat_template_is_a_400(model, tokenizer):
    with TestClient(build_app(model, tokenizer, ServeArgs(model_dir="tiny"))) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "1+1"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
