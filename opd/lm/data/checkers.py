"""Answer checkers: score a completion for held-out accuracy (--checker) or as an RL reward.

A checker is any callable `(row, completion) -> float` (1.0 right, 0.0 wrong, partial credit in between), where
`row` is one dataset row as a plain dict with at least `prompt` (its text; a chat's last user message) and usually
`answer`. `get_checker` builds one from the spec a user writes on the command line:

    exact             completion.strip() == answer
    contains          the answer appears in the completion (case and spacing ignored): short factual answers
    numeric           the last number in the completion equals the answer's number
    math              the completion's final answer is mathematically equal to the answer (Hugging Face's math-verify:
                      \\boxed{}, fractions, decimals, `x = 3`, LaTeX; pip install 'opd[math]')
    regex:PATTERN     the last match of PATTERN (its first group, if any) equals the answer
    ifeval            every IFEval / IFBench instruction in `instruction_id_list` + `kwargs` is followed (strict)
    task:NAME         a built-in task's own checker (`opd.tasks`)
    module:function   your own callable, imported

    checker = get_checker("numeric")
    check_columns("numeric", rows.column_names)     # fail before generating anything
    rewards = score(checker, rows, completions)
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
import threading
from typing import Any, Callable, Iterable

Checker = Callable[[dict, str], Any]
"""`(row, completion) -> float` (a bool is accepted and read as 0/1)."""


CHOICES = "exact, contains, numeric, math, regex:PATTERN, ifeval, task:NAME or module:function"


# A number as people write them: optional sign and currency, thousands separators, decimals, a percent sign. The
# sign counts only where it cannot be a hyphen or a range ("pages 10-12" ends in 12, not -12).
_NUMBER_RE = re.compile(r"(?:(?<![\w.-])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?%?")


_MODULE_FUNCTION_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


# The NLTK data if-verifiable's IFBench checkers read (it tries to download them when first imported).
_NLTK_DATA = "punkt punkt_tab stopwords averaged_perceptron_tagger_eng"


def get_checker(spec: str) -> Checker:
    """The checker a spec names (see the module docstring); a one-line ValueError for a spec that cannot work."""
    kind, arg = _parse(spec)
    if kind == "exact":
        return _exact
    if kind == "contains":
        return _contains
    if kind == "numeric":
        return _numeric
    if kind == "math":
        return _math_checker()
    if kind == "regex":
        return _regex_checker(arg)
    if kind == "ifeval":
        return _ifeval_checker()
    if kind == "task":
        return _task_checker(arg)
    return _user_checker(spec)


def required_columns(spec: str) -> tuple[str, ...]:
    """The columns (besides the prompt) a dataset needs for this checker; none known for a user's function."""
    kind, _ = _parse(spec)
    if kind == "ifeval":
        return ("instruction_id_list", "kwargs")
    if kind == "module":
        return ()
    return ("answer",)


def check_columns(spec: str, columns: Iterable[str], what: str = "--eval-data") -> None:
    """Raise a one-line ValueError if rows with these `columns` lack what checker `spec` reads.

    `what` names the data in the message (the flag the user passed).
    """
    have = set(columns)
    missing = [c for c in required_columns(spec) if c not in have]
    if not missing:
        return
    if missing == ["answer"]:
        fix = "add answers or map a column with --data-fields answer=COLUMN"
    else:
        fix = "use IFEval-style rows, which list each prompt's instructions and their arguments"
    names = " or ".join(repr(c) for c in missing)
    raise ValueError(f"{what} has no {names} column, which --checker {spec} needs; {fix}")


def try_checker(checker: Checker, row: dict, what: str) -> None:
    """Run `checker` once on `row` with its reference completion (or an empty one) before any training, so that a
    checker that cannot work on these rows fails now, in one line, instead of stopping the run at its first
    evaluation. `what` names the rows (--eval-data, eval_prompts)."""
    completion = row.get("completion")
    completion = "" if completion is None else str(completion)
    try:
        score(checker, [row], [completion])
    except Exception as e:  # the user's own code: any exception is theirs to see
        name = getattr(checker, "__qualname__", repr(checker))
        detail = " ".join(str(e).split())
        raise ValueError(f"checker {name} fails on the first row of {what} (completion {completion!r:.40}): "
                         f"{type(e).__name__}: {detail}; fix it first (it is tried on one row before any model loads, "
                         f"so that it cannot stop a run half-way)") from e


