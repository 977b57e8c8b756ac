import json
from pathlib import Path

from benchmarks import shared_cpu as sc
from tests.benchmarks.run_helpers import fields


def test_quick_shared_cpu_times_each_setting_and_writes_results(tmp_path, monkeypatch):
    monkeypatch.setattr(sc, "RESULTS", tmp_path)
    results = sc.main(sc.SharedCpuArgs(), quick=True)
    quiet, busy = (results["conditions"][n] for n in ("quiet, defaults", "2 busy jobs, defaults"))
    assert quiet["median_step_s"] > 0 and quiet["cpu_s"] > 0 and quiet["slowdown"] == 1.0
    assert busy["median_step_s"] > 0 and busy["cpu_s"] is None  # the busy jobs' CPU time is not the run's
    # both settings ran the same `opd train`, opd choosing the threads; only the busy jobs beside it differ
    quiet_cfg, busy_cfg = (results["runs"][n] for n in ("quiet, defaults", "2 busy jobs, defaults"))
    want = dict(source="student", loss="reverse_kl", steps=5, batch_size=4, threads=None)
    assert fields(quiet_cfg, *want) == want
    assert Path(quiet_cfg["student"]).name == "student" and Path(quiet_cfg["teacher"]).name == "teacher"
    assert {**busy_cfg, "out_dir": ""} == {**quiet_cfg, "out_dir": ""}
    assert json.loads((tmp_path / "shared_cpu_quick.json").read_text())["runs"] == results["runs"]
    assert sc.section(results).count("\n| ") == 3  # header and two settings
