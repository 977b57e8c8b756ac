"""The loop's wiring: each flag reaches the computation it names. The references are computed here, from the models'
full logits in float64, so a flag wired to another divergence, a discount that never arrives or a micro-batch weighted
wrongly fails; the loop's own fused and chunked evaluation is what is checked."""

import json

import pytest
import torch
from accelerate import Accelerator
from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

from opd import losses
from opd.config import LOSSES, DistillConfig, OptimArgs, SamplingArgs
from opd.lm import train as train_module
from opd.lm.batch import Batch, TeacherSignal, build_batch
from opd.lm.hf.model import final_hidden, lm_head, load_model
from opd.lm.loop.build import make_teacher
from opd.lm.train import accumulate, distill, student_loss
from opd.tasks import get_task
from tests.conftest import tiny_llama

BETA, ALPHA = 0.3, 0.07  # away from the defaults (0.5, 0.1) and from each other: a parameter misread shows


def _kl(logp, logq):
    return (logp.exp() * (logp - logq)).sum(-1)


def _log_mix(logp, logq, w):
    return torch.log(w * logp.exp() + (1 - w) * logq.exp())


REFERENCE = {  # (student log-probs, teacher log-probs) -> per position, from the definitions
    "reverse_kl": lambda s, t: _kl(s, t),
    "forward_kl": lambda s, t: _kl(t, s),
    "jsd": lambda s, t: BETA * _kl(t, _log_mix(t, s, BETA)) + (1 - BETA) * _kl(s, _log_mix(t, s, BETA)),
    "skew_forward_kl": lambda s, t: _kl(t, _log_mix(t, s, ALPHA)),
    "skew_reverse_kl": lambda s, t: _kl(s, _log_mix(s, t, ALPHA)),
    "tvd": lambda s, t: 0.5 * (s.exp() - t.exp()).abs().sum(-1),
}


def _batch(tokenizer) -> Batch:
    """Four task prompts with reference completions cut to different lengths (so micro-batches weigh differently)."""
    examples = get_task("arithmetic").examples(4, seed=0, split="test")
    prompts = [tokenizer.encode(e.prompt) for e in examples]
    completions = [tokenizer.encode(e.completion)[:n] for e, n in zip(examples, (3, 9, 5, 7), strict=True)]
    return build_batch(prompts, completions, tokenizer.pad_token_id, tokenizer.eos_token_id)


def _full_logp(model, batch: Batch) -> torch.Tensor:
    """[B, T, V] float64 log-probs of every target, from the model's own forward (its logits, not opd's head)."""
    mask = batch.attention_mask_BL
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids_BL, attention_mask=mask, position_ids=positions).logits[:, :-1]
    return torch.log_softmax(logits.double(), -1)


def _reference_loss(student, teacher, batch: Batch, name: str) -> torch.Tensor:
    """Mean over completion tokens of divergence `name`, differentiable in the student."""
    with torch.no_grad():
        t = _full_logp(teacher, batch)
    return REFERENCE[name](_full_logp(student, batch), t)[batch.mask_BT.bool()].mean()


@pytest.fixture(scope="module")
def dirs(model_dirs, tokenizer, tmp_path_factory):
    """The conftest student, and its teacher with logits 40 times larger: peaked, far from the near-uniform student,
    so that each divergence gives its own number (between two near-uniform models reverse KL ≈ forward KL)."""
    teacher = load_model(model_dirs["teacher"])
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(40.0)
    path = tmp_path_factory.mktemp("sharp") / "teacher"
    teacher.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"student": model_dirs["student"], "teacher": str(path)}


def _cfg(dirs, **kw) -> DistillConfig:
    params = {"jsd": {"beta": BETA}, "skew_forward_kl": {"alpha": ALPHA}, "skew_reverse_kl": {"alpha": ALPHA}}
    base = dict(student=dirs["student"], teacher=dirs["teacher"], batch_size=4, optim=OptimArgs(grad_clip=0.0),
                **params.get(kw.get("loss"), {}))
    return DistillConfig(**{**base, **kw})


