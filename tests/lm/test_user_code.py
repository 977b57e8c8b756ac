"""Your own checker or callback raising: refused before training where it can be, and never losing a run after."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.checkpoint import find_checkpoint
from opd.config import OptimArgs
from opd.lm.train import TrainingError, distill
from tests.lm.test_train import tiny_cfg


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def answer_in_completion(row, completion):
    """The README's first checker, which fails when answers are JSON numbers."""
    return float(row["answer"] in completion)


def test_a_checker_that_cannot_work_on_these_rows_is_refused_before_training(model_dirs, tmp_path):
    rows = [{"prompt": "1+2=", "completion": "3", "answer": 3}] * 8  # answers as numbers, as JSON files give them
    cfg = tiny_cfg(model_dirs, tmp_path, eval_every=1)
    with pytest.raises(ValueError, match="answer_in_completion fails on the first row of eval_prompts") as err:
        distill(cfg, prompts=rows, eval_prompts=rows, checker=answer_in_completion)
    assert "TypeError" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any step


class FailsAfter:
    """A checker (or callback) that works `calls` times, then raises."""

    def __init__(self, calls: int):
        self.calls = calls

    def __call__(self, *args):
        self.calls -= 1
        if self.calls < 0:
            raise KeyError("field")
        return 0.0


@pytest.mark.parametrize("where", ["checker", "callback"])
def test_user_code_raising_mid_run_leaves_the_step_logged_and_a_checkpoint_to_resume(model_dirs, tmp_path, where):
    straight = tiny_cfg(model_dirs, tmp_path / "straight", steps=3, save_every=10, eval_every=2)
    distill(straight)
    cfg = tiny_cfg(model_dirs, tmp_path / "broken", steps=3, save_every=10, eval_every=2)
    if where == "checker":  # the probe before training, then the 4 held-out rows of step 2's evaluation
        kwargs = dict(checker=FailsAfter(1 + 2))
    else:
        kwargs = dict(callbacks=[FailsAfter(1)])
    with pytest.raises(TrainingError) as err:
        distill(cfg, **kwargs)
    message = str(err.value)
    assert "KeyError" in message and "checkpoint at step 2" in message and "--resume" in message, message
    assert "\n" not in message
    assert [m["step"] for m in metrics(cfg.out_dir)] == [1, 2]
    assert json.loads((find_checkpoint(Path(cfg.out_dir) / "checkpoint") / "trainer_state.json").read_text())[
        "step"] == 2
    distill(tiny_cfg(model_dirs, tmp_path / "broken", steps=3, save_every=10, eval_every=2, resume=True))
    a, b = (load_file(Path(c.out_dir) / "checkpoint" / "model.safetensors") for c in (straight, cfg))
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run must end where the unbroken one does"
    assert [m["loss"] for m in metrics(cfg.out_dir)] == [m["loss"] for m in metrics(straight.out_dir)]
    # the evaluation the checker broke is redone when the run resumes (logged with the next step); a callback raised
    # after it had been logged
    resumed = metrics(cfg.out_dir)[2]
    if where == "checker":
        assert resumed["accuracy_at_start"] == metrics(straight.out_dir)[1]["accuracy"]
    else:
        assert "accuracy_at_start" not in resumed and "accuracy" in metrics(cfg.out_dir)[1]


def test_a_warm_up_longer_than_the_run_and_a_resume_are_announced(model_dirs, tmp_path, capsys):
    cfg = tiny_cfg(model_dirs, tmp_path, steps=2, save_every=1)  # the default warm-up is 10 updates
    distill(cfg)
    assert "--optim.warmup-steps 10 is longer than the run (--steps 2)" in capsys.readouterr().err
    distill(tiny_cfg(model_dirs, tmp_path, steps=3, save_every=1, resume=True))
    assert "opd: resuming at step 2 from" in capsys.readouterr().err


def test_eval_on_start_scores_the_starting_weights_and_an_early_stop_still_ends_with_a_score(model_dirs, tmp_path):
    from opd.lm.eval import greedy_completions
    from opd.lm.hf.model import load_model, load_tokenizer

    prompts = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(4)]
    tokenizer = load_tokenizer(model_dirs["student"])
    start = greedy_completions(load_model(model_dirs["student"]), tokenizer,
                               [tokenizer.encode(p["prompt"]) for p in prompts], 8)
    calls = []

    def same_as_the_start(row, completion):  # 1.0 where the completion is the starting model's own
        calls.append(completion)
        return float(completion == start[[p["prompt"] for p in prompts].index(row["prompt"])])

    distill(tiny_cfg(model_dirs, tmp_path, steps=5, eval_every=50, eval_on_start=True,
                     optim=OptimArgs(lr=0.05, warmup_steps=0)),
            eval_prompts=prompts, checker=same_as_the_start, callbacks=[lambda step, model, m: step == 2])
    rows = metrics(tmp_path / "run")
    assert rows[0]["accuracy_at_start"] == 1.0  # scored before the first update
    assert [r["step"] for r in rows] == [1, 2] and "accuracy" not in rows[0]
    assert 0.0 <= rows[1]["accuracy"] < 1.0  # stopped early at step 2 (eval_every 50), scored all the same, trained
