import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.config import DistillConfig, OptimArgs, SamplingArgs
from opd.lm.hf.model import load_model
from opd.lm.batch import encode_prompts
from opd.lm.rollouts.local import sample
from opd.lm.teachers.local import LocalTeacher
from opd.lm import train as train_module
from opd.lm.train import TrainingError, distill
from opd.losses import reverse_kl
from opd.tasks import get_task
from tests.conftest import tiny_llama


def tiny_cfg(dirs, tmp_path, **kw) -> DistillConfig:
    base = dict(
        student=dirs["student"], teacher=dirs["teacher"], steps=2, batch_size=4, train_examples=64, eval_examples=4,
        eval_every=0, save_every=1, sampling=SamplingArgs(max_new_tokens=8), out_dir=str(tmp_path / "run"),
        progress=False,
    )
    base.update(kw)
    return DistillConfig(**base)


@pytest.mark.parametrize(
    "source,loss",
    [("student", "reverse_kl"), ("student", "sampled"), ("student", "jsd"), ("mixture", "forward_kl"),
     ("teacher", "sft"), ("teacher", "skew_reverse_kl"), ("data", "sft"), ("student", "tvd")],
)
def test_every_source_and_loss_trains_and_writes_a_run(model_dirs, tmp_path, source, loss):
    cfg = tiny_cfg(model_dirs, tmp_path, source=source, loss=loss, eval_every=2)
    before = load_file(Path(model_dirs["student"]) / "model.safetensors")
    out = distill(cfg)
    run = Path(cfg.out_dir)
    assert json.loads((run / "config.json").read_text())["loss"] == loss
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    assert 0.0 <= out["accuracy"] <= 1.0
    after = load_file(run / "checkpoint" / "model.safetensors")
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student did not change"


def _heldout_reverse_kl(student, teacher, tokenizer, prompts) -> float:
    torch.manual_seed(123)
    b = sample(student, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, 8)
    with torch.no_grad():
        s = torch.log_softmax(student(b.input_ids_BL, attention_mask=b.attention_mask_BL).logits[:, :-1], -1)
        t = torch.log_softmax(teacher(b.input_ids_BL, attention_mask=b.attention_mask_BL).logits[:, :-1], -1)
    return reverse_kl(s, t)[b.mask_BT.bool()].mean().item()


@pytest.mark.parametrize("loss", ["reverse_kl", "sampled"])
def test_on_policy_distillation_moves_the_student_towards_the_teacher(model_dirs, tokenizer, tmp_path, loss):
    cfg = tiny_cfg(model_dirs, tmp_path, steps=40, batch_size=8, save_every=40, loss=loss,
                   optim=OptimArgs(lr=1e-2, warmup_steps=1))
    teacher = load_model(model_dirs["teacher"])
    test = get_task("arithmetic").examples(16, seed=0, split="test")
    prompts = encode_prompts(tokenizer, [e.prompt for e in test], 100)
    kl_before = _heldout_reverse_kl(load_model(model_dirs["student"]), teacher, tokenizer, prompts)
    distill(cfg)
    kl_after = _heldout_reverse_kl(load_model(str(Path(cfg.out_dir) / "checkpoint")), teacher, tokenizer, prompts)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)


