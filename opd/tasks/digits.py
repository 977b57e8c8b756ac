"""Small digit-string tasks that share one alphabet, for sequences of tasks (`opd.lm.recipes.continual`).

Each task names its operation in the prompt and answers with the digits alone:

    rev 38150=    ->  05183     reverse the digits
    shift 38150=  ->  49261     add one to every digit, 9 wrapping to 0
    sort 38150=   ->  01358     the digits in ascending order

They read the same inputs, so a model trained on one of them and then on another is pulled towards the new
operation on the old prompts too: what a forgetting experiment needs. A tiny model learns each in a few hundred
updates, unlike the column-by-column addition. Every task here has the same `alphabet` (it also holds the addition
task's characters), so one tokenizer built from any of them serves all, and the addition too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from opd.tasks.arithmetic import examples_rng, split_of
from opd.tasks.base import Example

OPERATIONS: dict[str, tuple[str, Callable[[str], str]]] = {
    "reverse": ("rev", lambda d: d[::-1]),
    "shift": ("shift", lambda d: "".join(str((int(c) + 1) % 10) for c in d)),
    "sort": ("sort", lambda d: "".join(sorted(d))),
}
"""Task name -> (the word its prompts start with, the map from the input digits to the answer)."""

ALPHABET = "".join(sorted(set("0123456789 =+ans" + "".join(word for word, _ in OPERATIONS.values()))))
"""Every character of every digit task's prompts and answers, and of the addition task's too."""


@dataclass(frozen=True)
class DigitTask:
    """One operation of `OPERATIONS` on strings of `min_digits`..`max_digits` digits (leading zeros allowed)."""

    name: str = "reverse"
    """Registry name, also the operation: a key of `OPERATIONS`."""
    min_digits: int = 3
    """Fewest input digits."""
    max_digits: int = 6
    """Most input digits; the answer has as many."""
    test_fraction: float = 0.1
    """Share of all inputs (chosen by hashing the prompt) that belong to the held-out split."""
    alphabet: str = ALPHABET
    """Every character a prompt or answer can contain: the same for every digit task, so they share a tokenizer."""

    def __post_init__(self) -> None:
        if self.name not in OPERATIONS:
            raise ValueError(f"unknown digit task {self.name!r}; choose one of {sorted(OPERATIONS)}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits} and {self.max_digits}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {self.test_fraction}")

    def solve(self, digits: str) -> Example:
        """The example for input `digits`: the completion is the answer itself (no written-out steps)."""
        if not digits.isdigit():
            raise ValueError(f"input must be digits, got {digits!r}")
        word, op = OPERATIONS[self.name]
        answer = op(digits)
        return Example(prompt=f"{word} {digits}=", completion=answer, answer=answer)

    def examples(self, n: int, seed: int, split: str) -> list[Example]:
        """`n` inputs drawn from `seed` (with replacement) that belong to `split` ("train" or "test")."""
        rng = examples_rng(self.name, n, seed, split)
        out: list[Example] = []
        while len(out) < n:
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(self.min_digits, self.max_digits)))
            # Split on the digits alone, not the prompt: an input held out for one task is held out for all of them,
            # so no task's training teaches another's test inputs.
            if split_of(digits, self.test_fraction) == split:
                out.append(self.solve(digits))
        return out

    def is_correct(self, example: Example, completion: str) -> bool:
        """True iff the completion, stripped of surrounding spaces, is exactly the answer."""
        return completion.strip() == example.answer
