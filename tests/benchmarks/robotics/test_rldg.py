import json

from benchmarks.robotics import rldg as robotics_rldg
from opd.control.rldg import SUBTASKS


def test_quick_rldg_writes_every_promised_number(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path / "cache"))
    section, markdown = robotics_rldg.run(quick=True, seeds=3, workers=1, out_dir=tmp_path)
    section = json.loads(json.dumps(section))
    names = {t.name for t in SUBTASKS}
    for key in ("rl_expert_data", "human_demo"):
        assert 0.0 <= section[f"{key}_success"] <= 1.0 and 0.0 <= section[f"{key}_heldout_success"] <= 1.0
        assert set(section[f"{key}_per_subtask"]) == names
        assert section[f"{key}_dataset"]["episodes"] == len(SUBTASKS)  # one kept episode per sub-task in quick mode
        assert section[f"{key}_dataset"]["transitions"] == 50 * len(SUBTASKS)  # Reacher episodes last 50 steps
        assert set(section[f"{key}_success_at"]) == {"1cm", "2cm", "3cm"}
        at = section[f"{key}_success_at"]
        assert at["1cm"] <= at["2cm"] <= at["3cm"]  # a looser threshold never succeeds less
    # both generalists see data sets of the same size
    assert section["rl_expert_data_dataset"]["transitions"] == section["human_demo_dataset"]["transitions"]
    assert [e["subtask"] for e in section["experts"]] == [t.name for t in SUBTASKS]
    assert "| human-like demos |" in markdown and "benchmarks/results/robotics_rldg.png" in markdown
    assert (tmp_path / "robotics_rldg.png").stat().st_size > 0
