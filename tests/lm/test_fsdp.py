"""The LM loop with the student sharded by FSDP2 over 2 CPU processes (gloo), launched as users launch it:
`accelerate launch --config_file configs/accelerate/fsdp2_cpu.yaml ...` (opd shards with torch's `fully_shard` there,
as accelerate leaves FSDP out on CPUs: opd.lm.loop.fsdp).

A sharded run is checked against one process replaying its steps: each process's batches (recorded by
tests/lm/fsdp_check.py) through `accumulate`, the gradients averaged as FSDP's reduce-scatter averages them, and the
same `update`. They agree to float32 rounding (FSDP sums the gradient norm shard by shard, and a weight whose gradient
is tiny has AdamW's g / sqrt(v) amplify any rounding): losses and gradient norms to 1e-7 absolute (measured: within
4e-9), weights after two updates to 1e-6 absolute (measured: bit for bit for the full student, within 1.4e-7 for the
LoRA adapters; 5e-7 in an earlier revision). A wrong gradient average, a missing LM-head gradient or a lost optimizer
state moves weights by about the learning rate, 1e-2.
"""

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.lm.loop.optim import lr_factor

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "configs" / "accelerate" / "fsdp2_cpu.yaml"
SCRIPT = Path(__file__).with_name("fsdp_check.py")
pytestmark = pytest.mark.slow  # each test starts two processes, each importing torch, transformers and accelerate
APPROX = {"rel": 1e-6, "abs": 1e-7}  # losses and gradient norms
TOL = {"rtol": 0, "atol": 1e-6}  # weights


