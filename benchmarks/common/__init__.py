"""What several benchmarks share: the recorded command, worker processes, results files, statistics, servers."""