def test_resume_continues_bit_for_bit(model_dirs, tmp_path):
    straight = tiny_cfg(model_dirs, tmp_path / "a", steps=4, save_every=2)
    distill(straight)
    first = tiny_cfg(model_dirs, tmp_path / "b", steps=2, save_every=2)
    distill(first)
    distill(tiny_cfg(model_dirs, tmp_path / "b", steps=4, save_every=2, resume=True))
    a = load_file(Path(straight.out_dir) / "checkpoint" / "model.safetensors")
    b = load_file(Path(first.out_dir) / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_restores_the_torch_rng_the_loop_saved(model_dirs, tmp_path):
    # The student samples at temperature 1 from torch's global RNG. In one process the checkpoint's trainer state
    # holds the same torch state as the loop's loop_rng.pt, so scramble the trainer state's copy: the resumed run
    # must take the loop's own (else a multi-process run resumes every rank with the main process's state).
    straight = tiny_cfg(model_dirs, tmp_path / "a", steps=4, save_every=2)
    distill(straight)
    expected = load_file(Path(straight.out_dir) / "checkpoint" / "model.safetensors")
    scrambled = torch.Generator().manual_seed(12345).get_state()

    def resumed(name, scramble_file):
        first = tiny_cfg(model_dirs, tmp_path / name, steps=2, save_every=2)
        distill(first)
        path = Path(first.out_dir) / "checkpoint" / scramble_file
        state = torch.load(path, weights_only=False)
        if scramble_file == "trainer_state.pt":
            state["rng"]["torch"] = scrambled
        else:
            state[0] = (state[0][0], scrambled)  # (loop generator, torch) of process 0
        torch.save(state, path)
        distill(tiny_cfg(model_dirs, tmp_path / name, steps=4, save_every=2, resume=True))
        return load_file(Path(first.out_dir) / "checkpoint" / "model.safetensors")

    kept = resumed("b", "trainer_state.pt")
    assert all(torch.equal(expected[k], kept[k]) for k in expected)
    # and the torch RNG matters here: the loop's own state scrambled, the run samples other completions
    other = resumed("c", "loop_rng.pt")
    assert any(not torch.equal(expected[k], other[k]) for k in expected)


def test_bad_input_gives_one_line_errors(model_dirs, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown loss 'kl2'"):
        distill(tiny_cfg(model_dirs, tmp_path, loss="kl2"))
    with pytest.raises(ValueError, match="--train-examples must be >= 1"):
        distill(tiny_cfg(model_dirs, tmp_path, train_examples=0))
    # a student whose context cannot hold prompt + completion
    short = tiny_llama(tokenizer, 16, 1, seed=0, max_pos=12)
    short.save_pretrained(tmp_path / "short")
    tokenizer.save_pretrained(tmp_path / "short")
    with pytest.raises(ValueError, match="row 0: the prompt is .* tokens but the model's context leaves room for 4"):
        distill(tiny_cfg(model_dirs, tmp_path, student=str(tmp_path / "short")))
    # a teacher over another vocabulary
    other = tiny_llama(tokenizer, 16, 1, seed=0)
    other.resize_token_embeddings(len(tokenizer) + 7)
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=rf"teacher vocabulary size {len(tokenizer) + 7} != student vocabulary size"):
        distill(tiny_cfg(model_dirs, tmp_path, teacher=str(tmp_path / "other")))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(model_dirs, tmp_path, monkeypatch):
    distill(tiny_cfg(model_dirs, tmp_path, steps=2, save_every=2))
    good = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    calls, real_loss = [], train_module.student_loss

    def loss_that_diverges(*args):
        loss, metrics = real_loss(*args)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), metrics

    monkeypatch.setattr(train_module, "student_loss", loss_that_diverges)
    with pytest.raises(TrainingError, match=r"loss is nan at step 3; stopped without saving.*checkpoint"):
        distill(tiny_cfg(model_dirs, tmp_path, steps=6, save_every=100, resume=True))
    kept = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(good[k], kept[k]) for k in good)
    assert json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2


def test_an_update_that_makes_weights_non_finite_stops_the_run(model_dirs, tmp_path, monkeypatch):
    real_loss = train_module.student_loss

    def finite_loss_nan_gradient(*args):
        loss, metrics = real_loss(*args)
        loss.register_hook(lambda g: g * float("nan"))
        return loss, metrics

    monkeypatch.setattr(train_module, "student_loss", finite_loss_nan_gradient)
    with pytest.raises(TrainingError, match=r"update at step 0 made the student's weights non-finite.*checkpoint: none"):
        distill(tiny_cfg(model_dirs, tmp_path, steps=3))
    assert not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.parametrize("source,loss", [("student", "reverse_kl"), ("teacher", "sft"), ("student", "sampled")])
