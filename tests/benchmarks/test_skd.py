import json
from pathlib import Path

from benchmarks import skd
from tests.benchmarks.run_helpers import fields, run_config, run_metrics

ARMS = {"skd": dict(source="speculative", loss="reverse_kl"), "on_policy": dict(source="student", loss="reverse_kl"),
        "sft": dict(source="teacher", loss="sft")}
"""What each method must run (written out here: the benchmark's METHODS could be wrong)."""


def test_quick_skd_runs_every_method_from_both_starts_and_writes_results(tmp_path, monkeypatch):
    monkeypatch.setattr(skd, "RESULTS", tmp_path / "results")
    results = skd.main(skd.SkdArgs(out_dir=str(tmp_path / "runs")), quick=True)
    saved = json.loads((tmp_path / "results" / "skd_quick.json").read_text())
    assert saved == json.loads(json.dumps(results))
    args = results["args"]
    points = args["steps"] // args["eval_every"]
    assert len(saved["acceptance_rate"]) == points
    assert all(0.0 <= a <= 1.0 for a in saved["acceptance_rate"])
    for methods in (saved["methods"], saved["warm_start"]["methods"]):
        assert set(methods) == {"skd", "on_policy", "sft"}
        for key, m in methods.items():
            curve = m["curve"]
            assert curve["step"] == [args["eval_every"] * i for i in range(points + 1)]
            assert 0.0 <= m["final_accuracy"] <= 1.0 and m["final_accuracy"] == curve["accuracy"][-1]
            assert curve["flops"][0] == 0 and all(a < b for a, b in zip(curve["flops"], curve["flops"][1:]))
            assert all((a is None) == (key != "skd") for a in curve["acceptance"])
    # which method each arm ran: its config, and what only that method logs
    out = Path(args["out_dir"])
    for start in skd.STARTS:
        for key, want in ARMS.items():
            run = out / start / key / "seed-0"
            want = dict(want, student=str(out / f"{start}-start"), teacher=str(out / "teacher"))
            assert fields(run_config(run), *want) == want, run
            rows = run_metrics(run)
            assert len(rows) == args["steps"]
            assert all(("skd_acceptance" in m) == (key == "skd") for m in rows)  # the teacher verified proposals
            # SFT: the teacher samples and the student's samples are never drawn; otherwise the student drafts
            assert all((m["source"] == "teacher") == (m["flops_sample"] == 0) == (key == "sft") for m in rows)
            assert all((m["flops_teacher_generate"] > 0) == (key != "on_policy") for m in rows)
    assert run_config(out / "weak" / "skd" / "seed-0")["skd_top_k"] == args["skd_top_k"]
    skd.plot(results, tmp_path / "skd.png")
    assert (tmp_path / "skd.png").stat().st_size > 0
    text = skd.section(results)
    assert text.count("\n| ") == 1 + 2 * 4  # the header, then per start: the student before and three methods
