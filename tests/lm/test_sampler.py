import pytest
import torch

from opd.lm.batch import encode_prompts
from opd.lm.hf.decode import sample_completions
from tests.conftest import tiny_gpt2, tiny_llama


def _generate(model, prompts, pad, eos, max_new_tokens, temperature):
    """HF `generate` on the same left-padded batch; completions cut after their first eos."""
    P = max(map(len, prompts))
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else dict(do_sample=False)
    out = model.eval().generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                eos_token_id=eos, **kwargs)
    rows = out[:, P:].tolist()
    return [r[: r.index(eos) + 1] if eos is not None and eos in r else r for r in rows]


@pytest.fixture
def model_and_prompts(tokenizer):
    model = tiny_llama(tokenizer, 16, 1, seed=0)
    prompts = encode_prompts(tokenizer, ["12+34=", "5+6=", "999+1=", "7+7="], 100)
    return model, prompts


def test_rows_run_to_max_new_tokens_without_eos_and_seeding_reproduces_them(model_and_prompts, tokenizer):
    model, prompts = model_and_prompts
    torch.manual_seed(3)
    first = sample_completions(model, prompts, tokenizer.pad_token_id, None, 10)
    torch.manual_seed(3)
    assert sample_completions(model, prompts, tokenizer.pad_token_id, None, 10) == first
    assert all(len(c) == 10 for c in first) and len({tuple(c) for c in first}) > 1


def test_greedy_equals_generate_with_eos_stopping(tokenizer):
    eos = tokenizer.eos_token_id
    model = tiny_llama(tokenizer, 16, 1, seed=0)
    with torch.no_grad():  # make eos likely so that rows stop at different steps and leave the batch
        model.lm_head.weight[eos] *= 3.0
    prompts = encode_prompts(tokenizer, ["12+34=", "5+6=", "999+1=", "7+7=", "1+1=", "2468+1357="], 100)
    expected = _generate(model, prompts, tokenizer.pad_token_id, eos, 12, 0.0)
    got = sample_completions(model, prompts, tokenizer.pad_token_id, eos, 12, temperature=0.0)
    assert got == expected
    assert sorted(len(c) for c in got) == [3, 4, 12, 12, 12, 12]  # rows stopped at different steps


def test_left_padded_sampling_of_an_absolute_position_model_equals_generate_on_each_row_alone(tokenizer):
    # GPT-2's learned position embeddings see positions that count the left padding (a rotary Llama does not); each
    # row alone has no padding, so HF generate there is the reference.
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = tiny_gpt2(tokenizer, 32, 2, seed=0)
    with torch.no_grad():  # rows stop at different steps and leave the batch (and the KV cache)
        model.lm_head.weight[eos] *= 2.0
    prompts = encode_prompts(tokenizer, ["12+34=", "5+6=", "999+1=", "7+7=", "1+1=", "2468+1357="], 100)
    expected = [_generate(model, [p], pad, eos, 12, 0.0)[0] for p in prompts]
    got, logprobs = sample_completions(model, prompts, pad, eos, 12, temperature=0.0, with_logprobs=True)
    assert got == expected
    assert len({len(c) for c in got}) > 1 and any(c[-1] == eos for c in got)
    for p, c, lp in zip(prompts, got, logprobs):  # and each log-prob is the unpadded row's own
        with torch.no_grad():
            logp_TV = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1].log_softmax(-1)
        torch.testing.assert_close(torch.tensor(lp), logp_TV.gather(1, torch.tensor(c)[:, None])[:, 0], atol=1e-5,
                                   rtol=1e-5)


def test_completions_end_at_their_first_eos_or_at_max_new_tokens(model_and_prompts, tokenizer):
    model, prompts = model_and_prompts
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] *= 4.0
    model.train()
    torch.manual_seed(0)
    completions = sample_completions(model, prompts * 8, tokenizer.pad_token_id, eos, 6)
    assert model.training  # the mode is put back
    assert any(c[-1] == eos for c in completions) and any(eos not in c for c in completions)
    for c in completions:
        assert 1 <= len(c) <= 6 and eos not in c[:-1]
        assert c[-1] == eos or len(c) == 6


def _exact_two_token_probs(model, prompt, eos, temperature, top_p=1.0):
    """{completion (tuple): probability} over every completion of at most two tokens, by brute force."""
    def dist(ids):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1] / temperature
        p = logits.softmax(-1)
        if top_p < 1.0:  # nucleus: the smallest set of most likely tokens holding at least top_p of the mass
            order = p.argsort(descending=True)
            keep = order[: int((p[order].cumsum(0) < top_p).sum()) + 1]
            p = torch.zeros_like(p).index_fill(0, keep, 1.0) * p
            p = p / p.sum()
        return p.tolist()

    out = {}
    for a, pa in enumerate(dist(prompt)):
        if a == eos:
            out[(a,)] = pa
        else:
            for b, pb in enumerate(dist(prompt + [a])):
                out[(a, b)] = pa * pb
    return out


