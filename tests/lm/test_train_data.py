"""The loop on a user's own data: files, the Python API with callbacks, checkers, LoRA and the training knobs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.config import DistillConfig, LoraArgs, OptimArgs, SamplingArgs
from opd.lm import train as train_module
from opd.lm.train import distill, lr_factor
from opd.tasks import get_task


def rows(n, split="train"):
    return [{"question": e.prompt, "solution": e.completion, "final": e.answer}
            for e in get_task("arithmetic").examples(n, seed=0, split=split)]


def jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def cfg(dirs, tmp_path, **kw):
    base = dict(student=dirs["student"], teacher=dirs["teacher"], steps=2, batch_size=4, eval_examples=4,
                eval_every=0, save_every=10, sampling=SamplingArgs(max_new_tokens=8), out_dir=str(tmp_path / "run"),
                progress=False)
    return DistillConfig(**{**base, **kw})


def metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("source,loss", [("student", "reverse_kl"), ("data", "sft"), ("mixture", "jsd")])
def test_training_on_a_jsonl_file_with_mapped_columns_and_a_checker(model_dirs, tmp_path, source, loss):
    train, held_out = jsonl(tmp_path / "train.jsonl", rows(16)), jsonl(tmp_path / "test.jsonl", rows(4, "test"))
    out = distill(cfg(model_dirs, tmp_path, data=train, eval_data=held_out, checker="regex:ans=(\\d+)", eval_every=5,
                      data_fields="prompt=question,completion=solution,answer=final", source=source, loss=loss))
    assert 0.0 <= out["accuracy"] <= 1.0 and [m["step"] for m in metrics(tmp_path)] == [1, 2]


def test_the_python_api_takes_prompts_a_checker_and_callbacks_that_log_and_stop(model_dirs, tmp_path):
    seen = []

    def checker(row, completion):
        seen.append(row["answer"])
        return 0.25

    def callback(step, student, m):
        m["my_metric"] = step * 10  # logged with the step's metrics
        return step == 3  # early stopping

    test = [{"prompt": r["question"], "answer": r["final"]} for r in rows(4, "test")]
    out = distill(cfg(model_dirs, tmp_path, steps=6, eval_every=1), prompts=[r["question"] for r in rows(8)],
                  eval_prompts=test, checker=checker, callbacks=[callback])
    # the checker is tried once on the first held-out row before training, then scores every held-out row
    assert out["accuracy"] == 0.25 and seen[:5] == [test[0]["answer"]] + [r["answer"] for r in test]
    assert [(m["step"], m["my_metric"]) for m in metrics(tmp_path)] == [(1, 10), (2, 20), (3, 30)]
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3  # stopped early with a checkpoint


def test_the_python_api_maps_columns_with_data_fields_as_the_flags_do(model_dirs, tmp_path):
    # rows with the user's own column names, passed as Python lists: data_fields renames them as it does for --data
    out = distill(cfg(model_dirs, tmp_path, steps=1, source="data", loss="sft", eval_every=1,
                      data_fields="prompt=question,completion=solution,answer=final"),
                  prompts=rows(8), eval_prompts=rows(4, "test"), checker="exact")
    assert out["step"] == 1 and 0.0 <= out["accuracy"] <= 1.0


def test_samples_per_prompt_gives_a_group_of_completions_per_prompt(model_dirs, tmp_path, monkeypatch):
    sizes, real = [], train_module.student_loss
    monkeypatch.setattr(train_module, "student_loss",
                        lambda student, batch, *a: sizes.append(batch.input_ids_BL.shape[0]) or real(student, batch, *a))
    distill(cfg(model_dirs, tmp_path, steps=1, batch_size=2, samples_per_prompt=3))
    assert sizes == [6]


def test_gradient_accumulation_gives_the_update_of_one_pass(model_dirs, tmp_path):
    weights, grad_norms = [], []
    for accum in (1, 2, 4):
        run = tmp_path / f"a{accum}"
        distill(cfg(model_dirs, run, steps=1, source="data", loss="sft", teacher=None, train_examples=16,
                    optim=OptimArgs(grad_accum=accum, warmup_steps=1)))
        weights.append(load_file(run / "run" / "checkpoint" / "model.safetensors"))
        grad_norms.append(metrics(run)[0]["grad_norm"])  # AdamW's step hides a gradient k times too large; this not
    for other in weights[1:]:
        assert all(torch.allclose(weights[0][k], other[k], atol=1e-6) for k in weights[0])
    assert grad_norms == pytest.approx([grad_norms[0]] * 3, rel=1e-5)
    changed = load_file(Path(model_dirs["student"]) / "model.safetensors")
    assert any(not torch.allclose(changed[k], weights[0][k]) for k in changed)


def test_lr_schedules():
    warm = OptimArgs(warmup_steps=2)
    assert [lr_factor(s, warm, 6) for s in range(6)] == [0.5, 1, 1, 1, 1, 1]
    linear = OptimArgs(warmup_steps=2, schedule="linear")
    assert [lr_factor(s, linear, 6) for s in range(6)] == [0.5, 1, 1, 0.75, 0.5, 0.25]
    cosine = OptimArgs(warmup_steps=2, schedule="cosine")
    assert [round(lr_factor(s, cosine, 6), 4) for s in range(6)] == [0.5, 1, 1, 0.8536, 0.5, 0.1464]


def test_the_logged_lr_follows_the_schedule_and_a_resume_takes_the_new_lr(model_dirs, tmp_path):
    distill(cfg(model_dirs, tmp_path, steps=2, save_every=2, optim=OptimArgs(lr=1e-2, warmup_steps=2)))
    distill(cfg(model_dirs, tmp_path, steps=4, resume=True, optim=OptimArgs(lr=1e-3, warmup_steps=2,
                                                                           schedule="linear")))
    assert [m["lr"] for m in metrics(tmp_path)] == pytest.approx([5e-3, 1e-2, 1e-3, 5e-4])


def test_a_lora_student_trains_only_its_adapters_and_resumes_bit_for_bit(model_dirs, tmp_path):
    lora = LoraArgs(r=4, target_modules=("q_proj", "v_proj"))
    straight = cfg(model_dirs, tmp_path / "a", steps=4, lora=lora, source="mixture",
                   optim=OptimArgs(lr=1e-2, warmup_steps=1))
    distill(straight)
    ckpt = Path(straight.out_dir) / "checkpoint"
    assert (ckpt / "adapter_config.json").exists() and not (ckpt / "model.safetensors").exists()
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter) and any(v.abs().sum() > 0 for k, v in adapter.items()
                                                                   if "lora_B" in k)
    distill(cfg(model_dirs, tmp_path / "b", steps=2, lora=lora, source="mixture",
                optim=OptimArgs(lr=1e-2, warmup_steps=1)))
    distill(cfg(model_dirs, tmp_path / "b", steps=4, lora=lora, source="mixture", resume=True,
                optim=OptimArgs(lr=1e-2, warmup_steps=1)))
    resumed = load_file(tmp_path / "b" / "run" / "checkpoint" / "adapter_model.safetensors")
    assert all(torch.equal(adapter[k], resumed[k]) for k in adapter)


def test_bad_data_flags_fail_before_training(model_dirs, tmp_path):
    train = jsonl(tmp_path / "train.jsonl", [{"prompt": r["question"]} for r in rows(4)])
    for kw, match in [
        (dict(eval_data=train), "--eval-data needs a checker"),
        (dict(eval_data=train, checker="numeric"), "--eval-data has no 'answer' column"),
        (dict(checker="nope"), None),
        (dict(source="data", loss="sft"), "no 'completion'"),
        (dict(lora=LoraArgs(r=2, target_modules=("nothing_here",))), "nothing_here"),
    ]:
        kw = {"data": train, **kw}
        if match is None:  # an unknown checker with no held-out data is never used: only eval data needs one
            kw["eval_data"], match = train, "unknown checker 'nope'"
        with pytest.raises(ValueError, match=match):
            distill(cfg(model_dirs, tmp_path, **kw))
    assert not (tmp_path / "run" / "checkpoint").exists()
