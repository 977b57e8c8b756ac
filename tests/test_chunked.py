"""Tests for opd.chunked: chunked equals plain (values and gradients), and no [N, V] tensor is kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from opd.chunked import chunked_divergence, chunked_taken_logp
from opd.losses import generalized_jsd, reverse_kl, topk_divergence

N, D, V = 10, 6, 13
CHUNK_SIZES = [1, 3, 4, 10, 64]  # 3 and 4 do not divide N; 64 > N


def _setup(seed=0):
    torch.manual_seed(seed)
    student_head = nn.Linear(D, V).double()
    teacher_head = nn.Linear(D, V).double()
    student_hidden = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(N, D, dtype=torch.float64)
    return student_head, teacher_head, student_hidden, teacher_hidden


def _grads(loss, student_hidden, student_head):
    weights = torch.linspace(0.5, 2.0, loss.shape[0], dtype=loss.dtype)  # a non-uniform upstream gradient
    return torch.autograd.grad((loss * weights).sum(), [student_hidden, student_head.weight, student_head.bias])


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("teacher_form", ["hidden", "logp", "topk"])
@pytest.mark.parametrize(("divergence", "kw"), [(reverse_kl, {}), (generalized_jsd, {"beta": 0.3})])
def test_chunked_equals_plain_in_value_and_gradient(chunk_size, teacher_form, divergence, kw):
    student_head, teacher_head, student_hidden, teacher_hidden = _setup()
    temperature = 1.5
    student_logp = F.log_softmax(student_head(student_hidden) / temperature, -1)
    teacher_logp = F.log_softmax(teacher_head(teacher_hidden) / temperature, -1).detach()
    teacher_logp_K, teacher_ids_K = teacher_logp.topk(4, -1)
    if teacher_form == "topk":
        plain = topk_divergence(divergence, student_logp, teacher_ids_K, teacher_logp_K, **kw)
    else:
        plain = divergence(student_logp, teacher_logp, **kw)
    teacher = {
        "hidden": {"teacher_hidden_ND": teacher_hidden, "teacher_head": teacher_head},
        "logp": {"teacher_logp_NV": teacher_logp},
        "topk": {"teacher_ids_NK": teacher_ids_K, "teacher_logp_NK": teacher_logp_K},
    }[teacher_form]
    chunked = chunked_divergence(
        divergence, student_hidden, student_head, chunk_size=chunk_size, temperature=temperature, **teacher, **kw
    )
    assert chunked.shape == (N,)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(
        _grads(chunked, student_hidden, student_head), _grads(plain, student_hidden, student_head)
    )
    assert teacher_head.weight.grad is None  # the teacher is never trained through


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_chunked_taken_logp_equals_plain_in_value_and_gradient(chunk_size):
    student_head, _, hidden, _ = _setup(seed=1)
    targets = torch.randint(0, V, (N,))
    plain = F.log_softmax(student_head(hidden), -1).gather(-1, targets[:, None])[:, 0]
    chunked = chunked_taken_logp(hidden, student_head, targets, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(_grads(chunked, hidden, student_head), _grads(plain, hidden, student_head))


def test_only_the_hidden_states_are_kept_for_backward():
    student_head, teacher_head, student_hidden, teacher_hidden = _setup(seed=2)
    saved_numel = []

    def pack(tensor):
        saved_numel.append(tensor.numel())
        return tensor

    # saved_tensors_hooks sees what autograd keeps outside the checkpoints; the logits inside are recomputed
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = chunked_divergence(
            reverse_kl, student_hidden, student_head, teacher_hidden_ND=teacher_hidden, teacher_head=teacher_head,
            chunk_size=3,
        )  # fmt: skip
        logp = chunked_taken_logp(student_hidden, student_head, torch.zeros(N, dtype=torch.long), chunk_size=3)
    assert 0 < sum(saved_numel) <= 2 * N * D + N  # hidden states (and targets), nothing with a vocabulary axis
    (loss.sum() + logp.sum()).backward()
    assert student_hidden.grad.isfinite().all()


def test_low_precision_head_gives_float32_log_probs_and_empty_input_still_backpropagates():
    head = nn.Linear(D, V).to(torch.bfloat16)
    hidden = torch.randn(N, D, dtype=torch.bfloat16, requires_grad=True)
    out = chunked_taken_logp(hidden, head, torch.zeros(N, dtype=torch.long), chunk_size=4)
    assert out.dtype == torch.float32
    empty = chunked_divergence(reverse_kl, hidden[:0], head, teacher_logp_NV=torch.zeros(0, V), chunk_size=4)
    assert empty.shape == (0,)
    empty.sum().backward()  # a batch without completion tokens must not crash the training step
    assert (hidden.grad == 0).all()


def test_bad_arguments_are_one_line_errors():
    student_head, teacher_head, student_hidden, teacher_hidden = _setup(seed=3)
    with pytest.raises(ValueError, match="exactly one way"):
        chunked_divergence(reverse_kl, student_hidden, student_head)
    with pytest.raises(ValueError, match="needs teacher_head"):
        chunked_divergence(reverse_kl, student_hidden, student_head, teacher_hidden_ND=teacher_hidden)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        chunked_taken_logp(student_hidden[None], student_head, torch.zeros(1, N, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        chunked_divergence(reverse_kl, student_hidden, student_head, teacher_logp_NV=torch.zeros(N + 1, V))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_taken_logp(student_hidden, student_head, torch.zeros(N, dtype=torch.long), chunk_size=0)


def test_without_a_chunk_size_a_chunk_holds_about_chunk_elements_logits():
    from opd.chunked import CHUNK_ELEMENTS, MIN_CHUNK_POSITIONS, auto_chunk_size, resolve_chunk_size

    assert auto_chunk_size(49152) == CHUNK_ELEMENTS // 49152 == 64
    assert auto_chunk_size(20) >= 100_000  # a small vocabulary: one chunk
    # a large one: never fewer positions than MIN_CHUNK_POSITIONS (each chunk re-reads the heads' weights)
    assert auto_chunk_size(151936) == auto_chunk_size(262144) == auto_chunk_size(10**9) == MIN_CHUNK_POSITIONS == 64
    student_head, teacher_head, student_hidden, teacher_hidden = _setup(seed=5)
    assert resolve_chunk_size(None, student_head, student_hidden) == auto_chunk_size(V)
    assert resolve_chunk_size(None, lambda h: student_head(h), student_hidden) == auto_chunk_size(V)  # probed
    assert resolve_chunk_size(7, student_head, student_hidden) == 7
    auto = chunked_divergence(reverse_kl, student_hidden, student_head, teacher_hidden_ND=teacher_hidden,
                              teacher_head=teacher_head)
    one_by_one = chunked_divergence(reverse_kl, student_hidden, student_head, teacher_hidden_ND=teacher_hidden,
                                    teacher_head=teacher_head, chunk_size=1)
    torch.testing.assert_close(auto, one_by_one)
