import pytest
import torch

from opd.tasks import Example, get_task
from opd.tasks.models import MODEL_SIZES, encode_examples, make_model, num_params
from opd.tasks.tokenizer import build_tokenizer

TOK = build_tokenizer(get_task("arithmetic"))


def test_sizes_are_ordered_and_the_student_is_clearly_smaller():
    n = {size: num_params(make_model(size, TOK, seed=0)) for size in MODEL_SIZES}
    assert n["xs"] < n["s"] < n["m"] < n["l"] < n["teacher"]
    assert 0.05 * n["teacher"] <= n["student"] <= 0.2 * n["teacher"]
    assert 500_000 <= n["teacher"] <= 3_000_000


def test_model_matches_the_tokenizer_and_is_seeded():
    model = make_model("xs", TOK, seed=5)
    cfg = model.config
    assert cfg.vocab_size == len(TOK) and cfg.max_position_embeddings == TOK.model_max_length
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert model.generation_config.pad_token_id == 0 and model.generation_config.eos_token_id == 2
    same, other = make_model("xs", TOK, seed=5), make_model("xs", TOK, seed=6)
    for p, q, r in zip(model.parameters(), same.parameters(), other.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, r) for p, r in zip(model.parameters(), other.parameters()))
    with pytest.raises(ValueError, match="unknown model size 'huge'; choose one of"):
        make_model("huge", TOK, seed=0)


def test_encode_examples_by_hand():
    ids = {c: TOK.convert_tokens_to_ids(c) for c in "0123456789+= ans"}
    pad, eos = TOK.pad_token_id, TOK.eos_token_id
    examples = [Example("1+2=", "3", "3"), Example("10+5=", "15 x", "15")]
    input_ids_BL, attention_mask_BL, completion_mask_BL = encode_examples(TOK, examples)
    row0 = [pad, pad, pad, pad, ids["1"], ids["+"], ids["2"], ids["="], ids["3"], eos]
    row1 = [ids["1"], ids["0"], ids["+"], ids["5"], ids["="], ids["1"], ids["5"], ids[" "], TOK.unk_token_id, eos]
    assert input_ids_BL.tolist() == [row0, row1]
    assert attention_mask_BL.tolist() == [[0] * 4 + [1] * 6, [1] * 10]
    assert completion_mask_BL.tolist() == [[False] * 8 + [True] * 2, [False] * 5 + [True] * 5]
    assert input_ids_BL.dtype == attention_mask_BL.dtype == torch.long and completion_mask_BL.dtype == torch.bool


def test_encode_examples_rejects_empty_and_too_long():
    with pytest.raises(ValueError, match="at least one"):
        encode_examples(TOK, [])
    with pytest.raises(ValueError, match="model_max_length"):
        encode_examples(TOK, [Example("1+1=", "2" * 200, "2")])
