"""The control on-policy-vs-replay benchmark's --quick mode: both arms per size, paired gaps, finite numbers."""

import json
import math

from benchmarks.opd_wins.control import markdown, run


def test_quick_run_compares_both_collectors_per_size(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path / "cache"))  # the quick teacher is trained here, not cached for good
    kw = dict(out_dir=str(tmp_path / "out"), runs_dir=str(tmp_path / "runs"), other_load="a test")
    results, text = run(quick=True, seeds=(0, 1), workers=1, **kw)
    assert json.loads((tmp_path / "out" / "opd_wins_control_quick.json").read_text()) == json.loads(
        json.dumps(results))
    assert (tmp_path / "out" / "opd_wins_control_quick.md").read_text() == text == markdown(results)
    assert results["args"]["updates"] == 40 and results["command"].startswith("opd bench opd_wins_control")
    assert len(results["runs"]) == 2 * 2 * 2  # 2 fractions × 2 collectors × 2 seeds
    assert [r["param_fraction"] for r in results["rows"]] == [0.25, 0.07]
    for row in results["rows"]:
        assert set(row["collectors"]) == {"teacher", "student"}
        for arm in row["collectors"].values():
            assert arm["seeds"] == [0, 1] and len(arm["scores"]) == 2
            assert all(math.isfinite(v) for v in [*arm["scores"], arm["mean"], arm["std"]])
            teacher = row["teacher_score"]  # a 1,000-step teacher may score 0, and then there is no ratio
            assert math.isnan(arm["score_fraction"]) if teacher == 0 else arm["score_fraction"] == arm["mean"] / teacher
        gaps = [s - t for s, t in zip(row["collectors"]["student"]["scores"], row["collectors"]["teacher"]["scores"])]
        assert row["gap_seeds"] == gaps and math.isfinite(row["gap_mean"]) and math.isfinite(row["seed_spread"])
        assert row["onpolicy_wins_beyond_spread"] == (row["gap_mean"] > row["seed_spread"])
    assert "| MinAtar/SpaceInvaders-v1 | 25 % (" in text and "QUICK" not in text and "--quick run" in text
    # a second invocation finds every run finished and rebuilds the same table from them
    again, _ = run(quick=True, seeds=(0, 1), workers=1, **kw)
    assert again["runs_reused"] == 8 and again["rows"] == results["rows"]
