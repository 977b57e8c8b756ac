"""Tasks made here, with checkable answers: data, a local tokenizer, model configs, a cached teacher.

`get_task("arithmetic")` gives a deterministic generator of worked examples and an answer checker.
"""

from __future__ import annotations

import functools

from opd.tasks.arithmetic import ArithmeticTask
from opd.tasks.base import Example, Task
from opd.tasks.digits import OPERATIONS, DigitTask

TASKS = {
    "arithmetic": ArithmeticTask,
    # the same addition with 5-7-digit operands: chains of 5-7 dependent steps instead of 2-4, where a slip early on
    # has longer to compound (the harder regime of `opd bench opd_wins`)
    "arithmetic-long": functools.partial(ArithmeticTask, min_digits=5, max_digits=7, name="arithmetic-long"),
    # the same addition with a calculator tool: each column's sum is asked of `calc(...)` in a turn of its own, and
    # the tool's answer comes back into the conversation (multi-turn rollouts, `opd.lm.rollouts.tools`)
    "arithmetic-tools": functools.partial(ArithmeticTask, name="arithmetic-tools", tools="calc",
                                          alphabet="0123456789+= ans" + "cl()"),
    **{name: functools.partial(DigitTask, name) for name in OPERATIONS},
}
"""Registry: task name -> class (or class with its settings bound) constructed with its defaults by `get_task`."""


def get_task(name: str) -> Task:
    """The task registered under `name`, with default settings."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "ArithmeticTask", "DigitTask", "Example", "Task", "get_task"]
