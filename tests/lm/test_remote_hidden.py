"""The hidden-state remote teacher: `opd serve`'s /opd/hidden_states and /opd/lm_head give the same loss and
gradients as the local teacher, the head's post-processing travels with it, and what cannot be sent is refused."""

import json
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import Gemma2Config, Gemma2ForCausalLM

from opd.config import DistillConfig, OptimArgs, SamplingArgs
from opd.lm.remote.hidden import HiddenStateTeacher
from opd.lm.batch import layout
from opd.lm.serve.app import ServeArgs, build_app, load_served
from opd.lm.serve.wire import decode_array, encode_array
from opd.lm.teachers.local import LocalTeacher
from opd.lm.train import distill, student_loss
from tests.conftest import tiny_llama
from tests.lm.serve_helpers import live_server, served_model


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return served_model(tokenizer, seed=1)


@pytest.fixture(scope="module")
def url(teacher, tokenizer):
    with live_server(build_app(teacher, tokenizer, ServeArgs(model_dir="teacher", batch_window_ms=1))) as u:
        yield u


def a_batch(tokenizer):
    # Prompts of different lengths (left padding) and completions of different lengths (right padding).
    prompts = [tokenizer(p)["input_ids"] for p in ("12+34=", "7+5=", "100+1=")]
    eos = [tokenizer.eos_token_id]
    completions = [tokenizer("46")["input_ids"] + eos, tokenizer("12")["input_ids"],
                   tokenizer("101")["input_ids"] + eos]
    return layout(prompts, completions, tokenizer.pad_token_id)


class Recording(httpx.HTTPTransport):
    """A real transport that keeps the hidden-state request bodies and counts the bytes of every answer."""

    def __init__(self):
        super().__init__()
        self.bodies, self.answers, self.received = [], [], 0

    def handle_request(self, request):
        response = super().handle_request(request)
        if request.url.path == "/opd/hidden_states":
            self.bodies.append(json.loads(request.read()))
            self.answers.append(json.loads(response.read()))
        self.received += len(response.read())
        return response


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "jsd", "tvd"])
def test_loss_and_gradients_equal_the_local_teachers(tokenizer, teacher, url, loss):
    batch = a_batch(tokenizer)
    cfg = DistillConfig(student="-", loss=loss)
    remote = HiddenStateTeacher(url, with_taken_logp=True)
    grads = []
    for signal in (LocalTeacher(teacher).score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT),
                   remote.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)):
        student = tiny_llama(tokenizer, 16, 1, seed=2)
        value, _ = student_loss(student, batch, signal, cfg)
        value.backward()
        grads.append((value.item(), [p.grad.clone() for p in student.parameters()], signal))
    (local_loss, local_grads, local), (remote_loss, remote_grads, sent) = grads
    remote.close()
    assert remote_loss == pytest.approx(local_loss, rel=1e-5, abs=1e-6)
    for a, b in zip(local_grads, remote_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    m = batch.mask_BT.bool()
    torch.testing.assert_close(sent.hidden_BTD[m], local.hidden_BTD[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sent.taken_logp_BT[m], local.taken_logp_BT[m], rtol=1e-5, atol=1e-5)
    assert not sent.hidden_BTD[~m].any()  # prompt-only positions never crossed the wire


def test_only_the_graded_span_crosses_the_wire_in_the_asked_precision(tokenizer, teacher, url):
    batch = a_batch(tokenizer)
    answers, spies = {}, {}
    for dtype in ("float32", "float16"):
        remote = HiddenStateTeacher(url, dtype=dtype, transport=(spy := Recording()))
        answers[dtype] = remote.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT).hidden_BTD
        spies[dtype] = spy
    body = spies["float32"].bodies[0]
    P = max(batch.prompt_lens)
    for row, (seq, start) in enumerate(zip(body["sequences"], body["start"])):
        # from the last prompt token (which predicts the first target) up to the last target
        first = P - batch.prompt_lens[row]
        assert start == batch.prompt_lens[row] - 1
        assert len(seq) == batch.prompt_lens[row] + int(batch.mask_BT[row].sum()) - 1
        assert seq == batch.input_ids_BL[row, first : first + len(seq)].tolist()
    m = batch.mask_BT.bool()
    torch.testing.assert_close(answers["float16"][m], answers["float32"][m], rtol=2e-3, atol=2e-3)
    assert not torch.equal(answers["float16"][m], answers["float32"][m])
    for dtype, itemsize in (("float32", 4), ("float16", 2)):
        # base64 of little-endian values: 4 characters per 3 bytes, D values per graded position
        data = [d["hidden"]["data"] for d in spies[dtype].answers[0]["data"]]
        positions = [len(seq) - start for seq, start in zip(body["sequences"], body["start"])]
        assert [len(x) for x in data] == [4 * -(-n * 32 * itemsize // 3) for n in positions]


def test_wire_arrays_round_trip_and_float16_overflow_is_refused():
    x = torch.randn(3, 5)
    assert torch.equal(decode_array(encode_array(x, "float32"), "float32"), x)
    assert torch.equal(decode_array(encode_array(x, "float16"), "float16"), x.half().float())
    with pytest.raises(ValueError, match="overflow float16; request dtype=float32"):
        encode_array(torch.tensor([1e6]), "float16")


def test_softcapped_logits_travel_with_the_head(tokenizer):
    # Gemma 2 soft-caps its logits: the head the client builds must do it too, or the divergence is another one.
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0,
                       pad_token_id=tokenizer.pad_token_id)
    gemma = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        gemma.lm_head.weight.mul_(20.0)  # logits far beyond the cap of 3
    batch = a_batch(tokenizer)
    with live_server(build_app(gemma, tokenizer, ServeArgs(model_dir="gemma"))) as u:
        signal = HiddenStateTeacher(u).score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
        head_answer = httpx.get(f"{u}/opd/lm_head?start=0&stop=2").json()
    assert head_answer["final_logit_softcapping"] == 3.0 and head_answer["weight"]["shape"] == [2, 32]
    m = batch.mask_BT.bool()
    with torch.no_grad():
        expected = gemma(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL).logits[:, :-1][m]
    got = signal.head(signal.hidden_BTD[m])
    assert got.abs().max() <= 3.0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_model_whose_logits_are_not_its_head_is_refused(tokenizer):
    model = served_model(tokenizer)
    model.lm_head.register_forward_hook(lambda module, args, out: out * 2)  # post-processing opd cannot know
    with TestClient(build_app(model, tokenizer, ServeArgs(model_dir="odd"))) as c:
        r = c.get("/opd/lm_head")
        assert r.status_code == 400 and "top-k payload" in r.json()["error"]["message"]
        r = c.post("/opd/hidden_states", json={"sequences": [[1, 2, 3]]})
        assert r.status_code == 400 and "top-k payload" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, needle", [
    ({"sequences": []}, "sequences"),
    ({"sequences": [[]]}, "empty"),
    ({"sequences": [[1, 999]]}, "vocabulary"),
    ({"sequences": [[1, 2]], "start": [2]}, "not a position"),
    ({"sequences": [[1, 2]], "start": [0, 1]}, "one start per sequence"),
    ({"sequences": [[1, 2]], "dtype": "bfloat16"}, "dtype"),
    ({"sequences": [[1, 2]], "model": "other"}, "does not exist"),
])
def test_bad_hidden_state_requests_get_a_4xx(tokenizer, teacher, body, needle):
    with TestClient(build_app(teacher, tokenizer, ServeArgs(model_dir="teacher"))) as c:
        r = c.post("/opd/hidden_states", json=body)
        assert 400 <= r.status_code < 500 and needle in r.json()["error"]["message"], r.text
        assert c.get("/opd/lm_head?start=5&stop=2").status_code == 400


