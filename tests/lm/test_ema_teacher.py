"""`--teacher ema` (`opd.lm.teachers.ema`): the teacher is an exponential moving average of the student's weights."""

import json
from pathlib import Path

import pytest
import torch

from opd.config import DistillConfig, LoraArgs, OptimArgs, SamplingArgs
from opd.config_notes import unused_flags
from opd.lm.hf.lora import load_student
from opd.lm.hf.model import load_model
from opd.lm.teachers.ema import CHECKPOINT_FILE, EmaTeacher
from opd.lm.train import distill
from tests.lm.test_teachers import nudge


def cfg(dirs, out: Path, **kw) -> DistillConfig:
    base = dict(student=dirs["student"], teacher="ema", ema_decay=0.5, steps=3, batch_size=4, eval_every=0,
                save_every=1, sampling=SamplingArgs(max_new_tokens=8), out_dir=str(out),
                optim=OptimArgs(lr=3e-2, warmup_steps=0), progress=False)
    base.update(kw)
    return DistillConfig(**base)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def recorder(seen: list):
    """A callback that keeps the student's trainable weights after every update."""
    def callback(step, student, m):
        seen.append({n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad})
    return callback


def test_follow_moves_each_weight_decay_of_the_way_it_is_and_the_rest_to_the_student(model_dirs):
    student = load_model(model_dirs["student"])
    ema = EmaTeacher(student, decay=0.75)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.follow(student)
    for name, p in ema.model.named_parameters():
        assert torch.allclose(p, 0.75 * start[name] + 0.25 * (start[name] + 1.0), atol=1e-6), name
        assert not p.requires_grad
    assert len(ema.names) == len(start)


def test_the_saved_teacher_is_the_stated_average_of_the_students_after_each_update(model_dirs, tmp_path):
    """Three updates with decay 0.5: t_k = 0.5 t_(k-1) + 0.5 s_k from t_0 = the start, weight for weight. (The student
    starts as its own teacher, so nothing moves until `nudge` moves it after update 1; the recorder sees each update's
    weights before that.)"""
    seen: list = []
    start = {n: p.detach().clone() for n, p in load_model(model_dirs["student"]).named_parameters()}
    distill(cfg(model_dirs, tmp_path / "run"), callbacks=[recorder(seen), nudge()])
    want = start
    for s in seen:
        want = {n: 0.5 * want[n] + 0.5 * s[n] for n in want}
    saved = torch.load(tmp_path / "run" / "checkpoint" / CHECKPOINT_FILE)
    assert set(saved) == set(want)
    for name in want:
        assert torch.allclose(saved[name], want[name], atol=1e-6), name
    assert any(not torch.equal(saved[n], s) for n, s in seen[-1].items()), "the teacher lags the student"


def test_decay_one_is_the_frozen_start_and_decay_zero_is_the_last_update(model_dirs, tmp_path):
    """The student is moved away after update 1 (`nudge`). A teacher that stays at the start (decay 1, like --teacher
    self) still disagrees at update 3; one that jumps to the student after every update (decay 0) agrees again."""
    distill(cfg(model_dirs, tmp_path / "self", teacher="self", ema_decay=0.99), callbacks=[nudge()])
    distill(cfg(model_dirs, tmp_path / "still", ema_decay=1.0), callbacks=[nudge()])
    distill(cfg(model_dirs, tmp_path / "moving", ema_decay=0.0), callbacks=[nudge()])
    still, moving = losses(tmp_path / "still"), losses(tmp_path / "moving")
    assert still == pytest.approx(losses(tmp_path / "self"), rel=1e-5, abs=1e-7)
    assert still[0] < 1e-6 and moving[0] < 1e-6  # every teacher starts as the student
    assert moving[1] > 1e-3 and still[2] > 1e-3  # the nudge parted them
    assert moving[2] < 1e-6  # decay 0: update 2 made the teacher the student again


@pytest.mark.parametrize("lora", [LoraArgs(), LoraArgs(r=4, target_modules=("q_proj", "v_proj"))], ids=["full", "lora"])
def test_a_resumed_run_continues_the_same_teacher(model_dirs, tmp_path, lora):
    distill(cfg(model_dirs, tmp_path / "a", steps=4, lora=lora), callbacks=[nudge()])
    distill(cfg(model_dirs, tmp_path / "b", steps=2, lora=lora), callbacks=[nudge()])
    distill(cfg(model_dirs, tmp_path / "b", steps=4, lora=lora, resume=True))
    straight = losses(tmp_path / "a")
    assert straight[3] > 1e-6, "the teacher has not caught up with the nudged student yet"
    assert losses(tmp_path / "b") == pytest.approx(straight, rel=1e-5, abs=1e-8)
    a, b = (torch.load(tmp_path / r / "checkpoint" / CHECKPOINT_FILE) for r in ("a", "b"))
    assert set(a) == set(b) and all(torch.allclose(a[n], b[n], atol=1e-7) for n in a)
    if lora.r:  # only the adapters are averaged; the frozen base is shared
        assert a and all("lora_" in n for n in a)


def test_a_lora_ema_teacher_averages_the_adapters_only(model_dirs):
    student = load_student(model_dirs["student"], LoraArgs(r=2, target_modules=("q_proj",)), None, "cpu")
    ema = EmaTeacher(student, decay=0.9)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert ema.names == trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="does not fit this student"):
        ema.load_state_dict({"nope": torch.zeros(1)})


def test_resuming_a_checkpoint_without_the_ema_state_says_so(model_dirs, tmp_path):
    distill(cfg(model_dirs, tmp_path / "run", teacher="self", steps=1, ema_decay=0.99))
    with pytest.raises(ValueError, match=f"has no {CHECKPOINT_FILE}.*resume with that run's settings"):
        distill(cfg(model_dirs, tmp_path / "run", steps=2, resume=True))


@pytest.mark.parametrize("kw, match", [
    (dict(source="teacher"), "--teacher ema grades the student's samples or the data's"),
    (dict(source="speculative"), "--teacher ema grades"),
    (dict(teacher=None, teachers="a=ema,b=x", teacher_column="d"), "--teachers cannot name ema"),
    (dict(ema_decay=1.5), "--ema-decay must be in \\[0, 1\\]"),
    (dict(cross_tokenizer=True), "--cross-tokenizer needs one local --teacher"),
])
def test_settings_an_ema_teacher_cannot_take_are_one_line(kw, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        DistillConfig(student="s", out_dir=str(tmp_path), **{"teacher": "ema", **kw})


def test_ema_decay_without_an_ema_teacher_is_warned_about(tmp_path):
    assert any("--ema-decay does nothing" in n for n in unused_flags(
        DistillConfig(student="s", teacher="t", ema_decay=0.5, out_dir=str(tmp_path))))
    assert not unused_flags(DistillConfig(student="s", teacher="ema", ema_decay=0.5, out_dir=str(tmp_path)))
