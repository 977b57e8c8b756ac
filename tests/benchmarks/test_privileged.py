import json
from pathlib import Path

from benchmarks import privileged
from tests.benchmarks.run_helpers import fields, run_config, run_metrics

ARMS = {"self_privileged": (dict(teacher="self", source="student", loss="reverse_kl"), True),
        "sft": (dict(source="data", loss="sft"), False),
        "self_plain": (dict(teacher="self", source="student", loss="reverse_kl"), False)}
"""What each arm must run, and whether its data gives the teacher the solution (written out here: the benchmark's
ARMS could be wrong)."""


def test_quick_privileged_runs_every_arm_and_writes_results(tmp_path, monkeypatch):
    monkeypatch.setattr(privileged, "RESULTS", tmp_path / "results")
    results = privileged.main(privileged.PrivilegedArgs(out_dir=str(tmp_path / "runs")), quick=True)
    saved = json.loads((tmp_path / "results" / "privileged_quick.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(ARMS) <= set(saved) and "--quick run" in privileged.section(saved)
    out = Path(saved["args"]["out_dir"])
    for key, (want, with_solution) in ARMS.items():
        assert len(saved[key]["final_accuracy_per_seed"]) == 1 and 0 <= saved[key]["mean"] <= 1
        run = out / key / "seed-0"
        config = run_config(run)
        assert fields(config, *want) == want, key
        rows = [json.loads(line) for line in Path(config["data"]).read_text().splitlines()]
        assert all(("teacher_prompt" in r) == with_solution for r in rows), key
        if with_solution:  # the teacher's prompt holds the row's own worked solution, then the problem
            assert all(r["teacher_prompt"] == f"{r['prompt']}{r['completion']} {r['prompt']}" for r in rows)
        assert len(run_metrics(run)) == saved["args"]["steps"]
