"""`distill --tools`: whole runs with multi-turn tool conversations, and a tool that fails mid-run."""

import json

import pytest

from opd.config import DistillConfig, SamplingArgs
from opd.lm.batch import layout
from opd.lm.loop.process import TrainingError
from opd.lm.train import distill
from opd.tasks import get_task
from opd.tasks.tokenizer import build_tokenizer
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def tools_models(tmp_path_factory):
    """Tiny teacher and student for the arithmetic-tools task's tokenizer."""
    tok = build_tokenizer(get_task("arithmetic-tools"))
    root = tmp_path_factory.mktemp("tools-models")
    for name, hidden, seed in (("teacher", 32, 1), ("student", 16, 2)):
        tiny_llama(tok, hidden, 1, seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {"teacher": str(root / "teacher"), "student": str(root / "student"), "tokenizer": tok}


def config(models, tmp_path, **kw) -> DistillConfig:
    base = dict(student=models["student"], teacher=models["teacher"], task="arithmetic-tools", tools="calc",
                max_turns=5, steps=2, batch_size=4, train_examples=16, eval_examples=4, eval_every=2, save_every=1,
                sampling=SamplingArgs(max_new_tokens=12), out_dir=str(tmp_path / "run"), progress=False, threads=1)
    return DistillConfig(**{**base, **kw})


def always_calls(monkeypatch, tok):
    """Every turn the student writes is `calc(1+1)` and its end of turn, whatever its weights."""
    call = tok("calc(1+1)", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def sample(model, prompt_ids, pad_id, eos_id, max_new_tokens, *args, **kwargs):
        return layout(prompt_ids, [call for _ in prompt_ids], pad_id)

    monkeypatch.setattr("opd.lm.rollouts.actors.sample", sample)


def test_a_run_with_the_calculator_logs_its_conversations_and_scores_them_with_the_tool(tools_models, tmp_path,
                                                                                         monkeypatch):
    always_calls(monkeypatch, tools_models["tokenizer"])
    last = distill(config(tools_models, tmp_path))
    # five turns each (the fifth call is not answered: --max-turns), four answered calls, none failed
    assert (last["turns"], last["tool_calls"], last["tool_call_errors"]) == (5.0, 4.0, 0.0)
    assert 0.0 <= last["accuracy"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_source_teacher_holds_conversations_too(tools_models, tmp_path, monkeypatch):
    always_calls(monkeypatch, tools_models["tokenizer"])
    last = distill(config(tools_models, tmp_path, source="teacher", loss="sft", eval_every=0))
    assert last["tool_calls"] == 4.0 and last["source"] == "teacher"


def test_a_tool_that_raises_mid_run_saves_the_step_and_resume_finishes_after_the_fix(tools_models, tmp_path,
                                                                                      monkeypatch):
    always_calls(monkeypatch, tools_models["tokenizer"])
    (tmp_path / "flaky_tool.py").write_text("broken = True\n\ndef answer(turn):\n"
                                            "    if broken:\n        raise ConnectionError('service down')\n"
                                            "    return '2'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config(tools_models, tmp_path, tools="flaky_tool:answer", eval_every=0)
    with pytest.raises(TrainingError) as e:
        distill(cfg)
    message = str(e.value)
    assert "\n" not in message
    assert "the tool flaky_tool:answer raised ConnectionError: service down on row" in message
    assert "Saved a checkpoint at step 0" in message and "--resume" in message
    import flaky_tool

    monkeypatch.setattr(flaky_tool, "broken", False)
    last = distill(config(tools_models, tmp_path, tools="flaky_tool:answer", eval_every=0, resume=True))
    assert last["step"] == 2 and last["tool_calls"] == 4.0


def test_the_tools_task_without_tools_and_a_tool_that_does_not_import_fail_before_weights_load(tools_models,
                                                                                                tmp_path):
    with pytest.raises(ValueError, match="task arithmetic-tools is solved with a tool: pass --tools calc"):
        distill(config(tools_models, tmp_path, tools=None))
    with pytest.raises(ValueError, match="tool no_such_module:f: cannot import no_such_module"):
        distill(config(tools_models, tmp_path, tools="no_such_module:f"))
    with pytest.raises(ValueError, match="neither calc nor module:function"):
        distill(config(tools_models, tmp_path, tools="calculator"))


def test_opd_eval_holds_the_tasks_tool_conversations_and_reports_their_calls(tools_models, monkeypatch, capsys):
    from opd.lm.eval import EvalArgs, eval_main

    tok = tools_models["tokenizer"]
    call = tok("calc(1+1)", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    monkeypatch.setattr("opd.lm.hf.decode.sample_completions", lambda model, prompts, *a, **k: [call for _ in prompts])
    result = eval_main(EvalArgs(model=tools_models["student"], task="arithmetic-tools", examples=4, show=0))
    # the task's own tool and turn limits: 5 turns, 4 answered calls, at the default --max-new-tokens
    assert (result["tools"], result["tool_calls"], result["tool_call_valid"], result["accuracy"]) == ("calc", 4.0, 1.0,
                                                                                                      0.0)
    result = eval_main(EvalArgs(model=tools_models["student"], task="arithmetic-tools", tools="calc", examples=4,
                                max_new_tokens=12, max_turns=3, show=0))
    assert (result["tool_calls"], result["tool_call_valid"]) == (2.0, 1.0)


def test_the_tools_tasks_accuracy_fits_its_conversations_in_the_context_at_the_default_turn_length(tools_models,
                                                                                                   monkeypatch):
    """`accuracy` asks for 64 new tokens by default; a turn of the task never needs more than `max_turn_tokens`, and
    `max_turns` turns of that fit the task's 128-token context (else the conversation would stop the evaluation)."""
    from opd.lm.eval import tool_conversations
    from opd.lm.hf.model import load_model

    tok, task = tools_models["tokenizer"], get_task("arithmetic-tools")
    longest = tok(" calc(9+9+1)", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    monkeypatch.setattr("opd.lm.hf.decode.sample_completions", lambda model, prompts, *a, **k: [longest] * len(prompts))
    result = tool_conversations(load_model(tools_models["student"]), tok, task, task.examples(4, 0, "test"))
    assert result["tool_calls"] == task.max_turns - 1 and result["accuracy"] == 0.0
