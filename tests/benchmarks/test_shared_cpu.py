from benchmarks import shared_cpu as sc


def test_quick_shared_cpu_times_each_setting_and_writes_results(tmp_path, monkeypatch):
    monkeypatch.setattr(sc, "RESULTS", tmp_path)
    results = sc.main(sc.SharedCpuArgs(), quick=True)
    quiet, busy = (results["conditions"][n] for n in ("quiet, defaults", "2 busy jobs, defaults"))
    assert quiet["median_step_s"] > 0 and quiet["cpu_s"] > 0 and quiet["slowdown"] == 1.0
    assert busy["median_step_s"] > 0 and busy["cpu_s"] is None  # the busy jobs' CPU time is not the run's
    assert (tmp_path / "shared_cpu_quick.json").exists()
    assert sc.section(results).count("\n| ") == 3  # header and two settings