def _grads(student, loss: torch.Tensor) -> list[torch.Tensor]:
    """The student's gradient of a reference loss."""
    student.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in student.parameters()]


def _accumulated(student, teacher, batch: Batch, cfg: DistillConfig) -> tuple[dict, list[torch.Tensor]]:
    """One `accumulate` call of the loop (grading, loss, backward per micro-batch): its metrics and gradient."""
    student.zero_grad(set_to_none=True)
    metrics = accumulate(student, teacher, batch, cfg, Accelerator(cpu=True), 0)
    return metrics, [p.grad.clone() for p in student.parameters()]


def test_every_divergence_of_the_config_has_a_reference_here():
    assert set(REFERENCE) == set(LOSSES) - {"sampled", "sft"} == set(losses.DIVERGENCES)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_the_loss_flag_gives_that_divergence_of_the_full_logits(dirs, tokenizer, name):
    student, teacher = load_model(dirs["student"]), load_model(dirs["teacher"])
    batch, cfg = _batch(tokenizer), _cfg(dirs, loss=name)
    expected = _reference_loss(student, teacher, batch, name)
    with torch.no_grad():  # every other divergence gives another number here: a flag wired to one of them fails
        others = {other: _reference_loss(student, teacher, batch, other).item() for other in REFERENCE if other != name}
    assert all(abs(v - expected.item()) > 0.01 * expected.item() for v in others.values()), (expected, others)
    expected_grads = _grads(student, expected)
    # the loop's teacher (built from the config) and one accumulate step: loss and gradient
    loop_teacher = make_teacher(cfg, student, tokenizer)
    metrics, grads = _accumulated(student, loop_teacher, batch, cfg)
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    # student_loss on the same signal gives the same number
    signal = loop_teacher.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
    assert student_loss(student, batch, signal, cfg)[0].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)


def _first_step(dirs, tmp_path, monkeypatch, **kw) -> tuple[float, Batch]:
    """A one-step run on the task's reference completions: its logged loss and the batch that step trained on."""
    batches, real = [], train_module.accumulate
    monkeypatch.setattr(train_module, "accumulate", lambda student, teacher, batch, *a, **k: batches.append(batch)
                        or real(student, teacher, batch, *a, **k))
    cfg = _cfg(dirs, source="data", steps=1, train_examples=16, eval_examples=4, eval_every=0,
               out_dir=str(tmp_path / "run"), progress=False, sampling=SamplingArgs(max_new_tokens=8), **kw)
    distill(cfg)
    (logged,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (batch,) = batches
    return logged["loss"], batch


def test_a_runs_logged_loss_is_the_named_divergence_of_its_batch(dirs, tmp_path, monkeypatch):
    student, teacher = load_model(dirs["student"]), load_model(dirs["teacher"])
    logged = {}
    for name in ("reverse_kl", "forward_kl"):
        logged[name], batch = _first_step(dirs, tmp_path / name, monkeypatch, loss=name)
        with torch.no_grad():
            assert logged[name] == pytest.approx(_reference_loss(student, teacher, batch, name).item(), rel=1e-5)
    # the two directions are far apart on this batch, so a run wired to the other one cannot pass
    assert logged["reverse_kl"] > 2 * logged["forward_kl"] > 0


def _reference_sampled(student, teacher, batch: Batch, discount: float) -> torch.Tensor:
    """The policy-gradient form of the sampled reverse KL with `discount`, from the full logits (ratio 1: the
    student sampled the batch itself)."""
    targets = batch.targets_BT.unsqueeze(-1)
    s_BT = _full_logp(student, batch).gather(-1, targets).squeeze(-1)
    with torch.no_grad():
        t_BT = _full_logp(teacher, batch).gather(-1, targets).squeeze(-1)
    mask = batch.mask_BT.float()
    per_token = losses.sampled_reverse_kl_pg_loss(s_BT, s_BT.detach(), t_BT, mask, discount=discount)
    return per_token[batch.mask_BT.bool()].mean()


def test_the_discount_reaches_the_sampled_loss(dirs, tokenizer, tmp_path, monkeypatch):
    student, teacher = load_model(dirs["student"]), load_model(dirs["teacher"])
    batch = _batch(tokenizer)
    values = {}
    for discount in (0.0, 0.9):
        cfg = _cfg(dirs, loss="sampled", discount=discount)
        expected = _reference_sampled(student, teacher, batch, discount)
        expected_grads = _grads(student, expected)
        metrics, grads = _accumulated(student, make_teacher(cfg, student, tokenizer), batch, cfg)
        assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)
        for g, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
        # and through a run: the first step's logged loss
        logged, run_batch = _first_step(dirs, tmp_path / str(discount), monkeypatch, loss="sampled",
                                        discount=discount)
        with torch.no_grad():
            assert logged == pytest.approx(_reference_sampled(student, teacher, run_batch, discount).item(), rel=1e-5)
        values[discount] = expected.item()
    assert abs(values[0.9] - values[0.0]) > 0.1 * abs(values[0.0])  # the discount matters on this batch


