from transformers import AutoTokenizer

from opd.tasks import get_task
from opd.tasks.tokenizer import build_tokenizer

TASK = get_task("arithmetic")
EXAMPLES = TASK.examples(100, seed=0, split="train")


def test_one_token_per_character_and_specials_first():
    tok = build_tokenizer(TASK)
    assert len(tok) == 4 + len(set(TASK.alphabet))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "left" and tok.model_max_length == 128
    assert tok.convert_ids_to_tokens(tok("12+3= ans")["input_ids"]) == list("12+3= ans")
    assert tok("1x2")["input_ids"] == [tok.convert_tokens_to_ids("1"), tok.unk_token_id, tok.convert_tokens_to_ids("2")]


def test_prompt_and_completion_tokenized_apart_concatenate_to_the_whole():
    tok = build_tokenizer(TASK)
    for e in EXAMPLES:
        whole = tok(e.prompt + e.completion)["input_ids"]
        assert tok(e.prompt)["input_ids"] + tok(e.completion)["input_ids"] == whole
        assert len(whole) == len(e.prompt) + len(e.completion)


def test_decode_gives_the_text_back_exactly():
    tok = build_tokenizer(TASK)
    for e in EXAMPLES:
        ids = tok(e.prompt + e.completion)["input_ids"]
        assert tok.decode(ids) == e.prompt + e.completion
        assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == e.prompt + e.completion
    assert tok.decode(tok(" a  s ")["input_ids"]) == " a  s "


def test_save_and_load_as_a_normal_hf_directory(tmp_path):
    tok = build_tokenizer(TASK)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.padding_side == "left" and loaded.model_max_length == tok.model_max_length
    assert loaded.all_special_ids == tok.all_special_ids
    batch = loaded(["1+2=", "123+45="], padding=True)
    assert batch["input_ids"][0][:3] == [tok.pad_token_id] * 3 and batch["attention_mask"][0] == [0, 0, 0, 1, 1, 1, 1]
    for e in EXAMPLES[:20]:
        assert loaded(e.prompt + e.completion)["input_ids"] == tok(e.prompt + e.completion)["input_ids"]
        assert loaded.decode(loaded(e.completion)["input_ids"]) == e.completion
