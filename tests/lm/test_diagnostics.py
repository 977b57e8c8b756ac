"""Per-step diagnostics (`opd.lm.diagnostics`) and the start-of-run check of a teacher's tokenizer conventions."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from opd.config import DistillConfig, SamplingArgs
from opd.config_notes import unused_flags
from opd.lm.batch import TeacherSignal, layout
from opd.lm.diagnostics import POSITIONS, TOP_K, completion_stats, topk_agreement
from opd.lm.hf.model import load_tokenizer, tokenizer_differences
from opd.lm.train import distill


def test_completion_stats_counts_lengths_and_only_the_completions_cut_without_ending():
    eos, cap = 9, 3
    # row 0 ends at the cap with eos (not cut); row 1 reaches the cap without eos (cut); row 2 ends early
    batch = layout([[1, 2], [1], [1, 2, 3]], [[4, 5, eos], [4, 5, 6], [eos]], pad_id=0)
    stats = completion_stats(batch, cap, eos)
    assert stats == {"completion_len_mean": pytest.approx(7 / 3), "completion_len_max": 3,
                     "cut_share": pytest.approx(1 / 3)}
    assert completion_stats(batch, cap, None)["cut_share"] == pytest.approx(2 / 3)  # no eos: every full one is cut
    assert completion_stats(batch, 4, eos)["cut_share"] == 0.0


def logits_head(weight_VD: torch.Tensor):
    return lambda h: h @ weight_VD.T


def test_topk_agreement_is_one_for_the_same_model_and_zero_for_disjoint_top_tokens():
    torch.manual_seed(0)
    V, D, N = 40, 8, 5
    head_w = torch.randn(V, D)
    hidden = torch.randn(N, D)
    mask = torch.ones(1, N, dtype=torch.bool)
    same = TeacherSignal(hidden_BTD=hidden[None], head=logits_head(head_w))
    out = topk_agreement(hidden, logits_head(head_w), same, mask)
    assert out["topk_overlap"] == pytest.approx(1.0)
    probs = torch.softmax(hidden @ head_w.T, -1)
    assert out["teacher_topk_mass"] == pytest.approx(probs.topk(TOP_K, -1).values.sum(-1).mean().item(), rel=1e-5)
    # a remote teacher whose sent top-k (in shuffled order) are the student's least likely tokens
    student_logits = hidden @ head_w.T
    bottom = student_logits.topk(TOP_K + 2, -1, largest=False).indices
    logp = torch.log(torch.full((N, TOP_K + 2), 0.05))
    logp[:, 0] = torch.log(torch.tensor(0.3))  # the first sent id is the teacher's most likely
    remote = TeacherSignal(topk_ids_BTK=bottom[None], topk_logp_BTK=logp[None])
    out = topk_agreement(hidden, logits_head(head_w), remote, mask)
    assert out["topk_overlap"] == 0.0
    assert out["teacher_topk_mass"] == pytest.approx(0.3 + 0.05 * (TOP_K + 1))  # everything the server sent
    # the server sends two of the student's least likely tokens first, most likely of all, then the student's top k:
    # the teacher's top k by log-prob are those two and k - 2 of the student's
    sent = torch.cat([bottom[:, :2], student_logits.topk(TOP_K, -1).indices], dim=1)
    logp = torch.log(torch.cat([torch.full((N, 2), 0.3), torch.linspace(0.03, 0.01, TOP_K).expand(N, TOP_K)], dim=1))
    out = topk_agreement(hidden, logits_head(head_w), TeacherSignal(topk_ids_BTK=sent[None], topk_logp_BTK=logp[None]),
                         mask)
    assert out["topk_overlap"] == pytest.approx((TOP_K - 2) / TOP_K)
    assert topk_agreement(hidden, logits_head(head_w), TeacherSignal(taken_logp_BT=torch.zeros(1, N)), mask) == {}


def test_topk_agreement_looks_at_a_bounded_number_of_positions():
    calls = []
    V, D, N = 30, 4, 1000
    w = torch.randn(V, D)

    def head(h):
        calls.append(h.shape[0])
        return h @ w.T
    hidden = torch.randn(N, D)
    topk_agreement(hidden, head, TeacherSignal(hidden_BTD=hidden[None], head=head), torch.ones(1, N, dtype=torch.bool))
    assert calls == [POSITIONS, POSITIONS]


def run_cfg(dirs, out, **kw) -> DistillConfig:
    base = dict(student=dirs["student"], teacher=dirs["teacher"], steps=2, batch_size=4, eval_every=0, save_every=10,
                sampling=SamplingArgs(max_new_tokens=6), out_dir=str(out), progress=False)
    return DistillConfig(**{**base, **kw})


def test_a_run_logs_the_diagnostics_each_step(model_dirs, tmp_path):
    distill(run_cfg(model_dirs, tmp_path / "run"))
    distill(run_cfg(model_dirs, tmp_path / "self", teacher="self"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for m in rows:
        assert 0.0 <= m["topk_overlap"] <= 1.0 and 0.0 < m["teacher_topk_mass"] <= 1.0 + 1e-6
        assert 1 <= m["completion_len_mean"] <= m["completion_len_max"] <= 6 and 0.0 <= m["cut_share"] <= 1.0
    first = json.loads((tmp_path / "self" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["topk_overlap"] == 1.0  # at the start the student is its own teacher
    assert rows[0]["topk_overlap"] < 1.0  # two random models disagree


@pytest.fixture()
def other_conventions(model_dirs, tmp_path):
    """The teacher's weights with a tokenizer that shares the vocabulary but ends with another token and has a chat
    template."""
    out = tmp_path / "teacher-chat"
    shutil.copytree(model_dirs["teacher"], out)
    tok = load_tokenizer(model_dirs["teacher"])
    tok.eos_token = tok.convert_ids_to_tokens(5)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(out)
    return str(out)


def test_a_teacher_with_another_eos_or_chat_template_is_refused_in_one_line_unless_allowed(
        model_dirs, other_conventions, tmp_path):
    differences = tokenizer_differences(load_tokenizer(model_dirs["student"]), load_tokenizer(other_conventions))
    assert len(differences) == 2 and differences[1] == "chat template: only the teacher has one"
    assert differences[0].startswith("end-of-sequence token: student")
    with pytest.raises(ValueError) as e:
        distill(run_cfg(model_dirs, tmp_path / "run", teacher=other_conventions))
    line = str(e.value)
    assert "\n" not in line and "end-of-sequence token" in line and "--allow-tokenizer-mismatch" in line
    assert not (tmp_path / "run" / "checkpoint").exists()
    distill(run_cfg(model_dirs, tmp_path / "run", teacher=other_conventions, allow_tokenizer_mismatch=True))
    assert (tmp_path / "run" / "checkpoint").exists()
    assert tokenizer_differences(load_tokenizer(model_dirs["student"]), load_tokenizer(model_dirs["teacher"])) == []


def test_allow_tokenizer_mismatch_is_warned_about_where_nothing_is_checked(model_dirs, tmp_path):
    assert any("--allow-tokenizer-mismatch does nothing" in n for n in unused_flags(
        run_cfg(model_dirs, tmp_path, teacher="self", allow_tokenizer_mismatch=True)))
    assert not unused_flags(run_cfg(model_dirs, tmp_path, allow_tokenizer_mismatch=True))