def _widest_row(batch: Batch) -> int:
    return int(batch.attention_mask_BL.sum(1).max())


def _splits(batch: Batch) -> list[dict]:
    """Ways to cut the update: by rows (--optim.grad-accum) and by tokens (--max-tokens-per-microbatch: the widest
    row alone, so every row is its own micro-batch, and room for about two rows)."""
    w = _widest_row(batch)
    return [dict(optim=OptimArgs(grad_accum=k, grad_clip=0.0)) for k in (2, 4)] + [
        _budget(b) for b in (w, 2 * w + 1)]


def _budget(tokens: int) -> dict:
    """--max-tokens-per-microbatch `tokens`, with completions short enough for it to be a valid flag."""
    return dict(max_tokens_per_microbatch=tokens, sampling=SamplingArgs(max_new_tokens=4))


@pytest.mark.parametrize("loss", ["reverse_kl", "sft"])
def test_gradient_accumulation_sums_to_the_gradient_of_one_pass(dirs, tokenizer, loss):
    # AdamW's step hardly depends on the gradient's scale: compare the gradients themselves
    student = load_model(dirs["student"])
    batch = _batch(tokenizer)
    cfg = _cfg(dirs, loss=loss)
    one_metrics, one_grads = _accumulated(student, make_teacher(cfg, student, tokenizer), batch, cfg)
    for split in _splits(batch):
        cfg = _cfg(dirs, loss=loss, **split)
        metrics, grads = _accumulated(student, make_teacher(cfg, student, tokenizer), batch, cfg)
        assert metrics["loss"] == pytest.approx(one_metrics["loss"], rel=1e-5), split
        assert metrics["completion_tokens"] == one_metrics["completion_tokens"] == int(batch.mask_BT.sum())
        if "max_tokens_per_microbatch" in split:
            assert metrics["micro_batches"] == len(train_module.micro_batches(batch, cfg)) > 1
        for g, e in zip(grads, one_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_token_budget_micro_batches_are_consecutive_rows_within_the_budget_and_as_large_as_it_allows(tokenizer):
    batch = _batch(tokenizer)
    w = _widest_row(batch)
    for budget in (w, w + 3, 2 * w, 3 * w + 2, 100 * w):
        cfg = DistillConfig(student="s", batch_size=4, **_budget(budget))
        spans = train_module.micro_batches(batch, cfg)
        assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]] and spans[-1][1] == 4, spans
        for j, (a, b) in enumerate(spans):
            part = batch.select(a, b).trim()
            assert part.input_ids_BL.numel() <= budget, (budget, spans)
            if j + 1 < len(spans):  # greedy: one more row would not have fitted
                assert batch.select(a, b + 1).trim().input_ids_BL.numel() > budget, (budget, spans)
    with pytest.raises(ValueError, match="more than --max-tokens-per-microbatch"):
        train_module.micro_batches(batch, DistillConfig(student="s", **_budget(w - 1)))


