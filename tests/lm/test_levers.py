"""The levers for long sequences and large models: gradient checkpointing, bf16 weights and autocast, and the checks
on lengths that cannot fit. Token-budget micro-batches are checked with the loop's wiring (test_loop_wiring.py)."""

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from opd.cli import main
from opd.config import DistillConfig, LoraArgs, OptimArgs, SamplingArgs
from opd.lm.batch import build_batch
from opd.lm.hf.lora import load_student
from opd.lm.hf.model import load_model
from opd.lm.loop.build import make_teacher
from opd.lm.loop.process import start_process
from opd.lm.train import accumulate, distill, student_loss
from opd.tasks import get_task
from tests.conftest import tiny_llama
from tests.lm.serve_helpers import live_server


@pytest.fixture(scope="module")
def dirs(tokenizer, tmp_path_factory):
    """A two-layer student (so that checkpointing has layers to recompute) and a teacher whose head is scaled up:
    peaked, so the divergence is far from 0 and a relative tolerance means something."""
    root = tmp_path_factory.mktemp("levers")
    out = {}
    for name, hidden, layers, seed, scale in (("student", 32, 2, 3, 1.0), ("teacher", 32, 2, 4, 20.0)):
        model = tiny_llama(tokenizer, hidden, layers, seed, max_pos=256)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(scale)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def _batch(tokenizer):
    examples = get_task("arithmetic").examples(4, seed=1, split="test")
    return build_batch([tokenizer.encode(e.prompt) for e in examples], [tokenizer.encode(e.completion) for e in examples],
                       tokenizer.pad_token_id, tokenizer.eos_token_id)


def _cfg(dirs, tmp_path=None, **kw) -> DistillConfig:
    base = dict(student=dirs["student"], teacher=dirs["teacher"], batch_size=4, steps=2, train_examples=32,
                eval_every=0, progress=False, sampling=SamplingArgs(max_new_tokens=6), optim=OptimArgs(grad_clip=0.0),
                out_dir=str(tmp_path / "run") if tmp_path else "runs/unused")
    return DistillConfig(**{**base, **kw})


def _loss_and_grads(student, teacher, batch, cfg) -> tuple[float, list[torch.Tensor]]:
    student.zero_grad(set_to_none=True)
    m = accumulate(student, teacher, batch, cfg, Accelerator(cpu=True), 0)
    return m["loss"], [p.grad.float().clone() for p in student.parameters() if p.grad is not None]


@pytest.mark.parametrize("lora", [0, 4])
def test_gradient_checkpointing_gives_the_same_loss_and_gradient(dirs, tokenizer, lora):
    batch, cfg = _batch(tokenizer), _cfg(dirs)
    results = []
    for on in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation both times
        student = load_student(dirs["student"], LoraArgs(r=lora), None, "cpu", gradient_checkpointing=on)
        assert student.is_activation_checkpointing == on  # peft forwards the attribute to its base model
        student.train()
        results.append(_loss_and_grads(student, make_teacher(cfg, student, tokenizer), batch, cfg))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert loss_on == pytest.approx(loss_off, rel=1e-6) and len(grads_on) == len(grads_off) > 0
    for g_on, g_off in zip(grads_on, grads_off, strict=True):
        torch.testing.assert_close(g_on, g_off, rtol=1e-5, atol=1e-7)


def test_the_flags_reach_the_student_a_run_trains_and_samples(dirs, tmp_path):
    seen = {}

    def look(step, student, metrics):
        seen[step] = (student.is_activation_checkpointing, {p.dtype for p in student.parameters()}, student.training)

    distill(_cfg(dirs, tmp_path, gradient_checkpointing=True, dtype="bfloat16", max_tokens_per_microbatch=64),
            callbacks=[look])
    assert seen == {1: (True, {torch.bfloat16}, True), 2: (True, {torch.bfloat16}, True)}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["completion_tokens"] > 0 and r["micro_batches"] >= 1 for r in rows)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" and saved["gradient_checkpointing"] and saved["max_tokens_per_microbatch"] == 64


