"""Benchmarks that regenerate the numbers in RESULTS.md: one file, or one folder whose entry point is `run.py`, per
experiment (`opd bench NAME` runs it: `opd.cli.BENCHMARKS`); what several share is in `common/`; outputs in
benchmarks/results/."""
