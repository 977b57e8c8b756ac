import copy
import json

import datasets
import pytest

from opd.lm.data.prompts import as_rows, encode, load_rows, parse_fields, task_rows
from opd.tasks import get_task

ROWS = [{"question": "12+34=", "final": "46", "solution": "ans=46"},
        {"question": "5+6=", "final": "11", "solution": "ans=11"}]


def write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        ds = datasets.Dataset.from_list(rows)
        getattr(ds, "to_parquet" if fmt == "parquet" else "to_csv")(str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv"])
def test_files_of_every_format_load_with_mapped_columns(tmp_path, fmt):
    path = write(tmp_path / f"data.{fmt}", ROWS, fmt)
    rows = load_rows(path, fields="prompt=question,answer=final,completion=solution")
    assert rows["prompt"] == ["12+34=", "5+6="]
    assert [str(a) for a in rows["answer"]] == ["46", "11"]
    assert rows["completion"] == ["ans=46", "ans=11"]


def test_save_to_disk_directories_and_their_splits(tmp_path):
    ds = datasets.Dataset.from_list([{"prompt": "1+1="}])
    ds.save_to_disk(tmp_path / "one")
    assert load_rows(str(tmp_path / "one"))["prompt"] == ["1+1="]
    datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list([{"prompt": "2+2="}])}).save_to_disk(
        tmp_path / "dict")
    assert load_rows(str(tmp_path / "dict"), split="test")["prompt"] == ["2+2="]
    with pytest.raises(ValueError, match="has no split 'validation'; it has train, test"):
        load_rows(str(tmp_path / "dict"), split="validation")


def test_encode_matches_the_tokenizer_and_keeps_rows(tokenizer):
    rows = as_rows([{"prompt": "12+34=", "completion": "ans=46", "answer": "46", "extra": 7}])
    prompts = encode(tokenizer, rows, max_prompt_len=100)
    assert prompts.prompt_ids == [tokenizer("12+34=", add_special_tokens=True)["input_ids"]]
    assert prompts.completion_ids == [tokenizer("ans=46", add_special_tokens=False)["input_ids"]]
    assert prompts.rows[0]["extra"] == 7 and prompts.rows[0]["answer"] == "46"
    assert encode(tokenizer, as_rows(["1+2="]), 100).completion_ids is None  # no completions, no reference batches


def test_a_task_is_rows_like_any_file(tokenizer):
    rows = task_rows(get_task("arithmetic"), 3, "test")
    examples = get_task("arithmetic").examples(3, seed=0, split="test")
    assert rows["prompt"] == [e.prompt for e in examples] and rows["answer"] == [e.answer for e in examples]


@pytest.fixture
def chat_tokenizer(tokenizer):
    # Renders only characters of the tiny tokenizer's alphabet: each message's content then "=", and " " as the
    # generation prompt, so the expected ids can be written by hand.
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}={% endfor %}"
                         "{% if add_generation_prompt %} {% endif %}")
    return tok


def test_chat_messages_render_with_the_template_and_a_final_reply_becomes_the_completion(chat_tokenizer):
    rows = as_rows([{"messages": [{"role": "user", "content": "12"}, {"role": "assistant", "content": "34"},
                                  {"role": "user", "content": "5+6"}, {"role": "assistant", "content": "ans=11"}]}])
    prompts = encode(chat_tokenizer, rows, 100)
    assert prompts.prompt_ids == [chat_tokenizer("12=34=5+6= ", add_special_tokens=False)["input_ids"]]
    assert prompts.completion_ids == [chat_tokenizer("ans=11", add_special_tokens=False)["input_ids"]]
    assert prompts.rows[0]["prompt"] == "5+6"  # the last user turn: what a checker reads as the prompt


def test_bad_data_gets_one_line_each(tmp_path, tokenizer):
    def one_line(match, fn, *args, **kw):
        with pytest.raises(ValueError, match=match) as e:
            fn(*args, **kw)
        assert "\n" not in str(e.value)

    one_line("does not exist", load_rows, str(tmp_path / "nothere.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": \n')
    one_line("is not a valid JSONL file", load_rows, str(tmp_path / "bad.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    one_line("unknown file type '.txt'", load_rows, str(tmp_path / "x.txt"))
    one_line("neither 'prompt' nor 'messages'.*--data-fields prompt=COLUMN", load_rows,
             write(tmp_path / "q.jsonl", ROWS, "jsonl"))
    one_line("has no column 'query'", load_rows, write(tmp_path / "q2.jsonl", ROWS, "jsonl"), fields="prompt=query")
    one_line("is not NAME=COLUMN", parse_fields, "prompt")
    one_line("has no usable rows after dropping 2 rows with an empty prompt", load_rows,
             write(tmp_path / "e.jsonl", [{"prompt": ""}, {"prompt": ""}], "jsonl"))
    (tmp_path / "dir").mkdir()
    one_line("not one written by Dataset.save_to_disk", load_rows, str(tmp_path / "dir"))
    one_line("prompt is .* tokens but the model's context leaves room for 3", encode, tokenizer,
             as_rows(["12345+6789="]), 3)
    one_line("chat 'messages' but the student's tokenizer has no chat template", encode, tokenizer,
             as_rows([{"messages": [{"role": "user", "content": "1+1"}]}]), 100)
    one_line("must be a datasets.Dataset", as_rows, 42)
