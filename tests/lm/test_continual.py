"""A sequence of tasks learned stage by stage (`opd.lm.recipes.continual`), and the digit tasks it uses (`opd.tasks.digits`)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from opd.lm.loop.build import prompt_sets
from opd.lm.data.checkers import get_checker
from opd.lm.recipes.continual import (NEW, OLD, ROUTE_COLUMN, ContinualConfig, init_student, run_sequence,
    shared_tokenizer, stage_config, stage_rows)
from opd.tasks import get_task
from opd.tasks.digits import DigitTask

TASKS = ("reverse", "shift", "sort")


@pytest.mark.parametrize("name, prompt, answer", [
    ("reverse", "rev 38150=", "05183"), ("shift", "shift 38150=", "49261"), ("sort", "sort 38150=", "01358"),
    ("shift", "shift 999=", "000"), ("sort", "sort 9090=", "0099"),
])
def test_digit_tasks_answer_by_hand_worked_examples(name, prompt, answer):
    example = get_task(name).solve(prompt.split()[1][:-1])
    assert (example.prompt, example.completion, example.answer) == (prompt, answer, answer)
    checker = get_checker(f"task:{name}")
    assert checker({"prompt": prompt, "answer": answer}, answer + " ") == 1.0
    assert checker({"prompt": prompt, "answer": answer}, answer[:-1]) == 0.0
    assert checker({"prompt": prompt, "answer": answer}, answer + "1") == 0.0


def test_digit_tasks_hold_out_the_same_inputs_for_every_task_and_share_one_tokenizer():
    tokenizer = shared_tokenizer(TASKS)
    inputs = {name: {split: {e.prompt.split()[1] for e in get_task(name).examples(300, 0, split)}
                     for split in ("train", "test")} for name in TASKS}
    for a in TASKS:
        for b in TASKS:  # no task's training input is another task's test input
            assert not inputs[a]["train"] & inputs[b]["test"]
    for name in TASKS:
        for e in get_task(name).examples(50, 1, "test"):
            ids = tokenizer(e.prompt + e.completion)["input_ids"]
            assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == e.prompt + e.completion
    with pytest.raises(ValueError, match="unknown digit task"):
        DigitTask("multiply")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    return {"teacher": str(init_student(TASKS, root / "teacher", size="s", seed=1)),
            "student": str(init_student(TASKS, root / "student", size="xs", seed=2)), "root": root}


def test_old_prompts_are_the_earlier_tasks_training_prompts_routed_to_the_old_model(models, tmp_path):
    cfg = ContinualConfig(teacher=models["teacher"], student=models["student"], train_examples=101,
                          out_dir=str(tmp_path))
    first = stage_rows(cfg, 0)
    assert len(first) == 101 and {(r["task"], r[ROUTE_COLUMN]) for r in first} == {("reverse", NEW)}
    rows = stage_rows(cfg, 2)
    by = {(t, route): [r for r in rows if (r["task"], r[ROUTE_COLUMN]) == (t, route)]
          for t in TASKS for route in (NEW, OLD)}
    assert len(rows) == 101
    assert (len(by["sort", NEW]), len(by["reverse", OLD]), len(by["shift", OLD])) == (51, 25, 25)
    assert not by["sort", OLD] and not by["reverse", NEW] and not by["shift", NEW]
    # the prompts the earlier task was learned on, with their reference answers kept for the record
    assert {r["prompt"] for r in by["reverse", OLD]} <= {r["prompt"] for r in first}
    assert all(r["completion"] == r["prompt"][4:-1][::-1] for r in by["reverse", OLD])
    # the stage's config routes `old` to the model it starts from, and opd's own router agrees row by row
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dcfg = stage_config(cfg, 2, "runs/prev/checkpoint", str(data))
    assert dcfg.student == "runs/prev/checkpoint"
    assert dcfg.teachers == f"new={models['teacher']},old=runs/prev/checkpoint"
    train, _, _ = prompt_sets(dcfg, shared_tokenizer(TASKS), 100)
    assert train.routes == [OLD if r["task"] in ("reverse", "shift") else NEW for r in rows]
    # without the old tasks: the new task's prompts only, and no old teacher
    plain = replace(cfg, keep_old=False)
    assert {(r["task"], r[ROUTE_COLUMN]) for r in stage_rows(plain, 2)} == {("sort", NEW)}
    assert stage_config(plain, 2, "runs/prev/checkpoint", str(data)).teachers == f"new={models['teacher']}"
    # every stage is on-policy reverse KL, but the first may learn from the reference completions instead
    sft_first = replace(cfg, first_source="data")
    assert [(c.source, c.loss) for c in (stage_config(sft_first, k, "s", str(data)) for k in range(3))] == [
        ("data", "sft"), ("student", "reverse_kl"), ("student", "reverse_kl")]
    assert (stage_config(cfg, 0, "s", str(data)).source, stage_config(cfg, 0, "s", str(data)).loss) == (
        "student", "reverse_kl")


def test_each_stage_starts_from_the_previous_checkpoint_which_teaches_the_old_prompts(models, tmp_path):
    cfg = ContinualConfig(teacher=models["teacher"], student=models["student"], steps=2, batch_size=8,
                          train_examples=40, eval_examples=4, max_new_tokens=4, out_dir=str(tmp_path / "with"))
    result = run_sequence(cfg)
    stages = result["stages"]
    assert [s["task"] for s in stages] == list(TASKS)
    assert stages[0]["student"] == models["student"]
    for before, stage in zip(stages, stages[1:]):
        assert stage["student"] == before["checkpoint"]
        run = Path(stage["checkpoint"]).parent
        saved = json.loads((run / "config.json").read_text())
        assert saved["student"] == before["checkpoint"]
        assert saved["teachers"].endswith(f",old={before['checkpoint']}")
        # the first update's loss on old prompts is scored before any update: the student is the old teacher, so 0
        first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert first["loss/teacher=old"] == pytest.approx(0.0, abs=1e-6)
        assert first["loss/teacher=new"] > 1e-3
    for s in stages:
        assert set(s["accuracy"]) == set(TASKS) and all(0.0 <= a <= 1.0 for a in s["accuracy"].values())
    assert json.loads((tmp_path / "with" / "continual.json").read_text()) == result
    # starting later: the given student is where that stage starts, and the tasks before it are old
    later = run_sequence(replace(cfg, first_stage=2, student=stages[0]["checkpoint"], out_dir=str(tmp_path / "later")))
    assert [s["task"] for s in later["stages"]] == ["sort"]
    saved = json.loads((tmp_path / "later" / "stage2-sort" / "config.json").read_text())
    assert saved["student"] == stages[0]["checkpoint"] and saved["teachers"].endswith(f"old={stages[0]['checkpoint']}")


def test_config_refuses_what_cannot_run(models):
    base = dict(teacher=models["teacher"], student=models["student"])
    for bad, match in ((dict(tasks=("reverse", "reverse")), "twice"), (dict(tasks=("nope",)), "unknown task"),
                       (dict(first_stage=3), "first_stage"), (dict(old_fraction=1.0), "old_fraction"),
                       (dict(steps=0), "steps")):
        with pytest.raises(ValueError, match=match):
            ContinualConfig(**base, **bad)