def test_a_teacher_behind_opd_serve_distils_like_a_local_one(model_dirs, tokenizer, tmp_path, source, loss):
    from opd.lm.serve.app import ServeArgs, build_app, load_served
    from tests.lm.serve_helpers import live_server

    # The server reports every token's log-prob (top-k = the vocabulary: no tail bucket) and samples the teacher's
    # completions greedily (a local teacher draws from torch's RNG, the server from its own seeds): the run must then
    # be the local teacher's run, up to float rounding.
    kw = dict(source=source, loss=loss, top_k=len(tokenizer),
              sampling=SamplingArgs(max_new_tokens=8, temperature=0.0 if source == "teacher" else 1.0))
    args = ServeArgs(model_dir=model_dirs["teacher"], device="cpu", max_logprobs=len(tokenizer))
    with live_server(build_app(*load_served(args), args)) as url:
        distill(tiny_cfg(model_dirs, tmp_path / "remote", teacher=url, **kw))
    distill(tiny_cfg(model_dirs, tmp_path / "local", **kw))
    remote, local = ([json.loads(line) for line in (tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines()]
                     for run in ("remote", "local"))
    assert [m["step"] for m in remote] == [m["step"] for m in local] == [1, 2]
    assert [m["completion_tokens"] for m in remote] == [m["completion_tokens"] for m in local]
    assert all(m["completion_tokens"] > 0 for m in remote)
    assert [m["loss"] for m in remote] == pytest.approx([m["loss"] for m in local], rel=1e-4, abs=1e-6)


def test_remote_top_k_equal_to_the_vocabulary_gives_the_local_full_loss(model_dirs, tokenizer):
    from opd.lm.remote.teacher import RemoteTeacher
    from opd.lm.serve.app import ServeArgs, build_app, load_served
    from opd.lm.train import student_loss
    from tests.lm.serve_helpers import live_server

    student, teacher = load_model(model_dirs["student"]), load_model(model_dirs["teacher"])
    prompts = encode_prompts(tokenizer, [e.prompt for e in get_task("arithmetic").examples(4, 0, "test")], 100)
    torch.manual_seed(0)
    batch = sample(student, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, 10)
    cfg = DistillConfig(student="-", loss="jsd")
    local, _ = student_loss(student, batch, LocalTeacher(teacher).score(batch.input_ids_BL, batch.attention_mask_BL,
                                                                          batch.mask_BT), cfg)
    args = ServeArgs(model_dir=model_dirs["teacher"], device="cpu", max_logprobs=len(tokenizer))
    with live_server(build_app(*load_served(args), args)) as url:
        remote_signal = RemoteTeacher(url, top_k=len(tokenizer)).score(batch.input_ids_BL, batch.attention_mask_BL,
                                                                       batch.mask_BT)
    remote, _ = student_loss(student, batch, remote_signal, cfg)
    assert torch.allclose(local, remote, atol=1e-5), (local, remote)


def test_teacher_server_dying_mid_run_stops_with_a_resumable_checkpoint(model_dirs, tmp_path):
    from opd.lm.serve.app import ServeArgs, build_app, load_served
    from tests.lm.serve_helpers import live_server

    args = ServeArgs(model_dir=model_dirs["teacher"], device="cpu")
    app = build_app(*load_served(args), args)
    with live_server(app) as url:
        distill(tiny_cfg(model_dirs, tmp_path, teacher=url, steps=2, save_every=100, remote_max_retries=1))
    # the server is gone now: the resumed run fails at its first step and says where to resume from
    with pytest.raises(TrainingError, match=r"did not answer after 2 attempts.* checkpoint at step 2 .*--resume"):
        distill(tiny_cfg(model_dirs, tmp_path, teacher=url, steps=4, save_every=100, resume=True,
                         remote_max_retries=1))
    with live_server(app) as url:
        distill(tiny_cfg(model_dirs, tmp_path, teacher=url, steps=4, save_every=100, resume=True))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]


def test_out_of_range_divergence_parameters_fail_before_any_work(model_dirs, tmp_path):
    with pytest.raises(ValueError, match="beta"):
        distill(tiny_cfg(model_dirs, tmp_path, loss="jsd", beta=1.5))
    with pytest.raises(ValueError, match="lmbda must be in"):
        distill(tiny_cfg(model_dirs, tmp_path, source="mixture", lmbda=2.0))
    assert not (tmp_path / "run").exists()


def _scored_batch(model_dirs, tokenizer, n_prompts=4):
    student, teacher = load_model(model_dirs["student"]), load_model(model_dirs["teacher"])
    prompts = encode_prompts(tokenizer, [e.prompt for e in get_task("arithmetic").examples(n_prompts, 0, "test")], 100)
    torch.manual_seed(0)
    return student, teacher, sample(student, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, 10)


@pytest.mark.parametrize("loss,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3), ("jsd", 1.0)])
def test_student_loss_takes_the_fused_path_with_the_loss_and_gradients_of_autograd(model_dirs, tokenizer, monkeypatch,
                                                                                    loss, beta):
    import opd.fused

    student, teacher, batch = _scored_batch(model_dirs, tokenizer)
    cfg = DistillConfig(student="-", loss=loss, beta=beta)
    signal = LocalTeacher(teacher, with_taken_logp=False).score(batch.input_ids_BL, batch.attention_mask_BL,
                                                                 batch.mask_BT)
    params = [p for p in student.parameters() if p.requires_grad]
    fused_calls = []
    real_apply = opd.fused._FusedDivergence.apply
    monkeypatch.setattr(opd.fused._FusedDivergence, "apply", lambda *a: fused_calls.append(1) or real_apply(*a))
    fused_loss, metrics = train_module.student_loss(student, batch, signal, cfg)
    fused_grads = torch.autograd.grad(fused_loss, params)
    assert fused_calls == [1] and "teacher_logp" not in metrics
    monkeypatch.setattr(opd.fused, "plain_linear", lambda *a: False)  # the autograd path, as before opd.fused
    plain_loss, _ = train_module.student_loss(student, batch, signal, cfg)
    plain_grads = torch.autograd.grad(plain_loss, params)
    assert fused_calls == [1]
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for f, p in zip(fused_grads, plain_grads):
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-6)


