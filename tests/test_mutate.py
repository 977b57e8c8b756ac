"""`tools/mutate.py`'s list of seeded bugs cannot rot silently when code moves: every edit still applies (its old text
occurs exactly once, and the edited file still compiles) and every test it names still exists. Nothing is mutated or
run here: test ids are resolved by reading the test files with `ast` (`python tools/mutate.py --check` asks pytest
to collect them instead, which takes a few seconds of imports)."""

from __future__ import annotations

import ast
import itertools

import pytest

from tools.mutate import MUTATIONS, ROOT, mutated_source


def test_names_are_unique_and_every_mutation_says_what_it_breaks_and_names_tests():
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names))
    for m in MUTATIONS:
        assert m.tests and m.why and "\n" not in m.why and m.old != m.new, m.name
        assert not m.file.startswith("/") and ".." not in m.file.split("/"), m.name  # edits stay in the scratch copy


@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.name)
def test_the_edit_applies_exactly_once_and_compiles(m):
    _, mutated = mutated_source(m)  # a ValueError unless the old text occurs exactly once
    compile(mutated, m.file, "exec")


def _id(value) -> str | None:
    """pytest's id of one parameter value, for the values whose id is the value itself (else None)."""
    if isinstance(value, str):
        return value if value.isascii() else None
    if value is None or isinstance(value, (bool, int, float)):
        return str(value)
    return None


def _ids(argnames, values) -> list[str | None]:
    """pytest's ids of a `parametrize` without `ids=`: one per value, '-'-joined over several argnames."""
    if isinstance(argnames, str) and "," not in argnames:
        return [_id(v) for v in values]
    joined = []
    for v in values:
        parts = [_id(x) for x in v]
        joined.append(None if None in parts else "-".join(parts))
    return joined


def _parametrize_ids(func: ast.FunctionDef) -> set[str] | None:
    """The ids pytest gives `func`'s parametrizations, worked out from literal `parametrize` arguments; None where they
    are not literals."""
    per_decorator = []
    for dec in func.decorator_list:
        if not (isinstance(dec, ast.Call) and ast.unparse(dec.func).endswith("parametrize")):
            continue
        given = next((kw.value for kw in dec.keywords if kw.arg == "ids"), None)
        try:
            ids = (ast.literal_eval(given) if given is not None
                   else _ids(ast.literal_eval(dec.args[0]), ast.literal_eval(dec.args[1])))
        except (ValueError, IndexError, TypeError):
            return None
        if not isinstance(ids, (list, tuple)) or None in ids:
            return None
        per_decorator.append(ids)
    # the decorator nearest the function is applied first, so its part of the id comes first
    return {"-".join(parts) for parts in itertools.product(*reversed(per_decorator))}


def missing(node_id: str) -> str | None:
    """Why `node_id` (path[::Class]::function[params]) names no test, or None if it does."""
    path, _, rest = node_id.partition("::")
    file = ROOT / path
    if not file.is_file():
        return f"no file {path}"
    if not rest:
        return None
    name, _, params = rest.partition("[")
    *classes, function = name.split("::")
    source = file.read_text()
    body = ast.parse(source).body
    for cls in classes:
        found = [n for n in body if isinstance(n, ast.ClassDef) and n.name == cls]
        if not found:
            return f"no class {cls} in {path}"
        body = found[0].body
    funcs = [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function]
    if not funcs:
        return f"no test {function} in {path}"
    if not params:
        return None
    params = params.removesuffix("]")
    ids = _parametrize_ids(funcs[0])
    if ids is None:  # not literals: every part of the id must at least occur in the file
        return None if all(part in source for part in params.split("-")) else f"no parameters [{params}] in {path}"
    return None if params in ids else f"[{params}] is not among {function}'s parametrizations {sorted(ids)}"


@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.name)
def test_every_named_test_exists(m):
    assert [why for why in map(missing, m.tests) if why] == []


def test_the_resolver_tells_a_missing_test_from_a_real_one():
    real = "tests/lm/test_loop_wiring.py::test_the_loss_flag_gives_that_divergence_of_the_full_logits"
    assert missing(real) is None and missing(real + "[reverse_kl]") is None
    assert missing(real + "[reverse_KL]") is not None  # sorted(REFERENCE): not a literal, the id's text is looked for
    literal = "tests/lm/test_teachers.py::test_source_teacher_trains_on_the_teachers_greedy_completions_not_the_students"
    assert missing(literal + "[local]") is None and "not among" in missing(literal + "[remote]")
    assert "no test" in missing("tests/lm/test_loop_wiring.py::test_that_is_not_there")
    assert "no file" in missing("tests/lm/test_nothing_here.py")
    stacked = "tests/lm/test_xtok.py::test_multi_token_spans_give_the_event_and_span_divergences_of_both_models"
    assert missing(stacked + "[char_student-jsd]") is None and missing(stacked + "[jsd-char_student]") is not None
    # ids of a param given as an `ids=` list, and of stacked decorators whose values are not literals
    assert missing("tests/lm/test_loop_wiring.py::test_lm_head_of_the_final_hidden_states_gives_the_models_own_logits"
                   "[gemma2_softcapping]") is None
