import pytest
import torch

from opd.lm.batch import build_batch, encode_prompts, layout
from opd.lm.rollouts.local import sample
from tests.conftest import tiny_llama
from tests.lm.test_sampler import _generate


def test_build_batch_layout_and_mask():
    b = build_batch([[5, 6], [7]], [[8], [9, 10, 2]], pad_id=0, eos_id=2)
    # prompts left-padded to 2, completions right after, eos appended to the one that lacked it
    assert b.input_ids_BL.tolist() == [[5, 6, 8, 2, 0], [0, 7, 9, 10, 2]]
    assert b.attention_mask_BL.tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    # target t scores token t+1: completion targets are tokens 2.. of each row
    assert b.mask_BT.tolist() == [[0, 1, 1, 0], [0, 1, 1, 1]]
    assert b.completion_ids() == [[8, 2], [9, 10, 2]]


def test_encode_prompts_rejects_empty_and_too_long(tokenizer):
    with pytest.raises(ValueError, match="dataset is empty"):
        encode_prompts(tokenizer, [], 10)
    with pytest.raises(ValueError, match="prompt 1 is .* tokens"):
        encode_prompts(tokenizer, ["1+2=", "1234567+1234567="], 10)


def test_sample_stops_at_eos_and_matches_generate_layout(tokenizer):
    model = tiny_llama(tokenizer, 16, 1, seed=0)
    prompts = encode_prompts(tokenizer, ["12+34=", "5+6="], 100)
    torch.manual_seed(0)
    b = sample(model, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, max_new_tokens=12)
    eos = tokenizer.eos_token_id
    for comp, p, ids, attn in zip(b.completion_ids(), prompts, b.input_ids_BL, b.attention_mask_BL):
        assert 1 <= len(comp) <= 12
        assert eos not in comp[:-1]  # nothing after the first eos is kept
        assert attn.sum().item() == len(p) + len(comp)
        assert ids[attn.bool()].tolist() == p + comp
    # greedy sampling equals HF generate's greedy output on the same left-padded batch
    greedy = sample(model, prompts, tokenizer.pad_token_id, eos, 12, temperature=0.0)
    assert greedy.completion_ids() == _generate(model, prompts, tokenizer.pad_token_id, eos, 12, 0.0)


def test_encode_prompts_uses_the_chat_template_when_there_is_one(tokenizer):
    import copy

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} {% endif %}"
    (ids,) = encode_prompts(chat, ["12+3="], 100)
    assert ids == tokenizer("12+3= ", add_special_tokens=False)["input_ids"]
    (plain,) = encode_prompts(tokenizer, ["12+3="], 100)
    assert plain == tokenizer("12+3=")["input_ids"] and plain != ids


def test_layout_places_sampler_logprobs_at_the_completion_targets():
    batch = layout([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0, sampling_logps=[[-0.1, -0.2, -0.3], [-0.4]])
    mask = batch.mask_BT.bool()
    assert batch.sampling_logp_BT[mask].tolist() == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert (batch.sampling_logp_BT[~mask] == 0).all()
    assert batch.targets_BT[mask].tolist() == [1, 2, 3, 4]  # each log-prob sits on the token it scores
    assert layout([[5]], [[1]], pad_id=0).sampling_logp_BT is None
    with pytest.raises(RuntimeError, match="3 values for 4 completion targets"):
        layout([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0, sampling_logps=[[-0.1, -0.2], [-0.4]])
