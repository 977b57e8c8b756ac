import dataclasses
import json
import math
import shlex

import pytest
import torch
import tyro

from opd.lm.recipes import supervised as task_teacher
from opd.lm.eval import accuracy, generate_greedy
from opd.lm.recipes.supervised import (TeacherArgs, exact_match_rate, get_teacher, load_teacher, save_teacher,
    sft_loss, train_supervised, warm_start_student)
from opd.tasks import get_task
from opd.tasks.models import encode_examples, make_model, num_params
from opd.tasks.tokenizer import build_tokenizer

TASK = get_task("arithmetic")
TOK = build_tokenizer(TASK)


def test_sft_loss_matches_brute_force_over_completion_tokens():
    model = make_model("xs", TOK, seed=0)
    examples = TASK.examples(3, seed=0, split="train")
    batch = encode_examples(TOK, examples)
    total, count = 0.0, 0
    for e in examples:  # each sequence alone, unpadded
        ids = TOK(e.prompt + e.completion)["input_ids"] + [TOK.eos_token_id]
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        for t in range(len(e.prompt), len(ids)):
            total, count = total - logp[t - 1, ids[t]].item(), count + 1
    assert sft_loss(model, *batch).item() == pytest.approx(total / count, abs=1e-5)


def test_a_few_supervised_steps_lower_the_loss_and_are_deterministic():
    examples = TASK.examples(16, seed=0, split="train")
    runs = []
    for _ in range(2):
        model = make_model("xs", TOK, seed=0)
        losses = train_supervised(model, TOK, examples, steps=30, batch_size=8, lr=3e-2, seed=0, progress=False)
        runs.append((losses, model))
    losses = runs[0][0]
    # a fresh model is near uniform over the vocabulary; 30 steps take a third off its loss
    assert len(losses) == 30 and abs(losses[0] - math.log(len(TOK))) < 0.2
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3
    assert runs[0][0] == runs[1][0]
    with pytest.raises(ValueError, match="at least one example"):
        train_supervised(runs[0][1], TOK, [], steps=1, batch_size=1, lr=1e-3, seed=0)


def test_teacher_args_command_parses_back_to_the_same_args():
    args = TeacherArgs(steps=7, lr=0.5, out_dir="/somewhere")
    argv = shlex.split(args.command())
    assert argv[:2] == ["opd", "teacher"] and "--batch-size" in argv and "/somewhere" not in argv
    assert tyro.cli(TeacherArgs, args=argv[2:]) == dataclasses.replace(args, out_dir=None)


def test_saved_teacher_loads_back_and_is_found_in_the_cache(tmp_path, monkeypatch):
    model = make_model("xs", TOK, seed=1)
    save_teacher(model, TOK, {"test_accuracy": 0.5}, tmp_path / "arithmetic-teacher")
    monkeypatch.setattr(task_teacher, "ASSETS_DIR", tmp_path / "no-assets")
    loaded, tok, info = get_teacher(cache_dir=tmp_path)
    ids = torch.tensor([TOK("12+34=")["input_ids"]])
    assert info == {"test_accuracy": 0.5} and tok.get_vocab() == TOK.get_vocab()
    assert torch.equal(loaded(ids).logits, model(ids).logits) and loaded.dtype == torch.float32
    with pytest.raises(ValueError, match="no saved teacher"):
        load_teacher(tmp_path / "no-assets")


def test_committed_teacher_is_accurate_and_batching_does_not_change_greedy_outputs():
    # get_teacher loads the teacher that ships in opd/assets (training one would take minutes)
    assert (task_teacher.ASSETS_DIR / "arithmetic-teacher" / "info.json").is_file(), task_teacher.ASSETS_DIR
    teacher, tok, info = get_teacher(progress=False)
    assert info["test_accuracy"] >= 0.95 and info["num_params"] == num_params(teacher)
    test = TASK.examples(50, seed=1, split="test")
    assert accuracy(teacher, tok, TASK, test, batch_size=25) >= 0.9
    prompts = [e.prompt for e in test[:6]]  # different lengths, so the batch is left-padded
    alone = [generate_greedy(teacher, tok, [p], max_new_tokens=48)[0] for p in prompts]
    assert generate_greedy(teacher, tok, prompts, max_new_tokens=48) == alone


def test_accuracy_counts_what_the_checker_accepts():
    teacher, tok, _ = get_teacher(progress=False)
    test = TASK.examples(40, seed=2, split="test")
    completions = generate_greedy(teacher, tok, [e.prompt for e in test], max_new_tokens=48)
    expected = sum(TASK.is_correct(e, c) for e, c in zip(test, completions)) / len(test)
    assert accuracy(teacher, tok, TASK, test, batch_size=16) == expected
    # 4 new tokens cannot hold "ans=" and a number
    assert accuracy(teacher, tok, TASK, test, max_new_tokens=4) == 0.0
    model = make_model("xs", TOK, seed=0)
    with pytest.raises(ValueError, match="at least one example"):
        accuracy(model, TOK, TASK, [])


def test_warm_start_is_deterministic_and_cached(tmp_path):
    kwargs = dict(size="xs", steps=3, batch_size=4, cache_dir=tmp_path, progress=False)
    first = warm_start_student(TOK, seed=3, **kwargs)
    (cached,) = (tmp_path / "students").iterdir()
    assert "seed3-steps3-batch4" in cached.name
    again = warm_start_student(TOK, seed=3, **kwargs)  # loaded from the cache
    fresh = warm_start_student(TOK, seed=3, use_cache=False, **kwargs)
    other = warm_start_student(TOK, seed=4, use_cache=False, **kwargs)
    ids = torch.tensor([TOK("12+34=")["input_ids"]])
    assert torch.equal(first(ids).logits, again(ids).logits) and torch.equal(first(ids).logits, fresh(ids).logits)
    assert not torch.equal(first(ids).logits, other(ids).logits)
    assert len(list((tmp_path / "students").iterdir())) == 1
    assert json.loads((cached / "warm_start.json").read_text())["steps_done"] == 3


def test_warm_start_stops_at_the_first_check_that_reaches_the_target(tmp_path):
    warm_start_student(TOK, size="xs", steps=9, batch_size=2, target_accuracy=0.0, check_every=4, cache_dir=tmp_path,
                       progress=False)
    (cached,) = (tmp_path / "students").iterdir()
    assert json.loads((cached / "warm_start.json").read_text())["steps_done"] == 4


def test_exact_match_rate_is_the_share_greedy_decoding_writes_exactly():
    teacher, tok, _ = get_teacher(progress=False)
    examples = TASK.examples(12, seed=3, split="test")
    # corrupt every other completion: the teacher will not write those
    examples = [e if i % 2 else dataclasses.replace(e, completion=e.completion[:-1] + "7") for i, e in enumerate(examples)]
    greedy = generate_greedy(teacher, tok, [e.prompt for e in examples], max_new_tokens=48)
    expected = sum(g == e.completion for g, e in zip(greedy, examples)) / len(examples)
    assert 0.0 < expected < 1.0
    assert exact_match_rate(teacher, tok, examples) == expected


def test_a_run_that_stops_early_on_purpose_says_so_on_its_bar(capsys):
    examples = TASK.examples(8, seed=0, split="train")
    losses = train_supervised(make_model("xs", TOK, seed=0), TOK, examples, steps=50, batch_size=4, lr=1e-3, seed=0,
                              progress=True, should_stop=lambda done: done == 3)
    assert len(losses) == 3 and "stopped=target reached at step 3" in capsys.readouterr().err
