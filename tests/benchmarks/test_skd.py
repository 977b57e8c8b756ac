import json

from benchmarks import skd


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
    skd.plot(results, tmp_path / "skd.png")
    assert (tmp_path / "skd.png").stat().st_size > 0
    text = skd.section(results)
    assert text.count("\n| ") == 1 + 2 * 4  # the header, then per start: the student before and three methods