def score(checker: Checker, rows: list[dict], completions: list[str]) -> list[float]:
    """`checker` applied to each (row, completion) pair, as floats; a one-line ValueError for a non-number."""
    if len(rows) != len(completions):
        raise ValueError(f"score got {len(rows)} rows but {len(completions)} completions; pass one completion per row")
    scores = []
    for row, completion in zip(rows, completions):
        value = checker(row, completion)
        # Real covers bool (read as 0/1) and numpy's scalars as well as int and float.
        if not isinstance(value, numbers.Real):
            name = getattr(checker, "__qualname__", repr(checker))
            raise ValueError(f"checker {name} returned {type(value).__name__} {value!r:.60}; it must return a number "
                             f"(1.0 right, 0.0 wrong) or a bool")
        scores.append(float(value))
    return scores


def last_number(text: str) -> float | None:
    """The last number written in `text` ("$1,234.50" -> 1234.5, "-7%" -> -7.0), or None if there is none."""
    matches = _NUMBER_RE.findall(text)
    if not matches:
        return None
    return float(matches[-1].replace("$", "").replace(",", "").replace("%", ""))


def _parse(spec: str) -> tuple[str, str]:
    """(kind, argument) of a checker spec, without compiling or importing anything."""
    spec = spec.strip()
    if spec in ("exact", "contains", "numeric", "math", "ifeval"):
        return spec, ""
    for kind in ("regex", "task"):
        if spec.startswith(kind + ":"):
            arg = spec[len(kind) + 1:]
            if not arg:
                raise ValueError(f"checker {spec!r} is missing its argument; write e.g. regex:answer: (\\d+) or "
                                 f"task:arithmetic")
            return kind, arg
    if _MODULE_FUNCTION_RE.fullmatch(spec):
        return "module", spec
    raise ValueError(f"unknown checker {spec!r}; choose {CHOICES}")


def _answer(row: dict, checker: str) -> str:
    if "answer" not in row or row["answer"] is None:
        raise ValueError(f"the {checker} checker needs an 'answer' in every row; map a column with "
                         f"--data-fields answer=COLUMN")
    return str(row["answer"]).strip()


def _exact(row: dict, completion: str) -> float:
    """1.0 iff the completion, stripped, is exactly the answer."""
    return float(completion.strip() == _answer(row, "exact"))


def _squeeze(text: str) -> str:
    return " ".join(text.casefold().split())


def _contains(row: dict, completion: str) -> float:
    """1.0 iff the answer occurs in the completion, ignoring case and runs of whitespace. For short factual answers
    (a name, a code) that a chat model states inside a sentence; an answer that is a substring of a wrong one (a
    name inside a longer name) is counted right, so keep answers distinctive."""
    return float(_squeeze(_answer(row, "contains")) in _squeeze(completion))


def _numeric(row: dict, completion: str) -> float:
    """1.0 iff the last number in the completion equals the answer's number."""
    answer = _answer(row, "numeric")
    expected = last_number(answer)
    if expected is None:
        raise ValueError(f"the numeric checker found no number in the answer {answer!r:.60}; use --checker exact "
                         f"for answers that are not numbers")
    got = last_number(completion)
    # Both sides come from decimal strings, so only float rounding separates equal values.
    return float(got is not None and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9))


def _math_checker() -> Checker:
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ValueError("the math checker needs the math-verify package: pip install 'opd[math]'") from None

    def math_checker(row: dict, completion: str) -> float:
        """1.0 iff math-verify finds the completion's answer (its \\boxed{} or last expression) equal to the row's."""
        answer = _answer(row, "math")
        # math-verify reads LaTeX only between delimiters or in \boxed{}; a reference answer is usually bare
        # (`2\pi`, `\sqrt{8}`), and read as plain text it would be `2` or nothing.
        if "$" not in answer and "\\boxed" not in answer:
            answer = f"${answer}$"
        # math-verify bounds parsing and comparison with SIGALRM, which Python allows only in the main thread;
        # elsewhere (a checker run from a worker thread) it goes without the bound rather than fail.
        limit = 5 if threading.current_thread() is threading.main_thread() else None
        gold = parse(answer, parsing_timeout=limit)
        if not gold:
            raise ValueError(f"the math checker could not read the answer {answer!r:.60}; write it as a number or "
                             f"LaTeX, or use --checker exact")
        return float(verify(gold, parse(completion, parsing_timeout=limit), timeout_seconds=limit))

    return math_checker


