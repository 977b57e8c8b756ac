"""`distill --sampler`: student rollouts from an `opd serve` of the student, weight pushes, importance ratios."""

import json
import math
import os
import signal
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from opd.config import DistillConfig, OptimArgs, SamplingArgs
from opd.lm.hf.model import load_model
from opd.lm.remote.sampler import RemoteSampler
from opd.lm.batch import encode_prompts
from opd.lm.rollouts.local import sample
from opd.lm.serve import app as serve
from opd.lm.serve.app import ServeArgs, build_app, load_served
from opd.lm.rollouts.server import ServerRollouts
from opd.lm.teachers.local import LocalTeacher
from opd.lm.train import TrainingError, distill, student_loss
from opd.tasks import get_task
from tests.lm.serve_helpers import live_server


def cfg_for(dirs, out, sampler, **kw) -> DistillConfig:
    base = dict(
        student=dirs["student"], teacher=dirs["teacher"], sampler=sampler, steps=3, batch_size=4, train_examples=64,
        eval_examples=4, eval_every=0, save_every=100, sampling=SamplingArgs(max_new_tokens=8), out_dir=str(out),
        progress=False, optim=OptimArgs(lr=1e-2, warmup_steps=1),
    )
    base.update(kw)
    return DistillConfig(**base)


def student_server(dirs, weights_root):
    """`opd serve` of the student, taking weight pushes from under `weights_root` (the runs' out dirs)."""
    args = ServeArgs(model_dir=dirs["student"], device="cpu", batch_window_ms=2, weights_root=str(weights_root))
    return build_app(*load_served(args), args)


@pytest.fixture(scope="module")
def sampler_url(model_dirs, tmp_path_factory):
    with live_server(student_server(model_dirs, tmp_path_factory.getbasetemp())) as url:
        yield url


def version(url: str) -> int:
    return httpx.get(f"{url}/health").json()["weights_version"]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("source,loss", [("student", "reverse_kl"), ("student", "sampled"), ("mixture", "jsd")])
def test_a_synced_sampler_samples_from_the_student_being_trained(model_dirs, tmp_path, sampler_url, source, loss):
    before = version(sampler_url)
    distill(cfg_for(model_dirs, tmp_path, sampler_url + "/v1", source=source, loss=loss, lmbda=0.7))
    assert version(sampler_url) == before + 3  # one push per update (sync_every=1), the first before step 0
    on_policy = [m for m in metrics(tmp_path) if m["source"] == "student"]
    assert on_policy and all(m["completion_tokens"] > 0 for m in on_policy)
    # Same weights on both sides and the server's log-probs in the right target positions: ratio 1 at every token.
    for m in on_policy:
        assert m["is_ratio_mean"] == pytest.approx(1.0, abs=1e-4) and m["is_ratio_clipped"] == 0.0, m
        assert m["sampler_kl"] < 1e-8, m
    assert all("is_ratio_mean" not in m for m in metrics(tmp_path) if m["source"] == "data")
    # Only the last pushed weights are kept, under their final name.
    assert [p.name for p in (tmp_path / "sampler_weights").iterdir()] == ["step-00000002"]


def test_a_stale_sampler_drifts_until_the_next_push(model_dirs, tmp_path, sampler_url):
    before = version(sampler_url)
    distill(cfg_for(model_dirs, tmp_path, sampler_url, steps=5, sync_every=3))
    assert version(sampler_url) == before + 2  # pushes before steps 0 and 3
    kl = [m["sampler_kl"] for m in metrics(tmp_path)]
    assert kl[0] < 1e-8 and kl[3] < 1e-8, kl  # right after a push
    assert min(kl[1], kl[2], kl[4]) > 1e-5, kl  # one or two updates behind (measured: 2e-4 and more)


def test_a_resumed_run_pushes_its_weights_and_continues_bit_for_bit(model_dirs, tmp_path, sampler_url):
    before = version(sampler_url)
    distill(cfg_for(model_dirs, tmp_path / "a", sampler_url, steps=4))
    distill(cfg_for(model_dirs, tmp_path / "b", sampler_url, steps=2))
    distill(cfg_for(model_dirs, tmp_path / "b", sampler_url, steps=4, resume=True))
    assert version(sampler_url) == before + 4 + 2 + 2
    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metrics(tmp_path / "b")] == [1, 2, 3, 4]
    # Resuming off the sync schedule: the server holds the weights of the last push (step 0), the resumed run
    # must push its own before sampling.
    distill(cfg_for(model_dirs, tmp_path / "c", sampler_url, steps=2, sync_every=3))
    distill(cfg_for(model_dirs, tmp_path / "c", sampler_url, steps=3, sync_every=3, resume=True))
    assert metrics(tmp_path / "c")[2]["sampler_kl"] < 1e-8


