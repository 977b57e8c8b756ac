import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd import tasks
from opd.config import OptimArgs, SamplingArgs
from opd.lm.hf.model import load_model
from opd.lm.recipes.rl import RLConfig, group_advantages, rl, rl_loss
from opd.lm.batch import build_batch, encode_prompts
from opd.tasks import get_task
from opd.tasks.arithmetic import ArithmeticTask


def test_group_advantages_hand_example():
    rewards_PG = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    # group 0: mean 1/2, sample std sqrt(1/3); group 1: all equal -> 0; group 2: mean 1/4, std 1/2
    expected = torch.tensor([[0.75**0.5, -(0.75**0.5), -(0.75**0.5), 0.75**0.5], [0.0] * 4, [-0.5, -0.5, -0.5, 1.5]])
    assert torch.allclose(group_advantages(rewards_PG, eps=1e-12), expected, atol=1e-6)
    centred = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]])
    assert torch.equal(group_advantages(rewards_PG, scale_by_std=False), centred)
    with pytest.raises(ValueError, match="group of at least 2"):
        group_advantages(torch.ones(3, 1))


def test_rl_loss_is_minus_advantage_weighted_log_likelihood_per_token(model_dirs, tokenizer):
    student = load_model(model_dirs["student"])
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    batch = build_batch([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 15]], pad, eos)
    advantages_B = torch.tensor([2.0, -0.5])
    loss, m = rl_loss(student, batch, advantages_B, chunk_size=2)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    # brute force: plain forward, full log-softmax, sum of A·log π over the 3 + 5 completion tokens
    logits = student(batch.input_ids_BL, attention_mask=batch.attention_mask_BL,
                     position_ids=(batch.attention_mask_BL.cumsum(-1) - 1).clamp(min=0)).logits[:, :-1]
    logp_BT = torch.log_softmax(logits, -1).gather(-1, batch.targets_BT.unsqueeze(-1)).squeeze(-1)
    mask_BT = batch.mask_BT.float()
    assert mask_BT.sum(1).tolist() == [3, 5]
    surrogate = -(advantages_B[:, None] * logp_BT * mask_BT).sum() / mask_BT.sum()
    surrogate.backward()
    assert loss.item() == pytest.approx(-(2.0 * 3 - 0.5 * 5) / 8)  # the importance weight is exactly 1
    for n, p in student.named_parameters():
        assert torch.allclose(ours[n], p.grad, atol=1e-6), n


@dataclass(frozen=True)
class StartsWithSeven(ArithmeticTask):
    """Toy reward: 1 iff the completion starts with the character 7."""

    name: str = "starts-with-7"

    def is_correct(self, example, completion: str) -> bool:
        return completion.startswith("7")


def _p_first_is_seven(model, tokenizer) -> float:
    prompts = encode_prompts(tokenizer, [e.prompt for e in get_task("arithmetic").examples(16, 0, "test")], 100)
    seven = tokenizer.convert_tokens_to_ids("7")
    with torch.no_grad():
        return sum(torch.softmax(model(torch.tensor([p])).logits[0, -1], -1)[seven].item() for p in prompts) / 16


def test_a_few_dozen_rl_steps_raise_a_sparse_reward(model_dirs, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(tasks.TASKS, "starts-with-7", StartsWithSeven)
    cfg = RLConfig(student=model_dirs["student"], task="starts-with-7", steps=30, batch_size=8, group_size=8,
                   sampling=SamplingArgs(max_new_tokens=2), optim=OptimArgs(lr=3e-2, warmup_steps=1),
                   train_examples=64, eval_examples=4, eval_every=0, save_every=30, out_dir=str(tmp_path),
                   progress=False)
    before = _p_first_is_seven(load_model(model_dirs["student"]), tokenizer)
    rl(cfg)
    after = _p_first_is_seven(load_model(str(tmp_path / "checkpoint")), tokenizer)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = (sum(m["reward"] for m in ms) / 5 for ms in (lines[:5], lines[-5:]))
    assert before < 0.1 and after > 0.5, (before, after)
    assert last > first + 0.3, (first, last)


def test_rl_writes_a_run_logs_flops_and_resumes_bit_for_bit(model_dirs, tmp_path):
    def cfg(out, **kw):
        kw = {"steps": 4, **kw}
        return RLConfig(student=model_dirs["student"], batch_size=2, group_size=3, save_every=2,
                        sampling=SamplingArgs(max_new_tokens=6), train_examples=32, eval_examples=2, eval_every=2,
                        out_dir=str(tmp_path / out), progress=False, **kw)

    out = rl(cfg("a"))
    assert 0.0 <= out["accuracy"] <= 1.0
    run = tmp_path / "a"
    assert json.loads((run / "config.json").read_text())["group_size"] == 3
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and ["accuracy" in m for m in lines] == [False, True, False, True]
    for m in lines:
        assert m["flops_teacher_score"] == m["flops_teacher_generate"] == 0
        assert m["flops_update"] == 3 * m["flops_sample"] > 0 and m["flops"] == 4 * m["flops_sample"]
    assert lines[-1]["total_flops"] == pytest.approx(sum(m["flops"] for m in lines))
    rl(cfg("b", steps=2))
    rl(cfg("b", resume=True))
    a, b = (load_file(tmp_path / r / "checkpoint" / "model.safetensors") for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rl_refuses_groups_of_one(model_dirs, tmp_path):
    with pytest.raises(ValueError, match="group_size"):
        rl(RLConfig(student=model_dirs["student"], group_size=1, out_dir=str(tmp_path), progress=False))
