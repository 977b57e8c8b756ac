"""Tests for opd.fused: the written-out gradient equals autograd through `chunked_divergence` and `opd.losses`."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import opd.fused as fused_module
from opd.chunked import chunked_divergence
from opd.fused import fused_beta, fused_divergence, plain_linear
from opd.losses import forward_kl, generalized_jsd, get_divergence, reverse_kl, skew_reverse_kl, tvd

N, D, DT, V = 11, 6, 9, 17

DIVERGENCES = [
    ("forward_kl", forward_kl, {}),
    ("reverse_kl", reverse_kl, {}),
    ("jsd", get_divergence("jsd", beta=0.0), {}),  # the endpoints: the two KLs
    ("jsd", get_divergence("jsd", beta=1.0), {}),
    ("jsd", get_divergence("jsd", beta=0.1), {}),
    ("jsd", get_divergence("jsd", beta=0.5), {}),
    ("jsd", generalized_jsd, {"beta": 0.9}),  # β passed as a keyword, as chunked_divergence allows
]


def _setup(seed=0, bias=True, dtype=torch.float64):
    torch.manual_seed(seed)
    student_head = nn.Linear(D, V, bias=bias).to(dtype)
    teacher_head = nn.Linear(DT, V).to(dtype).requires_grad_(False)
    student_hidden = torch.randn(N, D, dtype=dtype, requires_grad=True)
    teacher_hidden = torch.randn(N, DT, dtype=dtype)
    return student_head, teacher_head, student_hidden, teacher_hidden


def _value_and_grads(fn, divergence, student_hidden, student_head, teacher, upstream, **kw):
    out = fn(divergence, student_hidden, student_head, **teacher, **kw)
    params = [student_hidden, *student_head.parameters()]
    return out.detach(), torch.autograd.grad((out * upstream).sum(), params)


@pytest.mark.parametrize(("name", "divergence", "kw"), DIVERGENCES)
@pytest.mark.parametrize("upstream", ["mean", "weighted"])
@pytest.mark.parametrize(("bias", "temperature", "chunk_size"), [(True, 1.0, 4), (False, 1.5, 3), (True, 0.7, 64)])
def test_fused_equals_chunked_in_value_and_gradient(name, divergence, kw, upstream, bias, temperature, chunk_size):
    student_head, teacher_head, student_hidden, teacher_hidden = _setup(bias=bias)
    assert fused_beta(divergence, **kw) is not None and plain_linear(student_head, student_hidden)
    # a mean sends every position the same gradient (scaled in backward); other weights recompute the head's part
    weights = {"mean": torch.full((N,), 1 / N), "weighted": torch.linspace(-0.5, 2.0, N)}[upstream].double()
    teacher = dict(teacher_hidden_ND=teacher_hidden, teacher_head=teacher_head, temperature=temperature, **kw)
    expected, expected_grads = _value_and_grads(chunked_divergence, divergence, student_hidden, student_head, teacher,
                                                weights, chunk_size=5)
    got, got_grads = _value_and_grads(fused_divergence, divergence, student_hidden, student_head, teacher, weights,
                                      chunk_size=chunk_size)
    assert got.shape == (N,) and (got > 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_the_gradient_of_a_tied_embedding_reaches_the_shared_parameter():
    torch.manual_seed(1)
    embed = nn.Embedding(V, D).double()
    head = nn.Linear(D, V, bias=False).double()
    head.weight = embed.weight  # tied, as in most small LMs
    teacher_head, teacher_hidden = nn.Linear(DT, V).double(), torch.randn(N, DT, dtype=torch.float64)
    ids = torch.randint(0, V, (N,))
    grads = []
    for fn in (chunked_divergence, fused_divergence):
        embed.weight.grad = None
        hidden = torch.tanh(embed(ids) * 2)
        loss = fn(reverse_kl, hidden, head, teacher_hidden_ND=teacher_hidden, teacher_head=teacher_head, chunk_size=4)
        (loss * torch.linspace(1, 2, N, dtype=torch.float64)).sum().backward()
        grads.append(embed.weight.grad.clone())
    # both routes into the shared weight count: through the head and through the embedding lookup
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_give_float32_losses_close_to_the_autograd_path(dtype):
    student_head, teacher_head, student_hidden, teacher_hidden = _setup(seed=2, dtype=dtype)
    with torch.no_grad():
        student_hidden.mul_(100)  # logits in the hundreds: most probabilities underflow to 0 in float32
    teacher = dict(teacher_hidden_ND=teacher_hidden * 100, teacher_head=teacher_head)
    for divergence in (reverse_kl, get_divergence("jsd", beta=0.5), forward_kl):
        ones = torch.ones(N)
        expected, expected_grads = _value_and_grads(chunked_divergence, divergence, student_hidden, student_head,
                                                    teacher, ones)
        got, got_grads = _value_and_grads(fused_divergence, divergence, student_hidden, student_head, teacher, ones)
        assert got.dtype == torch.float32 and got.isfinite().all()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for g, e in zip(got_grads, expected_grads):
            assert g.dtype == dtype and g.isfinite().all()
            torch.testing.assert_close(g.float(), e.float(), rtol=tol, atol=tol * e.abs().max().item())


def test_other_divergences_and_heads_take_the_autograd_path(monkeypatch):
    student_head, teacher_head, student_hidden, teacher_hidden = _setup(seed=3)
    teacher = dict(teacher_hidden_ND=teacher_hidden, teacher_head=teacher_head, chunk_size=4)

    class Subclass(nn.Linear):  # e.g. a quantised or adapted layer: its forward may differ
        pass

    hooked = nn.Linear(D, V).double()
    hooked.register_forward_pre_hook(lambda module, args: None)  # FSDP gathers a sharded weight in such a hook
    cases = [(tvd, student_head), (get_divergence("skew_reverse_kl", alpha=0.1), student_head),
             (reverse_kl, lambda h: student_head(h)), (reverse_kl, Subclass(D, V).double()), (reverse_kl, hooked)]
    assert fused_beta(tvd) is None and fused_beta(skew_reverse_kl, alpha=0.0) is None
    assert not plain_linear(cases[3][1], student_hidden) and not plain_linear(hooked, student_hidden)
    assert not plain_linear(student_head, student_hidden.float())  # dtype differs from the weight's
    monkeypatch.setattr(fused_module._FusedDivergence, "apply", lambda *a: pytest.fail("fused path taken"))
    for divergence, head in cases:
        torch.testing.assert_close(fused_divergence(divergence, student_hidden, head, **teacher),
                                   chunked_divergence(divergence, student_hidden, head, **teacher))


def test_second_backward_no_grad_and_empty_input():
    student_head, teacher_head, student_hidden, teacher_hidden = _setup(seed=4)
    teacher = dict(teacher_hidden_ND=teacher_hidden, teacher_head=teacher_head, chunk_size=4)
    loss = fused_divergence(reverse_kl, student_hidden, student_head, **teacher).mean()
    first = torch.autograd.grad(loss, [student_hidden, student_head.weight], retain_graph=True)
    second = torch.autograd.grad(loss, [student_hidden, student_head.weight])  # the buffers were spent: recomputed
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert not fused_divergence(reverse_kl, student_hidden, student_head, **teacher).requires_grad
    empty = fused_divergence(reverse_kl, student_hidden[:0], student_head, teacher_hidden_ND=teacher_hidden[:0],
                             teacher_head=teacher_head)
    assert empty.shape == (0,)
    empty.sum().backward()  # a batch without completion tokens must not crash the training step
    assert (student_head.weight.grad == 0).all()
    with pytest.raises(ValueError, match="positions"):
        fused_divergence(reverse_kl, student_hidden, student_head, teacher_hidden_ND=teacher_hidden[:3],
                         teacher_head=teacher_head)


def test_a_teacher_that_masks_tokens_with_minus_inf_gives_what_the_autograd_path_gives():
    student_head, teacher_head, student_hidden, teacher_hidden = _setup(seed=5)

    def masking_head(h):  # e.g. a teacher that rules out padding ids of its vocabulary
        logits = teacher_head(h)
        logits[:, :3] = float("-inf")
        return logits

    teacher = dict(teacher_hidden_ND=teacher_hidden, teacher_head=masking_head, chunk_size=4)
    ones = torch.ones(N, dtype=torch.float64)
    for divergence in (forward_kl, get_divergence("jsd", beta=0.5)):  # finite: p_t = 0 there
        expected, expected_grads = _value_and_grads(chunked_divergence, divergence, student_hidden, student_head,
                                                    teacher, ones)
        got, got_grads = _value_and_grads(fused_divergence, divergence, student_hidden, student_head, teacher, ones)
        assert got.isfinite().all()
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    with torch.no_grad():  # the student has mass where the teacher has none: genuinely infinite
        assert fused_divergence(reverse_kl, student_hidden, student_head, **teacher).isposinf().all()


def test_rowdot_in_blocks_equals_the_row_sums_of_the_product():
    from opd.fused import _rowdot

    g = torch.Generator().manual_seed(0)
    for n, V in [(1, 7), (13, 49152), (200, 20), (0, 5)]:  # several blocks, one block, no rows
        a, b = torch.randn(n, V, generator=g), torch.randn(n, V, generator=g)
        torch.testing.assert_close(_rowdot(a, b), (a.double() * b.double()).sum(-1).float(), rtol=1e-4, atol=1e-3)