def test_a_dead_sampler_stops_with_a_resumable_checkpoint(model_dirs, tmp_path):
    app = student_server(model_dirs, tmp_path)
    with live_server(app) as url:
        distill(cfg_for(model_dirs, tmp_path, url, steps=2, remote_max_retries=1))
    with pytest.raises(TrainingError) as err:  # the server is gone: the resumed run fails at its first step
        distill(cfg_for(model_dirs, tmp_path, url, steps=4, remote_max_retries=1, resume=True))
    message = str(err.value)
    assert "\n" not in message and url in message
    assert "did not answer after 2 attempts" in message and "checkpoint at step 2" in message and "--resume" in message
    with live_server(app) as url:
        distill(cfg_for(model_dirs, tmp_path, url, steps=4, resume=True))
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]


def test_sampler_settings_are_checked_before_any_work(model_dirs, tmp_path):
    bad = [
        (dict(source="teacher"), "source=teacher has none"),
        (dict(source="data", loss="sft"), "source=data has none"),
        (dict(sampler="localhost:8000"), "is not a URL"),
        (dict(sync_every=0), "--sync-every must be >= 1"),
        (dict(ratio_clip=0.0), "--ratio-clip must be > 0"),
        (dict(sampler=None, source="teacher", overlap=True), "--overlap samples the student's completions; source=teacher has none"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            distill(cfg_for(model_dirs, tmp_path / "run", **{"sampler": "http://127.0.0.1:9", **kw}))
    assert not (tmp_path / "run").exists()


def test_overlap_samples_each_step_from_the_weights_pushed_one_step_before(model_dirs, tmp_path, monkeypatch):
    # What the server saw, in order: which weights it loaded, and which weights each completion was sampled with.
    events, loaded = [], ["initial"]

    def load_weights(model, path, root):
        n = real_load(model, path, root)
        loaded[0] = Path(path).name
        events.append(("load", loaded[0]))
        return n

    real_load = serve.load_weights
    monkeypatch.setattr(serve, "load_weights", load_weights)
    app = student_server(model_dirs, tmp_path)
    real_run = app.state.engine.run

    async def run(rows):
        at_start = loaded[0]
        await real_run(rows)
        assert loaded[0] == at_start, "weights swapped under a request"
        events.append(("sample", at_start))

    app.state.engine.run = run
    s0, s1, s2, s3 = (f"step-{k:08d}" for k in range(4))
    # Per run: the server's events with each batch's 4 completions (one request per prompt) collapsed into one, the
    # number of completions sampled from the step-0 weights, and the versions logged per step (minus the one before).
    expected = {
        (False, 1): ([("load", s0), ("sample", s0), ("load", s1), ("sample", s1), ("load", s2), ("sample", s2),
                      ("load", s3), ("sample", s3)], 4, [1, 2, 3, 4]),
        # Step 0 sampled in line, then step k+1 from the weights pushed at step k, while step k trains.
        (True, 1): ([("load", s0), ("sample", s0), ("load", s1), ("sample", s1), ("load", s2), ("sample", s2),
                     ("load", s3)], 8, [1, 1, 2, 3]),
        # Pushes at steps 0 and 2; step 2's rollouts were requested before step 2's push: at most sync_every old.
        (True, 2): ([("load", s0), ("sample", s0), ("load", s2), ("sample", s2)], 12, [1, 1, 1, 2]),
    }
    with live_server(app) as url:
        for (overlap, sync_every), (batches, from_s0, versions) in expected.items():
            events.clear()
            out = tmp_path / f"{overlap}-{sync_every}"
            distill(cfg_for(model_dirs, out, url, steps=4, overlap=overlap, sync_every=sync_every))
            seen = [e for i, e in enumerate(events) if e[0] == "load" or i == 0 or events[i - 1] != e]
            assert seen == batches, (overlap, sync_every, seen)
            assert sum(e == ("sample", s0) for e in events) == from_s0
            assert sum(e[0] == "sample" for e in events) == 16  # 4 steps of 4 prompts, no request left behind
            logged = [m["sampler_weights_version"] for m in metrics(out)]
            assert [v - logged[0] + 1 for v in logged] == versions
    plain, ahead = metrics(tmp_path / "False-1"), metrics(tmp_path / "True-1")
    # Same seed: same prompts and weights at step 0; after that the overlapped samples are one update stale.
    assert ahead[0]["loss"] == plain[0]["loss"] and ahead[0]["sampler_kl"] < 1e-8
    assert all(x["sampler_kl"] < 1e-8 for x in plain)
    assert min(x["sampler_kl"] for x in ahead[1:]) > 1e-5, [x["sampler_kl"] for x in ahead]


def prompts_of(run: list[dict]) -> list[int]:
    """A fingerprint of the prompts drawn: the reference completions' lengths on the data steps."""
    return [m["completion_tokens"] for m in run if m["source"] == "data"]


def test_overlap_keeps_the_mixture_coins_and_resumes_after_ctrl_c(model_dirs, tmp_path, sampler_url, monkeypatch):
    kw = dict(source="mixture", loss="jsd", lmbda=0.5, steps=6, seed=3)  # coins: student, data, s, d, s, s
    distill(cfg_for(model_dirs, tmp_path / "plain", sampler_url, **kw))
    distill(cfg_for(model_dirs, tmp_path / "ahead", sampler_url, overlap=True, **kw))
    sources = [m["source"] for m in metrics(tmp_path / "plain")]
    assert {"student", "data"} <= set(sources)
    # Only student batches are requested ahead; the coins are drawn in the same order from the same generator.
    ahead = metrics(tmp_path / "ahead")
    assert [m["source"] for m in ahead] == sources
    assert prompts_of(ahead) == prompts_of(metrics(tmp_path / "plain"))
    assert all(m["sampler_kl"] > 1e-5 for m in ahead if m["source"] == "student" and m["step"] > 1)
    # Ctrl-C during step 1 (with step 2's rollouts in flight): a checkpoint at step 2 holding the RNGs as step 2
    # starts, not as they were after drawing it ahead, so the resumed run draws the same prompts and coins.
    real_push = ServerRollouts.push

    def push_then_interrupt(self, student, accelerator, step):
        real_push(self, student, accelerator, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ServerRollouts, "push", push_then_interrupt)
    with pytest.raises(KeyboardInterrupt, match="checkpoint at step 2"):
        distill(cfg_for(model_dirs, tmp_path / "stopped", sampler_url, overlap=True, **kw))
    monkeypatch.setattr(ServerRollouts, "push", real_push)
    distill(cfg_for(model_dirs, tmp_path / "stopped", sampler_url, overlap=True, resume=True, **kw))
    resumed = metrics(tmp_path / "stopped")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert [m["source"] for m in resumed] == sources
    assert prompts_of(resumed) == prompts_of(metrics(tmp_path / "plain"))
    # Correct but not bit-for-bit: the resumed step samples from the current weights, the uninterrupted one did not.
    first = resumed[2]
    assert first["source"] != "student" or first["sampler_kl"] < 1e-8


class DiesAfter:
    """An ASGI app that answers like `app` for `completions` completion requests, then 503 to everything."""

    def __init__(self, app, completions: int):
        self.app, self.left = app, completions

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/completions":
            self.left -= 1
        if scope["type"] == "http" and self.left < 0:
            await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"gone"})
            return
        await self.app(scope, receive, send)


