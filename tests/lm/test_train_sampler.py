"""`distill --sampler`: student rollouts from an `opd serve` of the student, weight pushes, importance ratios."""

import json
import math
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from opd.config import DistillConfig, OptimArgs, SamplingArgs
from opd.lm.model import load_model
from opd.lm.remote import RemoteSampler
from opd.lm.rollout import encode_prompts, sample
from opd.lm.serve import ServeArgs, build_app, load_served
from opd.lm.teacher import LocalTeacher
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


def student_server(dirs):
    args = ServeArgs(model_dir=dirs["student"], device="cpu", batch_window_ms=2)
    return build_app(*load_served(args), args)


@pytest.fixture(scope="module")
def sampler_url(model_dirs):
    with live_server(student_server(model_dirs)) as url:
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
    app = student_server(model_dirs)
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
        (dict(sync_every=0), "sync_every >= 1"),
        (dict(ratio_clip=0.0), "ratio_clip > 0"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            distill(cfg_for(model_dirs, tmp_path / "run", **{"sampler": "http://127.0.0.1:9", **kw}))
    assert not (tmp_path / "run").exists()


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
