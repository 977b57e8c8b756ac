"""Benchmarks that regenerate the numbers in RESULTS.md: one module per experiment, results under benchmarks/results/."""