def test_the_local_teacher_scores_taken_tokens_only_for_the_losses_that_read_them(model_dirs, tokenizer):
    from opd.lm.train import make_teacher, student_loss

    student, teacher, batch = _scored_batch(model_dirs, tokenizer)
    args = (batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
    full = LocalTeacher(teacher).score(*args)  # the default computes it: any caller may read it
    assert full.taken_logp_BT is not None and full.hidden_BTD is not None
    for loss in ("reverse_kl", "jsd", "forward_kl", "tvd", "skew_forward_kl"):
        cfg = DistillConfig(student=model_dirs["student"], teacher=model_dirs["teacher"], loss=loss)
        assert make_teacher(cfg, student, tokenizer).score(*args).taken_logp_BT is None
    cfg = DistillConfig(student=model_dirs["student"], teacher=model_dirs["teacher"], loss="sampled")
    sampled = make_teacher(cfg, student, tokenizer).score(*args)
    torch.testing.assert_close(sampled.taken_logp_BT, full.taken_logp_BT)
    _, metrics = student_loss(student, batch, sampled, cfg)
    assert metrics["teacher_logp"] < 0
    with pytest.raises(ValueError, match="taken tokens"):
        student_loss(student, batch, LocalTeacher(teacher, with_taken_logp=False).score(*args), cfg)


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_a_bf16_teacher_scores_in_bf16_and_the_loss_stays_float32_and_close(model_dirs, tokenizer, loss):
    from opd.lm.train import make_teacher, student_loss

    student, _, batch = _scored_batch(model_dirs, tokenizer)
    args = (batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
    values = {}
    for dtype in ("float32", "bfloat16"):
        cfg = DistillConfig(student=model_dirs["student"], teacher=model_dirs["teacher"], loss=loss, teacher_dtype=dtype)
        teacher = make_teacher(cfg, student, tokenizer)
        assert next(teacher.model.parameters()).dtype == getattr(torch, dtype)
        loss_value, _ = student_loss(student, batch, teacher.score(*args), cfg)
        assert loss_value.dtype == torch.float32 and torch.isfinite(loss_value)
        values[dtype] = loss_value.item()
    # bf16 keeps ~3 significant digits of the teacher's logits: the loss moves, but only a little
    assert values["bfloat16"] == pytest.approx(values["float32"], rel=0.05)


def test_a_resumed_run_logs_each_step_once(model_dirs, tmp_path):
    distill(tiny_cfg(model_dirs, tmp_path, steps=2, save_every=2))
    log = tmp_path / "run" / "metrics.jsonl"
    # killed after logging step 3 and before its checkpoint (and mid-way through a line)
    log.write_text(log.read_text() + json.dumps({"step": 3, "loss": -1.0}) + "\n" + '{"step": 4, "lo')
    distill(tiny_cfg(model_dirs, tmp_path, steps=4, save_every=2, resume=True))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3, 4] and rows[2]["loss"] != -1.0


def test_eval_every_zero_never_evaluates_and_no_progress_silences_the_library_bars(model_dirs, tmp_path, capfd):
    out = distill(tiny_cfg(model_dirs, tmp_path, steps=2, save_every=1, eval_every=0))
    assert "accuracy" not in out
    assert "Writing model shards" not in capfd.readouterr().err  # two checkpoint saves, no bars


def test_resuming_a_finished_run_says_so_and_returns_its_last_metrics(model_dirs, tmp_path, capsys):
    """It printed `done: step None, accuracy None` and wrote nothing useful."""
    last = distill(tiny_cfg(model_dirs, tmp_path, steps=2, save_every=2))
    log = tmp_path / "run" / "metrics.jsonl"
    before = log.read_text()
    again = distill(tiny_cfg(model_dirs, tmp_path, steps=2, save_every=2, resume=True))
    assert again == json.loads(json.dumps(last)) and again["step"] == 2
    assert "already at step 2 of --steps 2; nothing to train" in capsys.readouterr().err
    assert log.read_text() == before
