"""SKD's interleaved sampling (opd.lm.rollouts.speculative): against plain sampling, the teacher's greedy decoding, a slow
per-token reference, and in the training loop."""

import json
from pathlib import Path

import pytest
import torch

from opd import flops
from opd.config import DistillConfig, SamplingArgs
from opd.config_notes import unused_flags
from opd.lm.batch import encode_prompts
from opd.lm.hf.decode import sample_completions
from opd.lm.rollouts.speculative import BLOCK, block_for, speculative_actor, speculative_completions
from opd.lm.teachers.local import LocalTeacher
from opd.lm.train import distill
from tests.conftest import tiny_gpt2, tiny_llama
from tests.lm.test_train import tiny_cfg

PROMPTS = ["12+34=", "5+6=", "999+1=", "7+7=", "1+1=", "2468+1357="]


@pytest.fixture
def pair(tokenizer):
    """A student and a teacher (different random tiny Llamas), the teacher likely to end early, so that rows stop at
    different rounds; and prompts of different lengths (left padding)."""
    student, teacher = tiny_llama(tokenizer, 16, 1, seed=2), tiny_llama(tokenizer, 32, 2, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight[tokenizer.eos_token_id] *= 3.0
        student.lm_head.weight[tokenizer.eos_token_id] *= 2.0
    return student, teacher, encode_prompts(tokenizer, PROMPTS, 100)


def test_identical_models_with_k_equal_v_accept_everything_and_equal_plain_sampling(pair, tokenizer):
    student, _, prompts = pair
    pad, V = tokenizer.pad_token_id, len(tokenizer)
    # no eos: no row leaves the batch, so both samplers draw the same uniforms in the same order
    torch.manual_seed(5)
    plain = sample_completions(student, prompts, pad, None, 11)
    for block in (1, 3, 4):
        torch.manual_seed(5)
        got, counts = speculative_completions(student, student, prompts, pad, None, 11, top_k=V, block=block)
        assert got == plain
        assert counts.acceptance == 1.0 and counts.replaced == 0 and counts.proposals == 11 * len(prompts)
    # one row with eos: its draws stop where plain sampling's do
    eos = tokenizer.eos_token_id
    for seed in range(4):
        torch.manual_seed(seed)
        plain = sample_completions(student, prompts[:1], pad, eos, 30)
        torch.manual_seed(seed)
        got, counts = speculative_completions(student, student, prompts[:1], pad, eos, 30, top_k=V)
        assert got == plain and counts.acceptance == 1.0


def test_identical_greedy_models_accept_every_proposal_at_k_1(pair, tokenizer):
    """The student's argmax is the teacher's argmax at every position: the teacher's logits line up with the
    proposals they judge, through holes-free caches, padding and rows that stop early."""
    student, _, prompts = pair
    got, counts = speculative_completions(student, student, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id,
                                          20, top_k=1, temperature=0.0)
    assert counts.acceptance == 1.0 and counts.replaced == 0
    assert got == sample_completions(student, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, 20, 0.0)


@pytest.mark.parametrize("block,adaptive", [(1, False), (2, False), (7, False), (4, True)])
def test_top_1_with_a_greedy_teacher_is_the_teachers_greedy_decoding(pair, tokenizer, block, adaptive):
    student, teacher, prompts = pair
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    greedy = sample_completions(teacher, prompts, pad, eos, 20, temperature=0.0)
    assert len({len(c) for c in greedy}) > 1  # rows end at different rounds
    torch.manual_seed(0)
    got, counts = speculative_completions(student, teacher, prompts, pad, eos, 20, top_k=1, temperature=1.0,
                                          teacher_temperature=0.0, block=block, adaptive=adaptive)
    assert got == greedy
    assert counts.replaced > 0 and counts.accepted > 0  # both ways of landing on the argmax happened
    assert counts.proposals == sum(map(len, greedy)) == counts.accepted + counts.replaced


@torch.no_grad()
def _reference(student, teacher, prompt, eos, max_new_tokens, top_k):
    """SKD one token at a time, both models re-run on the whole prefix for every token (greedy both sides)."""
    seq, accepted, replaced = list(prompt), 0, 0
    for _ in range(max_new_tokens):
        ids = torch.tensor([seq])
        proposal = int(student(input_ids=ids).logits[0, -1].argmax())
        t_logits = teacher(input_ids=ids).logits[0, -1]
        if int((t_logits > t_logits[proposal]).sum()) < top_k:
            token, accepted = proposal, accepted + 1
        else:
            token, replaced = int(t_logits.argmax()), replaced + 1
        seq.append(token)
        if token == eos:
            break
    return seq[len(prompt):], accepted, replaced


@pytest.mark.parametrize("top_k,block,adaptive", [(2, 4, True), (2, 4, False), (3, 3, False), (5, 6, False),
                                                   (5, 6, True), (2, 1, False)])
def test_block_path_matches_a_per_token_reference_that_reruns_both_models(pair, tokenizer, top_k, block, adaptive):
    student, teacher, prompts = pair
    eos = tokenizer.eos_token_id
    expected = [_reference(student, teacher, p, eos, 16, top_k) for p in prompts]
    got, counts = speculative_completions(student, teacher, prompts, tokenizer.pad_token_id, eos, 16, top_k=top_k,
                                          temperature=0.0, block=block, adaptive=adaptive)
    assert got == [e[0] for e in expected]
    assert counts.accepted == sum(e[1] for e in expected) and counts.replaced == sum(e[2] for e in expected)
    assert 0 < counts.acceptance < 1  # a mix: rows advance at different speeds, leaving holes in the caches


@pytest.mark.parametrize("top_k,block,adaptive", [(2, 4, True), (3, 2, False)])
def test_absolute_position_models_match_the_per_token_reference_through_padding_and_holes(tokenizer, top_k, block,
                                                                                          adaptive):
    """GPT-2's learned position embeddings see wrong position ids (left padding, the holes rejected proposals leave
    in the caches) that rotary Llamas are blind to; the reference runs each row alone, unpadded and hole-free."""
    student, teacher = tiny_gpt2(tokenizer, 16, 1, seed=2), tiny_gpt2(tokenizer, 32, 2, seed=1)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        teacher.lm_head.weight[eos] *= 2.0
    prompts = encode_prompts(tokenizer, PROMPTS, 100)
    expected = [_reference(student, teacher, p, eos, 16, top_k) for p in prompts]
    got, counts = speculative_completions(student, teacher, prompts, tokenizer.pad_token_id, eos, 16, top_k=top_k,
                                          temperature=0.0, block=block, adaptive=adaptive)
    assert got == [e[0] for e in expected]
    assert counts.accepted == sum(e[1] for e in expected) and counts.replaced == sum(e[2] for e in expected)
    assert 0 < counts.acceptance < 1 and len({len(c) for c in got}) > 1


def test_work_counts_equal_one_forward_pass_when_every_proposal_is_kept(pair, tokenizer):
    """With nothing rejected and no eos, each model fed every token of prompt + completion but the last, once."""
    student, teacher, prompts = pair
    pad, V, n = tokenizer.pad_token_id, len(tokenizer), 9
    completions, counts = speculative_completions(student, teacher, prompts, pad, None, n, top_k=V, block=4)
    P = max(map(len, prompts))
    attn_BL = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + n - 1) for p in prompts])
    for work in (counts.student, counts.teacher):
        assert work.tokens == int(attn_BL.sum())
        assert work.attended == int((attn_BL.sum(-1) * (attn_BL.sum(-1) + 1) // 2).sum())
    assert counts.student.head_positions == len(prompts) * n  # one position per draw
    assert counts.teacher.head_positions == len(prompts) * (4 + 4 + 1)  # a block's worth per pass: 4, 4, then 1
    cost = flops.model_cost(teacher)
    assert counts.teacher.flops(cost) == pytest.approx(
        flops.forward_flops(cost, attn_BL, torch.zeros(1, 0)) + 2.0 * cost.head_params * 9 * len(prompts))


def test_distill_with_source_speculative_logs_the_acceptance_rate(model_dirs, tmp_path):
    cfg = tiny_cfg(model_dirs, tmp_path, source="speculative", skd_top_k=3, steps=3)
    distill(cfg)
    lines = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert 0.0 <= m["skd_acceptance"] <= 1.0 and m["skd_proposals"] == m["completion_tokens"]
        assert m["skd_replacements"] == round(m["skd_proposals"] * (1 - m["skd_acceptance"]))
        assert m["flops_teacher_generate"] > 0 and m["flops_sample"] > 0
        assert m["flops"] == pytest.approx(sum(m[k] for k in flops.FLOP_KINDS))
    assert any(0.0 < m["skd_acceptance"] < 1.0 for m in lines)
    assert all(m["skd_rounds"] >= 8 / BLOCK for m in lines)  # 8 new tokens, at most BLOCK a round


def test_the_students_own_start_is_a_teacher_that_keeps_every_greedy_proposal(model_dirs, tmp_path):
    """--teacher self: before the first update the teacher is the student, so its greedy proposals are the teacher's
    first choices (K = 1): all kept."""
    cfg = tiny_cfg(model_dirs, tmp_path, source="speculative", teacher="self", skd_top_k=1, steps=1,
                   sampling=SamplingArgs(max_new_tokens=8, temperature=0.0))
    assert distill(cfg)["skd_acceptance"] == 1.0


def test_block_follows_the_expected_run_of_kept_proposals():
    assert [block_for(a, 4) for a in (0.0, 0.3, 0.6, 0.7, 0.75, 0.8, 0.95, 1.0)] == [1, 1, 1, 2, 3, 4, 4, 4]
    assert block_for(0.95, 8) == 8 and block_for(1.0) == BLOCK


@pytest.mark.parametrize("kw,match", [
    (dict(teacher="http://localhost:8000/v1"), "one local --teacher"),
    (dict(teacher=None, teachers="a=x,b=y", teacher_column="t"), "one local --teacher"),
    (dict(teacher=None), "one local --teacher"),
    (dict(sampler="http://localhost:8001/v1"), "drop --sampler"),
    (dict(overlap=True), "drop --overlap"),
    (dict(skd_top_k=0), "--skd-top-k must be >= 1"),
])
def test_config_errors_name_the_problem(kw, match):
    base = dict(student="s", teacher="t", source="speculative")
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        DistillConfig(**base)


def test_skd_top_k_is_an_unused_flag_for_other_sources():
    assert any("--skd-top-k" in n for n in unused_flags(DistillConfig(student="s", teacher="t", skd_top_k=5)))
    assert not unused_flags(DistillConfig(student="s", teacher="t", source="speculative", skd_top_k=5))


def test_the_actor_needs_one_local_teacher_model(pair, tokenizer):
    student, teacher, prompts = pair
    cfg = DistillConfig(student="s", teacher="t", source="speculative")
    with pytest.raises(ValueError, match="needs a local teacher model"):
        speculative_actor(cfg, student, object(), None, tokenizer.pad_token_id, tokenizer.eos_token_id)
    actor = speculative_actor(cfg, student, LocalTeacher(teacher), None, tokenizer.pad_token_id, None)
    assert actor.teacher_model is teacher and actor.top_k == 25


def test_bad_arguments_are_refused(pair, tokenizer):
    student, teacher, prompts = pair
    for kw, match in ((dict(top_k=0), "top_k"), (dict(top_k=2, block=0), "block"),
                      (dict(top_k=2, teacher_temperature=-1.0), "teacher_temperature")):
        with pytest.raises(ValueError, match=match):
            speculative_completions(student, teacher, prompts, tokenizer.pad_token_id, None, 4, **kw)