def _regex_checker(pattern: str) -> Checker:
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"checker regex:{pattern} does not compile ({err}); fix the pattern") from None

    def regex_checker(row: dict, completion: str) -> float:
        """1.0 iff the last match of the pattern (its first group, if it has one) equals the answer."""
        answer = _answer(row, f"regex:{pattern}")
        last = None
        for last in compiled.finditer(completion):
            pass
        if last is None:
            return 0.0
        found = last.group(1) if compiled.groups else last.group(0)
        return float((found or "").strip() == answer)

    return regex_checker


def _task_checker(name: str) -> Checker:
    from opd.tasks import get_task
    from opd.tasks.base import Example

    task = get_task(name)

    def task_checker(row: dict, completion: str) -> float:
        """The task's own `is_correct`, on an Example built from the row's prompt and answer."""
        example = Example(prompt=row["prompt"], completion="", answer=_answer(row, f"task:{name}"))
        return float(task.is_correct(example, completion))

    return task_checker


def _user_checker(spec: str) -> Checker:
    return user_function(spec, "checker", "a (row, completion) -> float")


def user_function(spec: str, what: str, shape: str):
    """Your function `module:function`, imported; one line naming `what` it is for (checker, tool) when the module
    does not import, lacks the name, or holds something other than a function (`shape` says which)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a user's module can fail in any way; the first line of the error says how
        raise ValueError(f"{what} {spec}: cannot import {module_name} ({type(err).__name__}: {_first_line(err)}); "
                         f"make it importable (installed or on PYTHONPATH)") from None
    if not hasattr(module, attr):
        raise ValueError(f"{what} {spec}: module {module_name} has no attribute {attr!r}; check the function's name")
    function = getattr(module, attr)
    if not callable(function):
        raise ValueError(f"{what} {spec} is a {type(function).__name__}, not a function; point it at {shape} "
                         f"callable")
    return function


def _ifeval_checker() -> Checker:
    try:
        import langdetect
        from if_verifiable.common import evaluate_instructions
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT as ifeval_registry
    except ImportError:
        raise ValueError("the ifeval checker needs the if-verifiable package: pip install 'opd[ifeval]'") from None
    # IFEval's (lower|upper)case checks ask langdetect, which samples; fix its seed so a reward never flips between
    # two calls on the same text (langdetect's documented way).
    langdetect.DetectorFactory.seed = 0
    ifbench_registry: dict[str, Any] = {}

    def instruction_class(instruction_id: str) -> Any:
        if instruction_id in ifeval_registry:
            return ifeval_registry[instruction_id]
        if not ifbench_registry:
            # Loaded on first need: importing it makes nltk try to download its corpora.
            from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT

            ifbench_registry.update(INSTRUCTION_DICT)
        if instruction_id not in ifbench_registry:
            # if-verifiable would silently skip it, scoring the row on the other instructions only.
            raise ValueError(f"the ifeval checker does not know instruction {instruction_id!r}; it checks IFEval "
                             f"and IFBench ids such as 'punctuation:no_comma' or 'count:word_count_range'")
        return ifbench_registry[instruction_id]

    def ifeval_checker(row: dict, completion: str) -> float:
        """1.0 iff the completion follows every instruction of the row (IFEval's prompt-level strict accuracy)."""
        ids = list(row["instruction_id_list"])
        kwargs = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in row["kwargs"]]
        if len(ids) != len(kwargs):
            raise ValueError(f"an ifeval row has {len(ids)} instruction ids but {len(kwargs)} kwargs; give one "
                             f"kwargs dict per instruction")
        registry = {i: instruction_class(i) for i in ids}
        try:
            _, scores = evaluate_instructions(completion, ids, kwargs, row["prompt"], registry)
        except LookupError as err:
            # nltk's message is a framed block naming one resource; name it, and ask for all of them at once, since
            # the next instruction may need another.
            found = re.search(r"Resource '([^']+)' not found", str(err))
            missing = f" ({found.group(1)!r} is missing)" if found else ""
            raise ValueError(f"the ifeval checker needs NLTK data for {', '.join(ids)}{missing}; run: python -m "
                             f"nltk.downloader {_NLTK_DATA}") from None
        return scores.binary_strict

    return ifeval_checker


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
