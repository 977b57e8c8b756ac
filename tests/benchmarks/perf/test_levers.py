"""`--quick` runs of the lever and chunk-size benchmarks behind the performance notes: outputs exist and are well
formed (their numbers mean nothing at these sizes)."""

import json
import math

from benchmarks.perf.chunk_bench import ChunkArgs, chunk_bench
from benchmarks.perf.lever_bench import LeverArgs, lever_bench


def test_quick_lever_bench_measures_every_lever(tmp_path):
    rows = lever_bench(LeverArgs(quick=True, out_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results")))
    saved = json.loads((tmp_path / "results" / "perf_levers.json").read_text())["levers"]
    assert saved == json.loads(json.dumps(rows))
    names = [r["lever"] for r in rows]
    assert any(n.startswith("decoding head") for n in names) and any(n.startswith("opd's scored step") for n in names)
    assert any(n.startswith("compiled sampling") for n in names)
    for r in rows:
        assert r["before_cpu_s"] > 0 and r["after_cpu_s"] > 0
        assert math.isclose(r["speedup_cpu"], r["before_cpu_s"] / r["after_cpu_s"])
    table = (tmp_path / "results" / "perf_levers.md").read_text()
    assert table.count("\n| ") == len(rows) + 1  # header + one row per lever


def test_quick_chunk_bench_times_both_paths_at_every_chunk_size(tmp_path):
    result = chunk_bench(ChunkArgs(quick=True, results_dir=str(tmp_path)))
    rows = result["rows"]
    for vocab in (20, 4096):
        mine = [r for r in rows if r["vocab"] == vocab]
        assert {r["path"] for r in mine} == {"autograd", "fused", "teacher taken-token pass"}
        assert sum(r["auto"] for r in mine if r["path"] == "fused") == 1  # the default chunk size is marked once
        assert all(r["cpu_s"] > 0 for r in mine)
    table = (tmp_path / "perf_chunks.md").read_text().splitlines()
    assert sum("| **" in line for line in table) == 2 * 2  # the default in bold, per vocabulary and path