def test_split_to_evens_the_micro_batch_count_across_processes_in_order():
    for spans, n in (([(0, 4)], 3), ([(0, 1), (1, 5), (5, 6)], 5), ([(0, 2), (2, 3)], 2)):
        out = train_module.split_to(spans, n)
        assert len(out) == n and out[0][0] == 0 and out[-1][1] == spans[-1][1], out
        assert all(a < b for a, b in out) and all(b == c for (_, b), (c, _) in zip(out, out[1:])), out
        assert all(any(a0 <= a and b <= b0 for a0, b0 in spans) for a, b in out), out  # only cut, never merged
    with pytest.raises(ValueError):
        train_module.split_to([(0, 1), (1, 2)], 3)


def test_trim_drops_only_the_columns_that_are_padding_in_every_row(tokenizer):
    batch = _batch(tokenizer)
    batch.sampling_logp_BT = torch.randn(batch.mask_BT.shape)
    for a, b in [(0, 1), (1, 2), (0, 4), (2, 4)]:
        rows, part = batch.select(a, b), batch.select(a, b).trim()
        assert part.input_ids_BL.shape[1] == part.mask_BT.shape[1] + 1 == part.sampling_logp_BT.shape[1] + 1
        assert part.attention_mask_BL[:, 0].any() and part.attention_mask_BL[:, -1].any()
        for name in ("input_ids_BL", "attention_mask_BL"):  # each row's real tokens, unchanged
            for full, cut, m_full, m_cut in zip(getattr(rows, name), getattr(part, name), rows.attention_mask_BL,
                                                part.attention_mask_BL, strict=True):
                assert torch.equal(full[m_full.bool()], cut[m_cut.bool()])
        for name in ("mask_BT", "sampling_logp_BT"):  # the completion targets and their values, unchanged
            assert torch.equal(getattr(rows, name)[rows.mask_BT.bool()], getattr(part, name)[part.mask_BT.bool()])
        assert part.mask_BT.sum() == rows.mask_BT.sum() and part.prompt_lens == rows.prompt_lens


def _prefixed(batch: Batch, signal: TeacherSignal, k: int) -> Batch:
    prefix = TeacherSignal(**{name: t[:k] for name, t in signal.tensors().items()}, head=signal.head)
    return Batch(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT, batch.prompt_lens,
                 batch.sampling_logp_BT, prefix, batch.sampled_by)


def test_select_gives_exactly_the_rows_of_every_field_and_of_the_teachers_prefix():
    torch.manual_seed(0)
    B, L, D, K, k = 6, 7, 3, 2, 4  # the prefix grades rows 0..3 of 6
    full = TeacherSignal(taken_logp_BT=torch.randn(B, L - 1), hidden_BTD=torch.randn(B, L - 1, D),
                         head=torch.nn.Identity(), topk_ids_BTK=torch.randint(0, 9, (B, L - 1, K)),
                         topk_logp_BTK=torch.randn(B, L - 1, K))
    batch = Batch(torch.randint(0, 9, (B, L)), torch.randint(0, 2, (B, L)), torch.randint(0, 2, (B, L - 1)),
                  [1, 2, 3, 4, 5, 6], torch.randn(B, L - 1), None, sampled_by=7)
    batch = _prefixed(batch, full, k)
    for start, stop in [(0, 2), (2, 4), (1, 5), (3, 6), (4, 6), (5, 6), (0, 6)]:
        part = batch.select(start, stop)
        for name in ("input_ids_BL", "attention_mask_BL", "mask_BT", "sampling_logp_BT"):
            assert torch.equal(getattr(part, name), getattr(batch, name)[start:stop]), (start, stop, name)
        assert part.prompt_lens == batch.prompt_lens[start:stop] and part.sampled_by == 7
        if start >= k:
            assert part.teacher_prefix is None, (start, stop)
            continue
        prefix = part.teacher_prefix
        assert prefix.rows() == min(stop, k) - start and prefix.head is full.head
        assert set(prefix.tensors()) == set(full.tensors())
        for name, t in prefix.tensors().items():
            assert torch.equal(t, getattr(full, name)[start:min(stop, k)]), (start, stop, name)
    assert batch.teacher_prefix.rows() == k  # select copies: the batch keeps its own prefix


