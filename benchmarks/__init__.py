"""Benchmarks that regenerate the numbers in RESULTS.md: one module per experiment, outputs in benchmarks/results/."""