BF16_REL = 1e-3
"""On this batch bf16 weights moved the loss (1.785) by 3e-5 of itself, a bf16 teacher or bf16 autocast by 3e-6
(measured); 1e-3 leaves room for other CPUs' kernels. Real models move more (SmolLM2-135M scored in bf16: 0.05 nats
per token on average, `benchmarks/results/perf_levers.md`); this checks where the precision applies, not its cost."""


@pytest.mark.parametrize("student_dtype,teacher_dtype,autocast", [
    ("bfloat16", "float32", "no"), ("float32", "bfloat16", "no"), ("bfloat16", "bfloat16", "no"),
    ("float32", "float32", "bf16")])
def test_bf16_weights_or_autocast_give_the_fp32_loss_within_tolerance(dirs, tokenizer, student_dtype, teacher_dtype,
                                                                      autocast):
    batch = _batch(tokenizer)
    reference_cfg = _cfg(dirs)
    student = load_model(dirs["student"])
    reference, _ = student_loss(student, batch, make_teacher(reference_cfg, student, tokenizer).score(
        batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT), reference_cfg)
    cfg = _cfg(dirs, dtype=student_dtype, teacher_dtype=teacher_dtype, mixed_precision=autocast)
    low = load_model(dirs["student"], dtype=student_dtype)
    signal = make_teacher(cfg, low, tokenizer).score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
    if autocast != "no":  # what distill does with --mixed-precision (also after runs without it, in one process)
        low = start_process(cfg).accelerator.prepare(low)
    loss, _ = student_loss(low, batch, signal, cfg)
    assert loss.dtype == torch.float32  # the divergence runs in float32 whatever the weights' precision
    assert reference.item() > 0.5  # a peaked teacher: far from 0, so the relative tolerance is meaningful
    assert loss.item() == pytest.approx(reference.item(), rel=BF16_REL)
    assert loss.item() != reference.item()  # the lower precision was really used


def test_a_bf16_sampler_shows_its_rounding_in_sampler_kl(dirs, tmp_path):
    # The trainer/engine mismatch the field worries about: an fp32 student sampled by a bf16 server. The student is
    # the peaked model here: a near-uniform one hardly moves when rounded.
    from opd.lm.serve.app import ServeArgs, build_app, load_served

    kls = {}
    for dtype in ("float32", "bfloat16"):
        args = ServeArgs(model_dir=dirs["teacher"], device="cpu", batch_window_ms=2, weights_root=str(tmp_path),
                         dtype=dtype)
        with live_server(build_app(*load_served(args), args)) as url:
            out = tmp_path / dtype
            distill(_cfg(dirs, tmp_path, student=dirs["teacher"], steps=1, sampler=url + "/v1", out_dir=str(out)))
        kls[dtype] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["sampler_kl"]
    assert kls["float32"] < 1e-8 < 1e-6 < kls["bfloat16"] < 0.05, kls


def _opd_train(dirs, tmp_path, *flags) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--student", dirs["student"], "--teacher", dirs["teacher"], "--out-dir", str(tmp_path / "r"),
              "--train-examples", "8", "--steps", "1", "--optim.warmup-steps", "0", *flags])
    return exit_info.value.code


@pytest.mark.parametrize("flags,message", [
    (("--sampling.max-new-tokens", "256"), "leaves no room for a prompt in the student's context of"),
    (("--max-tokens-per-microbatch", "10", "--sampling.max-new-tokens", "8"),
     "is smaller than the longest sequence a step may hold"),
    (("--max-tokens-per-microbatch", "8", "--sampling.max-new-tokens", "8"), "--max-tokens-per-microbatch must be >"),
    (("--max-tokens-per-microbatch", "128", "--optim.grad-accum", "2"), "not both"),
])
def test_lengths_that_cannot_fit_stop_before_any_weights_load(dirs, tmp_path, capsys, monkeypatch, flags, message):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    assert _opd_train(dirs, tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not Path(tmp_path / "r" / "checkpoint").exists()
