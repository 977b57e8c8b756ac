import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from opd.config import DistillConfig, SamplingArgs
from opd.flops import ModelCost, forward_flops, logged_total, model_cost, step_flops
from opd.lm.train import distill


def test_forward_flops_match_torch_flop_counter():
    # Brute force: torch counts every matmul of an eager forward. HF computes logits at every position and the eager
    # attention multiplies the full L×L matrix (masked afterwards), so add back the masked half to compare.
    cfg = LlamaConfig(vocab_size=20, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    B, L = 3, 11
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(4, 20, (B, L)))
    cost = model_cost(model)
    ours = forward_flops(cost, torch.ones(B, L), torch.ones(B, L))
    masked_half = 4 * cost.n_layers * cost.d_attn * B * (L * L - L * (L + 1) / 2)
    assert ours + masked_half == counter.get_total_flops()


def test_model_cost_counts_weight_matrices_but_not_the_embedding_lookup():
    cfg = LlamaConfig(vocab_size=20, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    cost = model_cost(LlamaForCausalLM(cfg))
    # per layer: q and o 32×32, k and v 32×16 (2 kv heads of 8), gate/up/down 32×48
    assert cost == ModelCost(trunk_params=2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 48), head_params=20 * 32,
                             n_layers=2, d_attn=32)
    assert model_cost("Qwen/Qwen3-8B") is None  # a remote teacher: size unknown


def test_forward_flops_hand_example_skips_padding_and_counts_the_head_at_the_mask_only():
    cost = ModelCost(trunk_params=100, head_params=10, n_layers=2, d_attn=4)
    attention_mask_BL = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
    mask_BT = torch.tensor([[0, 1, 1], [0, 0, 0]])
    # 4 real tokens; contexts 1+2+3 and 1; head at 2 positions
    assert forward_flops(cost, attention_mask_BL, mask_BT) == 2 * 100 * 4 + 4 * 2 * 4 * 7 + 2 * 10 * 2


def test_step_flops_by_who_acts_and_who_scores():
    student, teacher = ModelCost(100, 10, 1, 4), ModelCost(1000, 10, 2, 8)
    attn, mask = torch.ones(2, 5), torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])
    s, t = forward_flops(student, attn, mask), forward_flops(teacher, attn, mask)
    on_policy = step_flops(student, teacher, attn, mask, "student", scored=True)
    assert on_policy == dict(flops_sample=s, flops_teacher_generate=0.0, flops_teacher_score=t, flops_update=3 * s,
                             flops=4 * s + t)
    sft = step_flops(student, teacher, attn, mask, "teacher", scored=False)
    assert sft["flops_teacher_generate"] == t and sft["flops_sample"] == 0 and sft["flops"] == t + 3 * s
    assert step_flops(student, teacher, attn, mask, "data", scored=True)["flops"] == t + 3 * s
    remote = step_flops(student, None, attn, mask, "student", scored=True)
    assert remote["flops_teacher_score"] is None and remote["flops"] == 4 * s
    with pytest.raises(ValueError, match="actor"):
        step_flops(student, teacher, attn, mask, "mixture", scored=True)


def _cfg(dirs, out, **kw) -> DistillConfig:
    base = dict(student=dirs["student"], teacher=dirs["teacher"], steps=4, batch_size=3, train_examples=32,
                eval_examples=2, eval_every=0, save_every=2, sampling=SamplingArgs(max_new_tokens=6), out_dir=str(out),
                progress=False)
    return DistillConfig(**{**base, **kw})


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_distill_logs_flops_per_step_and_a_running_total_that_survives_resume(model_dirs, tmp_path):
    distill(_cfg(model_dirs, tmp_path / "a", source="mixture", loss="jsd"))
    lines = _metrics(tmp_path / "a")
    totals = torch.tensor([m["flops"] for m in lines]).cumsum(0).tolist()
    assert [m["total_flops"] for m in lines] == pytest.approx(totals)
    for m in lines:
        assert m["flops_sample"] > 0 if m["source"] == "student" else m["flops_sample"] == 0
        assert m["flops_teacher_score"] > 0 and m["flops_teacher_generate"] == 0
    distill(_cfg(model_dirs, tmp_path / "b", source="mixture", loss="jsd", steps=2))
    distill(_cfg(model_dirs, tmp_path / "b", source="mixture", loss="jsd", resume=True))
    assert logged_total(tmp_path / "b" / "metrics.jsonl", 4) == pytest.approx(lines[-1]["total_flops"])


def test_sft_on_teacher_samples_pays_for_generation_not_scoring(model_dirs, tmp_path):
    distill(_cfg(model_dirs, tmp_path, source="teacher", loss="sft", steps=1))
    (m,) = _metrics(tmp_path)
    assert m["flops_teacher_generate"] > 0 and m["flops_teacher_score"] == 0 and m["flops_sample"] == 0
    assert m["flops"] == m["flops_teacher_generate"] + m["flops_update"]