DDP = ("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
"""Two DDP processes instead (tests/lm/test_distributed.py's launch)."""


def launch(*args, check=True, ddp=False) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/fsdp2_cpu.yaml ARGS` (a free port: tests may overlap)."""
    how = DDP if ddp else ("--config_file", str(CONFIG))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--main_process_port", "0", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_cli(model_dirs, out, steps, *extra, ddp=False) -> subprocess.CompletedProcess:
    """`opd train` under the FSDP config (or DDP), with the settings fsdp_check.py gives distill."""
    return launch("-m", "opd", "train", "--student", model_dirs["student"], "--teacher", model_dirs["teacher"],
                  "--steps", steps, "--batch-size", 4, "--train-examples", 64, "--eval-examples", 4, "--eval-every",
                  steps, "--sampling.max-new-tokens", 6, "--optim.lr", 1e-2, "--optim.warmup-steps", 1, "--out-dir",
                  out, "--no-progress", *extra, ddp=ddp)


def ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def full_run(model_dirs, tmp_path_factory) -> Path:
    """Two steps of a full (non-LoRA) student, sharded over two processes."""
    out = tmp_path_factory.mktemp("fsdp")
    launch(SCRIPT, model_dirs["student"], model_dirs["teacher"], out, 2)
    return out


def replay(model_dirs, seen: list[dict]):
    """One process, the sharded run's steps: every process's batch through `accumulate`, the mean of their gradients
    (what FSDP's reduce-scatter gives each shard), then `update`. Returns (student, per-process metrics per step,
    the update's metrics per step)."""
    from accelerate import Accelerator

    from opd.lm.hf.lora import load_student
    from opd.lm.hf.model import load_tokenizer
    from opd.lm.loop.build import make_teacher
    from opd.lm.loop.optim import adamw, update
    from opd.lm.train import accumulate

    cfg = seen[0]["cfg"]
    student = load_student(cfg.student, cfg.lora, None, "cpu")
    student.load_state_dict(seen[0]["start"], strict=False)  # a LoRA adapter starts where the sharded run's did
    teacher = make_teacher(cfg, student, load_tokenizer(cfg.student))
    opt = adamw(student, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, optim=cfg.optim, steps=cfg.steps))
    accelerator = Accelerator(cpu=True)
    per_process, updates = [], []
    for step in range(cfg.steps):
        per_process.append([accumulate(student, teacher, s["batches"][step], cfg, accelerator, step) for s in seen])
        for p in student.parameters():
            if p.grad is not None:
                p.grad /= len(seen)
        updates.append(update(student, opt, sched, cfg.optim, step, cfg.out_dir))
    return student, per_process, updates


def test_two_sharded_processes_train_as_one_process_on_their_two_batches(model_dirs, full_run):
    seen = ranks(full_run)
    assert [s["final_step"] for s in seen] == [2, 2]
    # the student really was sharded: DTensor parameters, each process holding half of every weight
    assert all(s["student_dtensor"] for s in seen)
    assert seen[0]["student_local_numel"] + seen[1]["student_local_numel"] == seen[0]["student_numel"]
    # the two processes trained on different completions (else averaging their gradients would go unchecked)
    assert not torch.equal(seen[0]["batches"][0].input_ids_BL, seen[1]["batches"][0].input_ids_BL)
    student, per_process, updates = replay(model_dirs, seen)
    for step in range(2):
        for r in (0, 1):  # step 2's losses come from the weights step 1 updated
            assert seen[r]["metrics"][step]["loss"] == pytest.approx(per_process[step][r]["loss"], **APPROX)
            assert seen[r]["metrics"][step]["grad_norm"] == pytest.approx(updates[step]["grad_norm"], **APPROX)
    saved = load_file(full_run / "checkpoint" / "model.safetensors")
    start = load_file(Path(model_dirs["student"]) / "model.safetensors")
    for name, p in student.state_dict().items():
        torch.testing.assert_close(saved[name], p, **TOL)
        assert (saved[name] - start[name]).abs().max() > 1e-3  # every weight moved, by about lr = 1e-2


def test_the_checkpoint_is_a_plain_hf_directory_that_eval_loads(model_dirs, full_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from opd.cli import main

    ckpt = full_run / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    start = AutoModelForCausalLM.from_pretrained(model_dirs["student"])
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in start.state_dict().items()}
    main(["eval", str(ckpt), "--examples", "4", "--out-json", str(tmp_path / "eval.json")])
    assert 0.0 <= json.loads((tmp_path / "eval.json").read_text())["accuracy"] <= 1.0


def test_opd_train_resumes_a_sharded_run_bit_for_bit(model_dirs, full_run, tmp_path):
    # the shipped command line: stop after step 1, resume to step 2; the same weights and optimizer state as the
    # uninterrupted two steps, so the gathered optimizer state went back into the right shards
    train_cli(model_dirs, tmp_path, 1)
    shutil.copytree(tmp_path, tmp_path / "ddp")
    proc = train_cli(model_dirs, tmp_path, 2, "--resume")
    assert "resuming at step 1" in proc.stderr and "done: step 2" in proc.stdout
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    a = load_file(full_run / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a, opt_b = (torch.load(d / "checkpoint" / "trainer_state.pt", weights_only=False)["optimizer"]
                    for d in (full_run, tmp_path))
    assert opt_a["state"].keys() == opt_b["state"].keys() == a.keys()  # the gathered state, keyed by parameter name
    for name, state in opt_a["state"].items():
        assert all(torch.equal(v, opt_b["state"][name][k]) for k, v in state.items())
    # the same checkpoint resumed under DDP: the optimizer state saved by name goes into an unsharded student
    train_cli(model_dirs, tmp_path / "ddp", 2, "--resume", ddp=True)
    c = load_file(tmp_path / "ddp" / "checkpoint" / "model.safetensors")
    for k in a:  # a DDP step computes as FSDP's does up to rounding (bit for bit, on the CPU we measured)
        torch.testing.assert_close(c[k], a[k], **TOL)


def test_a_ddp_checkpoint_resumes_sharded(model_dirs, full_run, tmp_path):
    # a DDP run's optimizer state is saved by position: it goes into the shards by parameter name
    train_cli(model_dirs, tmp_path, 1, ddp=True)
    train_cli(model_dirs, tmp_path, 2, "--resume")
    a = load_file(full_run / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "checkpoint" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], **TOL)


def test_a_sampler_server_samples_from_the_gathered_student(model_dirs, tmp_path):
    from opd.lm.serve.app import ServeArgs, build_app, load_served
    from tests.lm.serve_helpers import live_server

    args = ServeArgs(model_dir=model_dirs["student"], device="cpu", batch_window_ms=2, weights_root=str(tmp_path))
    with live_server(build_app(*load_served(args), args)) as url:
        train_cli(model_dirs, tmp_path / "run", 2, "--sampler", url + "/v1", "--sync-every", 1)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # before each step the main process pushed the sharded student's gathered weights: the server samples exactly as
    # the student scores (importance ratio 1), also after the first update moved every weight by about 1e-2
    assert [m["step"] for m in rows] == [1, 2]
    assert all(m["is_ratio_mean"] == pytest.approx(1.0, abs=1e-4) and m["sampler_kl"] < 1e-8 for m in rows), rows


def test_a_sharded_lora_student_trains_and_saves_its_adapter(model_dirs, tmp_path):
    launch(SCRIPT, model_dirs["student"], model_dirs["teacher"], tmp_path, 2, "--lora")
    seen = ranks(tmp_path)
    assert [s["final_step"] for s in seen] == [2, 2] and all(s["student_dtensor"] for s in seen)
    # each process made its own random adapter; all of them start from the main process's
    assert any(not torch.equal(seen[0]["loaded"][k], seen[1]["loaded"][k]) for k in seen[0]["loaded"])
    for k, v in seen[0]["loaded"].items():
        assert torch.equal(seen[0]["start"][k], v) and torch.equal(seen[1]["start"][k], v)
    ckpt = tmp_path / "checkpoint"
    assert (ckpt / "adapter_config.json").exists() and not (ckpt / "model.safetensors").exists()
    saved = load_file(ckpt / "adapter_model.safetensors")
    student, _, _ = replay(model_dirs, seen)
    replayed = {k.replace(".default", ""): v for k, v in student.state_dict().items() if "lora_" in k}
    assert saved.keys() == replayed.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, replayed[name], **TOL)
    assert any(t.abs().max() > 1e-3 for k, t in saved.items() if "lora_B" in k)  # B starts at 0: it trained


def test_the_teacher_is_a_frozen_full_copy_on_every_process(model_dirs, full_run):
    from opd.lm.hf.model import load_model

    seen = ranks(full_run)
    assert all(s["teacher_plain"] and s["teacher_frozen"] for s in seen)  # plain tensors, no FSDP wrapper
    whole = float(sum(p.double().sum() for p in load_model(model_dirs["teacher"]).parameters()))
    assert seen[0]["teacher_sum"] == seen[1]["teacher_sum"] == pytest.approx(whole, rel=1e-12)


def test_what_a_sharded_student_cannot_do_is_refused_before_any_weights_load(model_dirs, tmp_path, monkeypatch):
    from opd.config import DistillConfig, LoraArgs
    from opd.lm.loop.process import check_fsdp

    # with progress bars on, so that a weight load would show on stderr
    proc = launch("-m", "opd", "train", "--student", model_dirs["student"], "--teacher", model_dirs["teacher"],
                  "--out-dir", tmp_path, "--overlap", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("opd: error:")]
    assert proc.returncode != 0 and errors and "--overlap without --sampler" in errors[0], proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr and not (tmp_path / "checkpoint").exists()

    cfg = DistillConfig(student="s", teacher="t")
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_fsdp(cfg)  # what the shipped config asks for passes
    with pytest.raises(ValueError, match="--sampler with --lora.r under FSDP"):
        check_fsdp(DistillConfig(student="s", teacher="t", sampler="http://x/v1", lora=LoraArgs(r=4)))
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP2 only: set fsdp_version: 2"):
        check_fsdp(cfg)
