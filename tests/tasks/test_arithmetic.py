import re

import pytest

from opd.tasks import ArithmeticTask, Example, get_task
from opd.tasks.arithmetic import solve, split_of


def test_worked_example_by_hand():
    e = solve(4827, 596)
    assert e == Example("4827+596=", "7+6+0=13 2+9+1=12 8+5+1=14 4+0+1=05 ans=5423", "5423")
    assert solve(50, 50).completion == "0+0+0=00 5+5+0=10 ans=100"


def test_same_seed_same_examples_and_other_seeds_differ():
    task = get_task("arithmetic")
    assert task.examples(50, seed=3, split="train") == task.examples(50, seed=3, split="train")
    assert task.examples(50, seed=3, split="train") != task.examples(50, seed=4, split="train")
    assert task.examples(20, seed=3, split="test") == task.examples(50, seed=3, split="test")[:20]


def test_splits_are_disjoint_and_sized_by_test_fraction():
    task = get_task("arithmetic")
    train = {e.prompt for seed in range(3) for e in task.examples(2000, seed, "train")}
    test = {e.prompt for seed in range(3) for e in task.examples(500, seed, "test")}
    assert not train & test
    assert all(split_of(p, task.test_fraction) == "test" for p in test)
    # every 10th problem, roughly, is held out
    drawn = [split_of(f"{a}+{b}=", 0.1) for a in range(100, 140) for b in range(100, 150)]
    assert 150 < drawn.count("test") < 250


def test_every_step_and_answer_is_right_by_brute_force():
    task = ArithmeticTask(min_digits=1, max_digits=5)
    for e in task.examples(300, seed=0, split="train"):
        a, b = map(int, e.prompt.rstrip("=").split("+"))
        assert 1 <= len(str(a)) <= 5 and 1 <= len(str(b)) <= 5
        assert e.answer == str(a + b) and e.completion.endswith(f" ans={a + b}")
        steps = e.completion.split(" ")[:-1]
        assert len(steps) == max(len(str(a)), len(str(b)))
        carry = 0
        for i, step in enumerate(steps):
            x, y, c, s = map(int, re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d\d)", step).groups())
            assert (x, y, c) == (a // 10**i % 10, b // 10**i % 10, carry) and s == x + y + c
            carry = s // 10


@pytest.mark.parametrize(
    "completion, right",
    [
        ("7+6+0=13 2+9+1=12 8+5+1=14 4+0+1=05 ans=5423", True),
        ("garbage steps ans=5423", True),  # only the final answer is checked
        ("7+6+0=13 2+9+1=12 8+5+1=14 4+0+1=05 ans=5422", False),
        ("ans=54230", False),
        ("ans=0542", False),
        ("ans=5422 ans=5423", False),  # the first stated answer counts
        ("ans=", False),
        ("5423", False),
        ("", False),
        ("<unk>+++ans=ans 5423", False),
    ],
)
def test_checker(completion, right):
    task = get_task("arithmetic")
    assert task.is_correct(solve(4827, 596), completion) is right


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown task 'nope'; choose one of"):
        get_task("nope")
    with pytest.raises(ValueError, match="unknown split"):
        get_task("arithmetic").examples(1, 0, "validation")
    with pytest.raises(ValueError, match="min_digits"):
        ArithmeticTask(min_digits=3, max_digits=2)