def test_a_sampler_dying_during_a_prefetch_stops_with_a_resumable_checkpoint(model_dirs, tmp_path):
    app = student_server(model_dirs, tmp_path)
    with live_server(DiesAfter(app, completions=8)) as url:  # step 0 and step 1's prefetch; step 2's fails
        with pytest.raises(TrainingError) as err:
            distill(cfg_for(model_dirs, tmp_path, url, steps=4, overlap=True, remote_max_retries=1))
    message = str(err.value)
    assert "\n" not in message and url in message
    assert "did not answer after 2 attempts" in message and "checkpoint at step 2" in message and "--resume" in message
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]
    with live_server(app) as url:
        distill(cfg_for(model_dirs, tmp_path, url, steps=4, overlap=True, resume=True))
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]


class LiesAfter(DiesAfter):
    """An ASGI app that answers like `app` for `completions` completion requests, then a sampled token id of -1."""

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/completions":
            self.left -= 1
            if self.left < 0:
                body = json.dumps({"choices": [{"index": 0, "token_ids": [-1], "logprobs": {"token_logprobs": [-0.1]},
                                                "text": "", "finish_reason": "length"}]}).encode()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def test_a_lying_sampler_stops_the_run_with_a_resumable_checkpoint(model_dirs, tmp_path):
    """Issue 30: token ids out of range from a sampler went into the batch (a device-side assert on CUDA, no
    checkpoint)."""
    app = student_server(model_dirs, tmp_path)
    with live_server(LiesAfter(app, completions=4)) as url:  # step 0's four prompts, then lies
        with pytest.raises(TrainingError) as err:
            distill(cfg_for(model_dirs, tmp_path, url, steps=3))
    message = str(err.value)
    assert "\n" not in message and url in message and "token ids must be integers in [0, " in message
    assert "checkpoint at step 1" in message and "--resume" in message


