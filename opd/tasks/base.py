"""What every checkable task provides: worked examples and an answer checker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Example:
    """One problem with its worked solution."""

    prompt: str
    """What the model is conditioned on."""
    completion: str
    """The written-out steps followed by the final answer, without any end-of-sequence token."""
    answer: str
    """The final answer alone, as `Task.is_correct` expects to find it in a completion."""


class Task(Protocol):
    """A generator of worked examples whose final answers can be checked."""

    name: str
    """Registry name, as passed to `get_task`."""
    alphabet: str
    """Every character that can appear in a prompt or completion (the tokenizer's vocabulary)."""

    def examples(self, n: int, seed: int, split: str) -> list[Example]:
        """Return `n` examples drawn deterministically from `seed`; `split` is "train" or "test" (disjoint)."""
        ...

    def is_correct(self, example: Example, completion: str) -> bool:
        """Whether a generated `completion` states the right final answer for `example`."""
        ...
