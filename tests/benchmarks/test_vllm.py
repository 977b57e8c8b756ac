import pytest

from benchmarks import vllm as bench


@pytest.mark.vllm
def test_quick_vllm_benchmark_runs_every_check_and_writes_results(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    results = bench.main(bench.VllmBenchArgs(), quick=True)
    checks = results["checks"]
    assert results["all_passed"], {k: v for k, v in checks.items() if not v["passed"]}
    assert checks["teacher log-probs, tiny teacher"]["max_abs_diff_topk"] < 1e-4
    assert len([k for k in checks if k.startswith("bad input")]) == 4
    assert "teacher killed mid-run, resumed" not in checks  # full runs only; tests/lm/test_vllm.py has it
    speed = results["speed"]["scorers"]
    assert len(speed) == 3 and all(s["tokens_per_s"] > 0 for s in speed.values())
    assert (tmp_path / "vllm_quick.json").exists()
    assert bench.section(results).count("| passed |") == len(checks)
