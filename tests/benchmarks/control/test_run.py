"""The control benchmark's --quick mode writes the promised json keys, tables and plots."""

import json

from benchmarks.control import run as bench
from tests.benchmarks.run_helpers import fields


def test_quick_benchmark_writes_results(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path / "cache"))
    args = bench.ControlBenchArgs(quick=True, workers=1, out_dir=str(tmp_path / "out"), sections=("dagger", "rusu"),
                                  games=("MinAtar/Breakout-v1",), fractions=(0.25,))  # fmt: skip
    bench.control_bench_main(args)
    data = json.loads((tmp_path / "out" / "control.json").read_text())
    dagger = data["dagger_vs_bc"]
    assert dagger["expert_labels"] == [20, 40]  # 2 iterations × 5 steps × 4 envs
    assert len(dagger["bc_return"]) == len(dagger["dagger_return"]) == 2
    # which method each arm ran: who acts (DAgger's β schedule), and the loss on the expert's labels
    runs = data["dagger_runs"]
    arms = {"bc": dict(schedule="bc", loss="nll"), "linear": dict(schedule="linear", loss="nll"),
            "exponential": dict(schedule="exponential", loss="nll"),
            "onpolicy_aggregated": dict(schedule="zero", loss="reverse_kl")}
    for method, want in arms.items():
        assert fields(runs[method][0]["config"], *want) == want, method
    onpolicy = runs["onpolicy"][0]["config"]  # the student acts, no aggregation: no β schedule at all
    assert "schedule" not in onpolicy and (onpolicy["loss"], onpolicy["sample"]) == ("reverse_kl", True)
    (row,) = data["rusu_compression"]
    assert row["game"] == "MinAtar/Breakout-v1" and row["param_fraction"] == 0.25 and "score_fraction" in row
    assert "| expert labels |" in (tmp_path / "out" / "control.md").read_text()
    assert (tmp_path / "out" / "control_dagger.png").stat().st_size > 1000


def test_merge_keeps_the_sections_not_run_again(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "out")
    bench.control_bench_main(bench.ControlBenchArgs(quick=True, workers=1, out_dir=out, sections=("dagger",)))
    first = json.loads((tmp_path / "out" / "control.json").read_text())
    assert set(first["dagger_runs"]) == set(bench.DAGGER_METHODS)  # the aggregated on-policy column included
    bench.control_bench_main(bench.ControlBenchArgs(quick=True, workers=1, out_dir=out, sections=("kd",), merge=True))
    merged = json.loads((tmp_path / "out" / "control.json").read_text())
    assert merged["dagger_runs"] == first["dagger_runs"] and merged["classic_kd"]
    assert merged["wall_seconds"] > first["wall_seconds"]
    text = (tmp_path / "out" / "control.md").read_text()
    assert "| expert labels |" in text and "Classic KD" in text
    # without --merge a partial run starts from nothing
    bench.control_bench_main(bench.ControlBenchArgs(quick=True, workers=1, out_dir=out, sections=("kd",)))
    assert "dagger_runs" not in json.loads((tmp_path / "out" / "control.json").read_text())