def test_a_teacher_prefix_cut_into_micro_batches_grades_the_same_rows(dirs, tokenizer):
    # The --overlap sampler grades the first rows itself; with --optim.grad-accum each micro-batch must get its rows.
    student = load_model(dirs["student"])
    batch = _batch(tokenizer)
    cfg = _cfg(dirs, loss="reverse_kl")
    loop_teacher = make_teacher(cfg, student, tokenizer)
    graded = loop_teacher.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
    _, one = _accumulated(student, loop_teacher, batch, cfg)
    w = _widest_row(batch)
    for k, split in ((3, dict(optim=OptimArgs(grad_accum=2, grad_clip=0.0))), (1, dict(grad_accum=4)),
                     (2, dict(optim=OptimArgs(grad_accum=2, grad_clip=0.0))), (3, _budget(w)), (3, _budget(2 * w + 1))):
        split = {"optim": OptimArgs(grad_accum=split["grad_accum"], grad_clip=0.0)} if "grad_accum" in split else split
        cfg_k = _cfg(dirs, loss="reverse_kl", **split)
        _, grads = _accumulated(student, loop_teacher, _prefixed(batch, graded, k), cfg_k)
        for g, e in zip(grads, one, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def _permuted_tokenizer(tokenizer):
    """The same tokens, the same vocabulary size, the characters' ids in reverse order."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from opd.tasks.tokenizer import SPECIAL_TOKENS

    vocab = tokenizer.get_vocab()
    chars = sorted((t for t in vocab if t not in SPECIAL_TOKENS.values()), key=vocab.get)
    permuted = {t: vocab[t] for t in SPECIAL_TOKENS.values()}
    permuted.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(reversed(chars))})
    backend = Tokenizer(models.BPE(vocab=permuted, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=tokenizer.model_max_length,
                                   padding_side="left", clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)


def test_a_teacher_with_the_same_vocabulary_size_but_other_token_ids_is_refused(dirs, tokenizer, tmp_path):
    other = _permuted_tokenizer(tokenizer)
    assert len(other) == len(tokenizer) and other.get_vocab() != tokenizer.get_vocab()
    tiny_llama(tokenizer, 16, 1, seed=0).save_pretrained(tmp_path / "permuted")
    other.save_pretrained(tmp_path / "permuted")
    cfg = _cfg(dirs, teacher=str(tmp_path / "permuted"), steps=1, train_examples=16, eval_examples=4,
               out_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match="^teacher and student tokenizers map tokens to different ids; .*"
                                         "--cross-tokenizer") as refused:
        distill(cfg)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "run" / "checkpoint").exists()


def _gemma2(tokenizer):
    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0, pad_token_id=tokenizer.pad_token_id))


def _cohere(tokenizer):
    return CohereForCausalLM(CohereConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, logit_scale=3.0, pad_token_id=tokenizer.pad_token_id))


@pytest.mark.parametrize("make", [_gemma2, _cohere], ids=["gemma2_softcapping", "cohere_logit_scale"])
def test_lm_head_of_the_final_hidden_states_gives_the_models_own_logits(tokenizer, make):
    torch.manual_seed(0)
    model = make(tokenizer).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)  # logits well beyond the soft cap, and far from their scale
    batch = _batch(tokenizer)
    with torch.no_grad():
        positions = (batch.attention_mask_BL.cumsum(-1) - 1).clamp(min=0)
        expected = model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL,
                         position_ids=positions).logits
        got = lm_head(model)(final_hidden(model, batch.input_ids_BL, batch.attention_mask_BL))
    assert expected.abs().max() > 1.0  # a post-processing left out would show
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