def test_a_server_without_the_endpoint_and_a_different_vocabulary_are_refused_up_front(tokenizer, url):
    transport = httpx.MockTransport(lambda request: httpx.Response(404, json={"detail": "Not Found"}))
    with pytest.raises(ValueError, match="needs an `opd serve` teacher.*--teacher-payload topk"):
        HiddenStateTeacher("http://vllm.test/v1", transport=transport).vocab_size()
    small = torch.nn.Module()
    small.get_output_embeddings = lambda: torch.nn.Linear(4, len(tokenizer) + 1)
    with pytest.raises(ValueError, match="vocabulary has .* tokens but the student's"):
        HiddenStateTeacher(url).check_student(small)


def test_distill_against_a_live_opd_serve_with_the_hidden_payload(model_dirs, tmp_path, monkeypatch):
    scored = []
    real_score = HiddenStateTeacher.score
    monkeypatch.setattr(HiddenStateTeacher, "score", lambda self, *a: scored.append(1) or real_score(self, *a))
    args = ServeArgs(model_dir=model_dirs["teacher"], device="cpu", batch_window_ms=1)
    with live_server(build_app(*load_served(args), args)) as u:
        cfg = DistillConfig(
            student=model_dirs["student"], teacher=u + "/v1", teacher_payload="hidden", steps=3, batch_size=4,
            train_examples=32, eval_examples=4, eval_every=0, save_every=100, out_dir=str(tmp_path), progress=False,
            sampling=SamplingArgs(max_new_tokens=6), optim=OptimArgs(lr=1e-2, warmup_steps=1))
        distill(cfg)
    rows = [json.loads(line) for line in (Path(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(v > 0 and v == v for v in losses)
    assert len(scored) == 3  # every step was graded by the hidden-state teacher


def test_hidden_state_and_head_answers_have_a_size_cap(tokenizer, teacher, monkeypatch):
    """Issue 30: hidden-state and LM-head answers had no size cap (a 151k x 4096 head is ~3 GB of base64). The server
    refuses what is over --max-response-bytes; the client asks for few enough bytes per request to stay under it."""
    import opd.lm.remote.hidden as remote_hidden

    D = teacher.config.hidden_size
    args = ServeArgs(model_dir="teacher", max_response_bytes=4 * D * 4 * 4 // 3)  # 4 float32 rows
    with TestClient(build_app(teacher, tokenizer, args)) as c:
        assert c.get("/opd/lm_head?start=0&stop=4").status_code == 200
        r = c.get("/opd/lm_head?start=0&stop=5")
        assert r.status_code == 400 and "ask for at most 4 rows" in r.json()["error"]["message"]
        assert c.post("/opd/hidden_states", json={"sequences": [[1, 2, 3, 4]]}).status_code == 200
        r = c.post("/opd/hidden_states", json={"sequences": [[1, 2, 3, 4, 5]]})
        assert r.status_code == 400 and "--max-response-bytes" in r.json()["error"]["message"]
    # the client's request sizing: at most _HIDDEN_REQUEST_BYTES per request, and never an empty request
    monkeypatch.setattr(remote_hidden, "_HIDDEN_REQUEST_BYTES", 2 * D * 4 * 4 // 3)
    client = HiddenStateTeacher("http://t.test", seqs_per_request=16)
    client._hidden_size = D
    seqs = [[1, 2, 3], [1, 2], [1] * 5, [1, 2]]
    assert client._groups(seqs, [1, 0, 0, 0]) == [[0], [1], [2], [3]]
    assert client._groups([[1], [1], [1]], [0, 0, 0]) == [[0, 1], [2]]
