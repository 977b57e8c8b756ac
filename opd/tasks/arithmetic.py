"""Multi-digit addition written out column by column, the way it is done on paper.

`4827+596=` is answered with one step per column, right to left, each naming the two digits, the
carry coming in and their two-digit sum (whose first digit is the next carry), then the answer:

    7+6+0=13 2+9+1=12 8+5+1=14 4+0+1=05 ans=5423

Every step depends on the one before it (the carry) and on finding the right digits in the prompt,
so a model that slips anywhere gets the answer wrong; the answer itself has to be read back from the
steps in reverse order.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from opd.tasks.base import Example

ANSWER_MARKER = "ans="
_ANSWER_RE = re.compile(re.escape(ANSWER_MARKER) + r"(\d+)")
SPLITS = ("train", "test")


def solve(a: int, b: int) -> Example:
    """The worked example for `a + b` (both non-negative)."""
    if a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative, got {a} and {b}")
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    carry, steps = 0, []
    for i in range(max(len(digits_a), len(digits_b))):
        x = int(digits_a[i]) if i < len(digits_a) else 0
        y = int(digits_b[i]) if i < len(digits_b) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    answer = str(a + b)
    return Example(prompt=f"{a}+{b}=", completion=" ".join(steps) + f" {ANSWER_MARKER}{answer}", answer=answer)


def solve_with_calculator(a: int, b: int, end_of_turn: str = "<eos>") -> Example:
    """`a + b` worked with the calculator tool (`--tools calc`): each column is a turn that calls `calc(x+y+carry)`
    and ends (`end_of_turn`, the tokenizer's end-of-sequence token), the tool answers the sum, and the last turn states
    the answer. The completion is the whole conversation, tool answers included:

        calc(7+6+0)<eos>13 calc(2+9+1)<eos>12 calc(8+5+1)<eos>14 calc(4+0+1)<eos>5 ans=5423

    The carry into a column is the first digit of the previous column's sum when it has two, else 0.
    """
    worked = solve(a, b)
    turns = []
    for step in worked.completion.split(" ")[:-1]:  # "7+6+0=13" -> the call, and the tool's answer (no padding)
        expression, total = step.split("=")
        turns.append(f"calc({expression}){end_of_turn}{int(total)}")
    return Example(prompt=worked.prompt, completion=" ".join(turns) + f" {ANSWER_MARKER}{worked.answer}",
                   answer=worked.answer)


def examples_rng(task: str, n: int, seed: int, split: str) -> random.Random:
    """The random stream `task`'s `examples(n, seed, split)` draws from, after checking `split` and `n`.

    A string seed is hashed by `random` itself, so the stream is the same on every platform."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return random.Random(f"{task}/{split}/{seed}")


def split_of(prompt: str, test_fraction: float) -> str:
    """Which split a problem belongs to, fixed by a hash of its prompt so the splits never overlap."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 1_000_000
    return "test" if bucket < test_fraction * 1_000_000 else "train"


@dataclass(frozen=True)
class ArithmeticTask:
    """Addition of two numbers with `min_digits`..`max_digits` digits each, solved column by column."""

    min_digits: int = 2
    """Fewest digits an operand has."""
    max_digits: int = 4
    """Most digits an operand has; the completion has this many steps at most."""
    test_fraction: float = 0.1
    """Share of all problems (chosen by hashing the prompt) that belong to the held-out split."""
    name: str = "arithmetic"
    """Registry name."""
    alphabet: str = "0123456789+= ans"
    """Every character a prompt or completion can contain."""
    tools: str | None = None
    """`calc`: the worked examples call the calculator tool, one turn per column (`solve_with_calculator`); the
    model is then trained and evaluated with `--tools calc`, up to `max_turns` turns."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits} and {self.max_digits}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {self.test_fraction}")

    def examples(self, n: int, seed: int, split: str) -> list[Example]:
        """`n` problems drawn from `seed` (with replacement) that belong to `split` ("train" or "test")."""
        rng = examples_rng(self.name, n, seed, split)
        out: list[Example] = []
        while len(out) < n:
            a, b = self._operand(rng), self._operand(rng)
            if split_of(f"{a}+{b}=", self.test_fraction) == split:
                out.append(solve_with_calculator(a, b) if self.tools == "calc" else solve(a, b))
        return out

    @property
    def max_turns(self) -> int:
        """Turns of the longest worked example: one per column, then the answer."""
        return self.max_digits + 1

    @property
    def max_turn_tokens(self) -> int:
        """Tokens of the longest turn with the calculator, end of turn included: a column's ` calc(9+9+1)` or the
        answer (one character a token), with room to spare."""
        return max(len(" calc(9+9+1)"), len(f" {ANSWER_MARKER}") + self.max_digits + 1) + 4

    def _operand(self, rng: random.Random) -> int:
        num_digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (num_digits - 1) if num_digits > 1 else 0, 10**num_digits - 1)

    def is_correct(self, example: Example, completion: str) -> bool:
        """True iff the first answer stated after "ans=" in `completion` is exactly `example.answer`."""
        match = _ANSWER_RE.search(completion)
        return match is not None and match.group(1) == example.answer