def _chi2_pvalue(counts: dict, probs: dict, n: int) -> float:
    """p-value of Pearson's chi-square test, with outcomes of expected count < 5 pooled into one bin."""
    if any(probs.get(k, 0.0) == 0.0 for k in counts):
        return 0.0  # a completion that cannot happen was drawn
    small = [k for k, p in probs.items() if p * n < 5]
    bins = [(counts.get(k, 0), p * n) for k, p in probs.items() if p * n >= 5]
    bins.append((sum(counts.get(k, 0) for k in small), sum(probs[k] for k in small) * n))
    stat = sum((o - e) ** 2 / e for o, e in bins if e > 0)
    dof = len(bins) - 1
    return 1.0 - torch.special.gammainc(torch.tensor(dof / 2), torch.tensor(stat / 2)).item()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_completion_frequencies_match_the_softmax(tokenizer, temperature, top_p):
    # Two prompts of different lengths (left padding) interleaved; eos is likely, so rows leave the batch after
    # the first token and the second token is drawn from a compacted batch and KV cache.
    eos = tokenizer.eos_token_id
    model = tiny_llama(tokenizer, 16, 1, seed=1).eval()
    with torch.no_grad():
        model.lm_head.weight *= 20.0  # a peaked distribution: fewer outcomes, a sharper test
        model.lm_head.weight[eos] *= 1.5  # eos first 10-40 % of the time
    # prompts whose next-token distributions differ, so a row continued from another row's KV cache is caught
    prompts = encode_prompts(tokenizer, ["12+34=", "ans 99"], 100)
    n = 3000
    torch.manual_seed(11)
    completions = sample_completions(model, prompts * n, tokenizer.pad_token_id, eos, 2, temperature, top_p)
    for i, prompt in enumerate(prompts):
        counts: dict = {}
        for c in completions[i::2]:
            counts[tuple(c)] = counts.get(tuple(c), 0) + 1
        exact = _exact_two_token_probs(model, prompt, eos, temperature, top_p)
        assert sum(counts.values()) == n and counts.get((eos,), 0) > 0.05 * n  # compaction really happened
        assert _chi2_pvalue(counts, exact, n) > 1e-4
        # the same test rejects a slightly different distribution (it has the power to catch a wrong sampler)
        wrong = _exact_two_token_probs(model, prompt, eos, temperature * 1.3, top_p)
        assert _chi2_pvalue(counts, wrong, n) < 1e-4


def test_bad_arguments_are_rejected(model_and_prompts, tokenizer):
    model, prompts = model_and_prompts
    pad = tokenizer.pad_token_id
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample_completions(model, prompts, pad, None, 0)
    with pytest.raises(ValueError, match="temperature"):
        sample_completions(model, prompts, pad, None, 4, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_completions(model, prompts, pad, None, 4, top_p=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        sample_completions(model, [[]], pad, None, 4)
    assert [len(c) for c in sample_completions(model, prompts[:1], pad, None, 1)] == [1]


def test_logprobs_are_the_models_own_at_each_sampled_token_and_leave_the_draws_unchanged(model_and_prompts, tokenizer):
    model, prompts = model_and_prompts
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(5)
    plain = sample_completions(model, prompts, pad, eos, 12, temperature=0.7)
    torch.manual_seed(5)
    completions, logprobs = sample_completions(model, prompts, pad, eos, 12, temperature=0.7, with_logprobs=True)
    assert completions == plain and [len(lp) for lp in logprobs] == [len(c) for c in completions]
    for p, c, lp in zip(prompts, completions, logprobs):  # one full forward per row, no cache: log_softmax at T=1
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
        expected = logits.log_softmax(-1).gather(1, torch.tensor(c)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lp), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # torch.compile
def test_compiled_decoding_gives_the_eager_tokens_and_logprobs_with_rows_ending_at_their_first_eos(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = tiny_llama(tokenizer, 16, 1, seed=0)
    with torch.no_grad():  # rows stop at different steps (in the compiled path they stay in the batch)
        model.lm_head.weight[eos] *= 3.0
    prompts = encode_prompts(tokenizer, ["12+34=", "5+6=", "999+1=", "7+7=", "1+1=", "2468+1357="], 100)
    eager, eager_lp = sample_completions(model, prompts, pad, eos, 12, temperature=0.0, with_logprobs=True)
    got, got_lp = sample_completions(model, prompts, pad, eos, 12, temperature=0.0, with_logprobs=True,
                                     compile=True)
    assert got == eager and sorted(len(c) for c in got) == [3, 4, 12, 12, 12, 12]
    for a, b in zip(got_lp, eager_lp):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=1e-4)
    torch.manual_seed(0)  # sampled: every row ends at its first eos (kept) or at max_new_tokens
    sampled = sample_completions(model, prompts * 4, pad, eos, 12, compile=True)
    for c in sampled:
        assert 1 <= len(c) <= 12 and eos not in c[:-1] and (c[-1] == eos or len(c) == 12)
    torch.manual_seed(0)  # the draws inside the compiled step come from torch's seeded generator too
    assert sample_completions(model, prompts * 4, pad, eos, 12, compile=True) == sampled
    assert len({tuple(c) for c in sampled}) > 4


def test_compiled_decoding_draws_from_the_softmax(tokenizer):
    eos = tokenizer.eos_token_id
    model = tiny_llama(tokenizer, 16, 1, seed=1).eval()
    with torch.no_grad():
        model.lm_head.weight *= 20.0
        model.lm_head.weight[eos] *= 1.5
    prompts = encode_prompts(tokenizer, ["12+34=", "ans 99"], 100)
    n = 3000
    torch.manual_seed(12)
    completions = sample_completions(model, prompts * n, tokenizer.pad_token_id, eos, 2, compile=True)
    for i, prompt in enumerate(prompts):
        counts: dict = {}
        for c in completions[i::2]:
            counts[tuple(c)] = counts.get(tuple(c), 0) + 1
        assert _chi2_pvalue(counts, _exact_two_token_probs(model, prompt, eos, 1.0), n) > 1e-4
        assert _chi2_pvalue(counts, _exact_two_token_probs(model, prompt, eos, 1.3), n) < 1e-4
