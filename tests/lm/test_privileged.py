"""A teacher that sees more than the student: each row's teacher prompt (a reference solution, a demonstration) in
place of the student's prompt, the student's own completion graded under it (SDFT, OPSD)."""

import json

import pytest
import torch
from accelerate import Accelerator

from opd.config import DistillConfig, OptimArgs, SamplingArgs
from opd.lm.batch import build_batch
from opd.lm.data.prompts import encode, load_rows
from opd.lm.hf.model import load_model
from opd.lm.loop.build import make_teacher, prompt_sets
from opd.lm.teachers.local import LocalTeacher
from opd.lm.teachers.routed import Teachers, grade
from opd.lm.train import accumulate, distill
from opd.tasks import get_task

HINTS = ["the answer is 7. ", "", "3+4=7 and 10-2=8, so: ", "x"]
"""Teacher prefixes of different lengths (none, shorter and longer than the prompts): the teacher's completion
tokens sit at other columns than the student's in every row."""


def _batch(tokenizer):
    examples = get_task("arithmetic").examples(4, seed=3, split="test")
    prompts = [tokenizer.encode(e.prompt) for e in examples]
    completions = [tokenizer.encode(e.completion)[:n] for e, n in zip(examples, (4, 2, 6, 3), strict=True)]
    batch = build_batch(prompts, completions, tokenizer.pad_token_id, tokenizer.eos_token_id)
    teacher_prompts = [tokenizer.encode(h + e.prompt) for h, e in zip(HINTS, examples, strict=True)]
    return batch, prompts, teacher_prompts


def _by_hand(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """[len(completion), V] log-probs of each completion token's position, the sequence alone (no padding)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].double()
    return logits.log_softmax(-1)[len(prompt) - 1:len(prompt) + len(completion) - 1]


def test_the_teacher_grades_each_completion_token_under_its_own_prompt(model_dirs, tokenizer):
    batch, _, teacher_prompts = _batch(tokenizer)
    batch.teacher_prompt_ids = teacher_prompts
    teacher = load_model(model_dirs["teacher"])
    signal = grade(LocalTeacher(teacher), batch, None, score=True)
    mask = batch.mask_BT.bool()
    assert signal.taken_logp_BT.shape == signal.hidden_BTD.shape[:2] == mask.shape  # the student's layout
    full = signal.head(signal.hidden_BTD[mask]).double().log_softmax(-1)
    expected = torch.cat([_by_hand(teacher, tp, c) for tp, c in zip(teacher_prompts, batch.completion_ids())])
    torch.testing.assert_close(full, expected, rtol=1e-4, atol=1e-5)
    taken = expected.gather(1, batch.targets_BT[mask][:, None].long())[:, 0]
    torch.testing.assert_close(signal.taken_logp_BT[mask].double(), taken, rtol=1e-4, atol=1e-5)
    assert (signal.taken_logp_BT[~mask] == 0).all()


def test_several_teachers_each_grade_their_rows_under_the_teacher_prompts(model_dirs, tokenizer):
    batch, _, teacher_prompts = _batch(tokenizer)
    batch.teacher_prompt_ids = teacher_prompts
    models = {"a": load_model(model_dirs["teacher"]), "b": load_model(model_dirs["student"])}
    routes = ["b", "a", "a", "b"]
    signal = grade(Teachers({k: LocalTeacher(m) for k, m in models.items()}), batch, routes, score=True)
    taken = signal.taken_logp_BT
    for b, name in enumerate(routes):
        row_mask = batch.mask_BT[b].bool()
        hand = _by_hand(models[name], teacher_prompts[b], batch.completion_ids()[b])
        expected = hand.gather(1, batch.targets_BT[b][row_mask][:, None].long())[:, 0]
        torch.testing.assert_close(taken[b][row_mask].double(), expected, rtol=1e-4, atol=1e-5)


def _cfg(model_dirs, tmp_path=None, **kw):
    base = dict(student=model_dirs["student"], teacher=model_dirs["teacher"], batch_size=4, steps=1,
                eval_every=0, progress=False, sampling=SamplingArgs(max_new_tokens=6), optim=OptimArgs(grad_clip=0.0),
                out_dir=str(tmp_path / "run") if tmp_path else "runs/unused")
    return DistillConfig(**{**base, **kw})


def test_a_teacher_prompt_equal_to_the_prompt_gives_todays_loss_and_gradient(model_dirs, tokenizer):
    batch, prompts, _ = _batch(tokenizer)
    student = load_model(model_dirs["student"])
    cfg = _cfg(model_dirs)
    teacher = make_teacher(cfg, student, tokenizer)
    results = []
    for teacher_prompts in (None, prompts):
        batch.teacher_prompt_ids = teacher_prompts
        student.zero_grad(set_to_none=True)
        m = accumulate(student, teacher, batch, cfg, Accelerator(cpu=True), 0)
        results.append((m["loss"], [p.grad.clone() for p in student.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for g, e in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)


def _write(tmp_path, rows) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_run_reads_teacher_prompts_from_a_mapped_column_and_the_teacher_sees_them(model_dirs, tokenizer, tmp_path):
    examples = get_task("arithmetic").examples(8, seed=0, split="train")
    losses = {}
    for name, hint in (("none", None), ("same", ""), ("hint", "it is {}. ")):
        rows = [{"q": e.prompt, **({} if hint is None else {"solution": hint.format(e.answer) + e.prompt})}
                for e in examples]
        fields = "prompt=q" + ("" if hint is None else ",teacher_prompt=solution")
        distill(_cfg(model_dirs, tmp_path / name, data=_write(tmp_path, rows), data_fields=fields))
        losses[name] = json.loads((tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    # the same student samples in all three (same seed and weights): only what the teacher saw differs
    assert losses["same"] == pytest.approx(losses["none"], rel=1e-6)
    assert abs(losses["hint"] - losses["none"]) > 1e-4 * abs(losses["none"]), losses


def test_teacher_prompts_are_checked_before_anything_loads(model_dirs, tokenizer, tmp_path):
    rows = [{"prompt": "1+1=", "teacher_prompt": "2. 1+1="}, {"prompt": "2+2="}]
    with pytest.raises(ValueError, match="row 1 has no teacher_prompt"):
        encode(tokenizer, load_rows(_write(tmp_path, rows)), 100)
    rows[1]["teacher_prompt"] = "4. 2+2="
    data = _write(tmp_path, rows)
    assert encode(tokenizer, load_rows(data), 100).teacher_prompt_ids[1] == tokenizer.encode("4. 2+2=")
    for kw, needle in ((dict(source="teacher"), "--source teacher"), (dict(loss="sft"), "loss=sft"),
                       (dict(overlap=True), "--overlap"), (dict(source="speculative"), "--source speculative")):
        with pytest.raises(ValueError, match=needle):
            prompt_sets(_cfg(model_dirs, data=data, **kw), tokenizer, 100)