@pytest.mark.parametrize("shift", [3.0, -3.0])
def test_the_sampled_loss_truncates_the_importance_ratio(model_dirs, tokenizer, shift):
    student, teacher = load_model(model_dirs["student"]), load_model(model_dirs["teacher"])
    prompts = encode_prompts(tokenizer, [e.prompt for e in get_task("arithmetic").examples(4, 0, "test")], 100)
    torch.manual_seed(0)
    batch = sample(student, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, 8)
    mask_BT = batch.mask_BT.bool()
    with torch.no_grad():
        own_BT = student(batch.input_ids_BL, attention_mask=batch.attention_mask_BL).logits[:, :-1].log_softmax(-1)
        own_BT = own_BT.gather(-1, batch.targets_BT[..., None])[..., 0]
    # A sampler whose log-prob of every sampled token is off by -shift: ratio exp(shift) at every token.
    batch.sampling_logp_BT = torch.where(mask_BT, own_BT - shift, 0.0)
    signal = LocalTeacher(teacher).score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
    loss, m = student_loss(student, batch, signal, DistillConfig(student="-", loss="sampled", ratio_clip=2.0))
    advantage_N = -(batch.sampling_logp_BT - signal.taken_logp_BT)[mask_BT]
    weight = min(math.exp(shift), 2.0)
    assert loss.item() == pytest.approx((-weight * advantage_N).mean().item(), rel=1e-4)
    assert m["is_ratio_mean"] == pytest.approx(math.exp(shift), rel=1e-4)
    assert m["is_ratio_clipped"] == (1.0 if shift > 0 else 0.0)


def test_a_server_without_weight_updates_is_refused_clearly():
    transport = httpx.MockTransport(lambda request: httpx.Response(404, json={"detail": "Not Found"}))
    with pytest.raises(ValueError, match=r"has no /opd/update_weights.*opd serve"):
        RemoteSampler("http://vllm.test/v1", model="m", transport=transport).update_weights("/tmp/w")


def test_a_lora_student_pushes_merged_weights_that_sample_like_it(model_dirs, tmp_path, sampler_url):
    from opd.config import LoraArgs

    distill(cfg_for(model_dirs, tmp_path, sampler_url + "/v1", lora=LoraArgs(r=4), steps=2))
    rows = metrics(tmp_path)
    # the first batch comes from the pushed weights of the very student being trained: the merged LoRA model
    assert rows[0]["sampler_kl"] < 1e-6 and rows[0]["is_ratio_clipped"] == 0.0
    assert (tmp_path / "checkpoint" / "adapter_config.json").exists()


def test_tool_conversations_sample_each_turn_from_the_server_with_its_log_probs_on_the_own_tokens(
        model_dirs, tmp_path, sampler_url, monkeypatch):
    (tmp_path / "seven.py").write_text("def answer(turn):\n    return '7'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    distill(cfg_for(model_dirs, tmp_path / "run", sampler_url + "/v1", tools="seven:answer", max_turns=4, steps=4))
    steps = metrics(tmp_path / "run")
    assert sum(m["tool_calls"] for m in steps) > 0 and max(m["turns"] for m in steps) > 1
    # the server's log-prob of every own token lands on that token (tool answers carry none): ratio 1 everywhere
    for m in steps:
        assert m["is_ratio_mean"] == pytest.approx(1.0, abs=1e-4) and m["sampler_kl"] < 1e-8, m
