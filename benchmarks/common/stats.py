"""Summaries over seeds that several benchmarks report."""

from __future__ import annotations

import statistics

import numpy as np


def sd(values: list[float]) -> float:
    """The sample standard deviation over seeds; 0.0 for a single seed (a --quick run)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean(values) -> float:
    """The mean of an iterable of numbers as a Python float, summed by NumPy (the robotics parts' numbers are; Python's
    `sum` may round the last digit differently)."""
    return float(np.mean(list(values)))
