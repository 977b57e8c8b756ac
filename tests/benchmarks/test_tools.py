import json
from pathlib import Path

from benchmarks import tools
from tests.benchmarks.run_helpers import fields, run_config, run_metrics

ARMS = {"opd": dict(source="student", loss="reverse_kl", tools="calc"),
        "sft": dict(source="teacher", loss="sft", tools="calc")}
"""What each arm must run (written out here: the benchmark's ARMS could be wrong)."""


def test_quick_tools_runs_both_arms_with_the_calculator_and_writes_results(tmp_path, monkeypatch):
    monkeypatch.setattr(tools, "RESULTS", tmp_path / "results")
    results = tools.main(tools.ToolsArgs(out_dir=str(tmp_path / "runs")), quick=True)
    saved = json.loads((tmp_path / "results" / "tools_quick.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert "--quick run" in tools.section(saved)
    out = Path(saved["args"]["out_dir"])
    for key, want in ARMS.items():
        assert len(saved[key]["accuracy"]["per_seed"]) == 1 and 0 <= saved[key]["accuracy"]["mean"] <= 1
        run = out / key / "seed-0"
        config = run_config(run)
        assert fields(config, *want) == want, key
        assert config["teacher"] == str(out / "teacher") and config["task"] == "arithmetic-tools"
        metrics = run_metrics(run)
        assert len(metrics) == saved["args"]["steps"] and all("tool_calls" in m for m in metrics)
