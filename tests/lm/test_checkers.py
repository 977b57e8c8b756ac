"""Answer checkers: each spec on hand-made right and wrong completions, and the one-line errors a user can act on."""

import pytest

from opd.lm.data.checkers import check_columns, get_checker, last_number, required_columns, score


def one_line_error(call, *args) -> str:
    with pytest.raises(ValueError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_exact_strips_whitespace_and_reads_any_answer_type():
    check = get_checker("exact")
    assert check({"prompt": "Capital of France?", "answer": " Paris "}, "Paris\n") == 1.0
    assert check({"prompt": "Capital of France?", "answer": "Paris"}, "paris") == 0.0
    assert check({"prompt": "Capital of France?", "answer": "Paris"}, "It is Paris") == 0.0
    assert check({"prompt": "3+4?", "answer": 7}, " 7 ") == 1.0


@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", 42.0),
    ("It costs $1,234.50 in total", 1234.5),
    ("a drop of -7%", -7.0),
    ("read pages 10-12", 12.0),   # a hyphen between numbers is not a minus sign
    ("1,2,3", 3.0),               # a list, not a thousands separator
    ("12,3456", 3456.0),
    ("3.14.", 3.14),
    ("1,234,567 people", 1234567.0),
    ("no digits here", None),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_numeric_compares_the_last_number():
    check = get_checker("numeric")
    row = {"prompt": "How much?", "answer": "1234.5"}
    assert check(row, "First 3 items, so the total is $1,234.50.") == 1.0
    assert check(row, "The total is 1234.5 or maybe 1235") == 0.0
    assert check(row, "I do not know") == 0.0
    assert check({"prompt": "p", "answer": 12}, "12 apples, not 13") == 0.0
    assert check({"prompt": "p", "answer": "-3"}, "x = -3") == 1.0
    assert check({"prompt": "p", "answer": "50"}, "about 50%") == 1.0
    assert check({"prompt": "p", "answer": "#### 1,000"}, "1000") == 1.0


def test_numeric_answer_without_a_number_is_an_error():
    message = one_line_error(get_checker("numeric"), {"prompt": "p", "answer": "Paris"}, "Paris")
    assert "no number in the answer 'Paris'" in message


def test_regex_takes_the_last_match_and_its_first_group():
    check = get_checker(r"regex:ANSWER: (\w+)")
    assert check({"prompt": "p", "answer": "b"}, "ANSWER: a\nno wait, ANSWER: b") == 1.0
    assert check({"prompt": "p", "answer": "a"}, "ANSWER: a\nno wait, ANSWER: b") == 0.0
    assert check({"prompt": "p", "answer": "a"}, "no answer given") == 0.0
    whole = get_checker(r"regex:\d+")
    assert whole({"prompt": "p", "answer": " 17 "}, "between 3 and 17") == 1.0
    assert whole({"prompt": "p", "answer": "3"}, "between 3 and 17") == 0.0


def test_bad_regex_is_a_one_line_error():
    assert "regex:(ab does not compile" in one_line_error(get_checker, "regex:(ab")
    assert "missing its argument" in one_line_error(get_checker, "regex:")


def test_task_checker_uses_the_tasks_own_rule():
    check = get_checker("task:arithmetic")
    row = {"prompt": "12+30=", "answer": "42"}
    assert check(row, "2+0=2 1+3=4 ans=42") == 1.0
    assert check(row, "2+0=2 1+3=4 ans=41") == 0.0
    assert check(row, "42") == 0.0  # the arithmetic task reads the number after "ans="
    assert "unknown task 'nope'" in one_line_error(get_checker, "task:nope")


@pytest.mark.parametrize("spec", ["fuzzy", "numeric:5", "", "exact numeric", "a.b:"])
def test_unknown_spec(spec):
    message = one_line_error(get_checker, spec)
    assert message == (f"unknown checker {spec!r}; choose exact, contains, numeric, math, regex:PATTERN, ifeval, "
                       f"task:NAME or module:function")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "opd_test_user_checks.py").write_text(
        "def is_right(row, completion):\n"
        "    return completion.strip() == row['answer']\n"
        "NOT_CALLABLE = 3\n"
    )
    (tmp_path / "opd_test_broken_checks.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "opd_test_user_checks"


def test_user_function_is_imported(user_module):
    check = get_checker(f"{user_module}:is_right")
    assert check({"prompt": "p", "answer": "yes"}, " yes") is True
    assert score(check, [{"prompt": "p", "answer": "yes"}] * 2, ["yes", "no"]) == [1.0, 0.0]


def test_user_function_errors_are_one_line(user_module):
    message = one_line_error(get_checker, "opd_test_no_such_module:f")
    assert "checker opd_test_no_such_module:f: cannot import opd_test_no_such_module (ModuleNotFoundError" in message
    message = one_line_error(get_checker, "opd_test_broken_checks:f")
    assert "cannot import opd_test_broken_checks (RuntimeError: boom at import)" in message
    message = one_line_error(get_checker, f"{user_module}:missing")
    assert f"module {user_module} has no attribute 'missing'" in message
    assert "is a int, not a function" in one_line_error(get_checker, f"{user_module}:NOT_CALLABLE")


def test_required_and_missing_columns():
    assert required_columns("exact") == required_columns("numeric") == ("answer",)
    assert required_columns(r"regex:(\d+)") == required_columns("task:arithmetic") == ("answer",)
    assert required_columns("ifeval") == ("instruction_id_list", "kwargs")
    assert required_columns("mypkg.checks:is_right") == ()
    check_columns("numeric", ["prompt", "answer"])
    check_columns("mypkg.checks:is_right", ["prompt"])
    message = one_line_error(check_columns, "numeric", ["prompt", "messages"])
    assert message == ("--eval-data has no 'answer' column, which --checker numeric needs; add answers or map a "
                       "column with --data-fields answer=COLUMN")
    message = one_line_error(check_columns, "ifeval", ["prompt", "kwargs"], "--data")
    assert message.startswith("--data has no 'instruction_id_list' column, which --checker ifeval needs;")
    assert "'instruction_id_list' or 'kwargs' column" in one_line_error(check_columns, "ifeval", ["prompt"])
    assert "unknown checker" in one_line_error(required_columns, "bogus")


def test_score_converts_bools_and_refuses_non_numbers():
    rows = [{"prompt": "p", "answer": "a"}] * 3
    assert score(lambda row, c: c == "a", rows, ["a", "b", "a"]) == [1.0, 0.0, 1.0]
    assert score(lambda row, c: 0.25, rows[:1], ["x"]) == [0.25]

    def says_yes(row, completion):
        return "yes"

    message = one_line_error(score, says_yes, rows[:1], ["x"])
    assert "checker test_score_converts_bools_and_refuses_non_numbers.<locals>.says_yes returned str 'yes'" in message
    assert "2 completions" in one_line_error(score, says_yes, rows[:1], ["x", "y"])


def ifeval_row(ids, kwargs, prompt="Tell me about cats."):
    return {"prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}


def test_ifeval_all_instructions_must_hold():
    check = get_checker("ifeval")
    row = ifeval_row(["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}])
    assert check(row, "cats are small furry animals that like to sleep in the sun all day long") == 1.0
    assert check(row, "cats are small, furry animals that like to sleep in the sun all day long") == 0.0
    assert check(row, "Cats are small furry animals that like to sleep in the sun all day long") == 0.0
    assert check(row, "") == 0.0


def test_ifeval_reads_kwargs_and_drops_nulls():
    check = get_checker("ifeval")
    # Arrow-backed datasets write every argument of every instruction, None where unused.
    words = ifeval_row(["length_constraints:number_words", "keywords:existence"],
                       [{"num_words": 6, "relation": "less than", "keywords": None},
                        {"keywords": ["whiskers"], "num_words": None, "relation": None}])
    assert check(words, "Cats have long whiskers.") == 1.0
    assert check(words, "Cats have long soft and sensitive whiskers.") == 0.0   # 7 words
    assert check(words, "Cats are nice.") == 0.0                                # no keyword
    end = ifeval_row(["startend:end_checker"], [{"end_phrase": "Any other questions?"}])
    assert check(end, "Cats purr. Any other questions?") == 1.0
    assert check(end, "Any other questions? Cats purr.") == 0.0


def test_ifeval_checks_ifbench_instructions():
    check = get_checker("ifeval")
    row = ifeval_row(["format:no_whitespace"], [{}])
    assert check(row, "cats_purr_when_content") == 1.0
    assert check(row, "cats purr when content") == 0.0
    keywords = ifeval_row(["count:keywords_multiple"],
                          [{"keyword1": "a1", "keyword2": "b2", "keyword3": "c3", "keyword4": "d4", "keyword5": "e5"}])
    right = " ".join(["a1"] + ["b2"] * 2 + ["c3"] * 3 + ["d4"] * 5 + ["e5"] * 7)
    assert check(keywords, right) == 1.0
    assert check(keywords, right + " a1") == 0.0


def test_ifeval_row_errors():
    check = get_checker("ifeval")
    message = one_line_error(check, ifeval_row(["made_up:instruction"], [{}]), "text")
    assert "does not know instruction 'made_up:instruction'" in message
    message = one_line_error(check, ifeval_row(["punctuation:no_comma", "startend:quotation"], [{}]), "text")
    assert "2 instruction ids but 1 kwargs" in message


def test_ifeval_missing_nltk_data_is_a_one_line_error(monkeypatch):
    check = get_checker("ifeval")
    from if_verifiable.ifbench import instructions_util

    def no_stopwords(text):
        raise LookupError("\n*****\n  Resource 'stopwords' not found.\n  Please use the NLTK Downloader\n*****\n")

    monkeypatch.setattr(instructions_util, "count_stopwords", no_stopwords)
    message = one_line_error(check, ifeval_row(["ratio:stop_words"], [{"percentage": 50}]), "cats purr a lot")
    assert message == ("the ifeval checker needs NLTK data for ratio:stop_words ('stopwords' is missing); run: "
                       "python -m nltk.downloader punkt punkt_tab stopwords averaged_perceptron_tagger_eng")


def test_ifeval_without_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "if_verifiable.common", None)  # makes the import fail
    message = one_line_error(get_checker, "ifeval")
    assert message == "the ifeval checker needs the if-verifiable package: pip install 'opd[ifeval]'"


def test_contains_finds_the_answer_inside_a_sentence_ignoring_case_and_spacing():
    check = get_checker("contains")
    row = {"prompt": "Who leads Project Quillmere?", "answer": "Tavi  Ronsdal"}
    assert check(row, "Project Quillmere is led by tavi ronsdal.") == 1.0
    assert check(row, "It is led by Tavi\nRonsdal, since 2021.") == 1.0
    assert check(row, "It is led by Tavi Ronsberg.") == 0.0
    assert check(row, "") == 0.0
    with pytest.raises(ValueError, match="answer"):
        check({"prompt": "q"}, "anything")
    assert required_columns("contains") == ("answer",)


@pytest.mark.parametrize("answer, completion", [
    ("0.5", r"The answer is $\boxed{\frac{1}{2}}$."),
    ("0.5", "1/2"),
    ("1/2", "0.5"),
    ("3", "x = 3"),
    (r"\sqrt{8}", r"\boxed{2\sqrt{2}}"),      # a bare LaTeX answer is read as LaTeX, not as the text "8"
    (r"\frac{3}{4}", "0.75"),
    (r"2\pi", r"so the length is $\boxed{2\pi}$"),
    (r"\{1,2\}", r"$\{2,1\}$"),
    ("6", r"So the total is \boxed{6}."),
])
def test_math_accepts_equal_answers_written_differently(answer, completion):
    assert get_checker("math")({"prompt": "q", "answer": answer}, completion) == 1.0


@pytest.mark.parametrize("answer, completion", [
    ("0.5", "1/3"),
    ("3", "x = 4"),
    (r"\sqrt{8}", r"\boxed{2\sqrt{3}}"),
    ("1/2", r"\boxed{\frac{2}{3}}"),
    ("12", "The answer is 21."),
    ("6", "no answer here"),
    ("6", ""),
])
def test_math_refuses_different_or_missing_answers(answer, completion):
    assert get_checker("math")({"prompt": "q", "answer": answer}, completion) == 0.0


def test_math_as_the_rl_reward_and_its_errors(monkeypatch):
    import sys

    # The RL baseline scores a group's completions with `score(get_checker(spec), rows, texts)`.
    rows = [{"prompt": "half of 1?", "answer": "1/2"}] * 3
    assert score(get_checker("math"), rows, [r"\boxed{0.5}", "1/3", "it is 1/2"]) == [1.0, 0.0, 1.0]
    assert required_columns("math") == ("answer",)
    message = one_line_error(check_columns, "math", ["prompt", "question"], "--data")
    assert message.startswith("--data has no 'answer' column, which --checker math needs")
    with pytest.raises(ValueError, match="'answer'"):
        get_checker("math")({"prompt": "q"}, "1")
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes the import fail
    message = one_line_error(get_checker, "math")
    assert message == "the math checker needs the math-verify package: pip install 'opd[math]'"
