"""The interpretable-policies part of `opd bench robotics` in quick mode, down to `opd interpret` on its output."""

import json

from benchmarks.robotics import interpretable as robotics_interpretable
from opd.control.interpretable import describe, load_interpretable


def test_quick_interpretable_part_writes_sections_students_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path / "cache"))
    section, markdown = robotics_interpretable.run(quick=True, seeds=3, workers=1, out_dir=tmp_path)
    json.dumps(section)
    assert set(section) == {"cartpole", "acrobot"}
    for task, r in section.items():
        assert {"teacher_return", "tree_return", "linear_return", "formula_return", "tree_nodes", "formula_terms",
                "formula_text", "linear_params"} <= set(r)
        assert r["tree_nodes"] >= 1 and r["tree_nodes"] % 2 == 1  # a binary tree has an odd number of nodes
        env_id, students = load_interpretable(tmp_path / "robotics_interpretable" / task)
        assert env_id == r["env"] and set(students) == {"tree", "linear", "formula"}
        assert r["formula_text"] in describe(tmp_path / "robotics_interpretable" / task)
    assert "| CartPole-v1 |" in markdown and "| Acrobot-v1 |" in markdown
    assert (tmp_path / "robotics_interpretable.png").stat().st_size > 0
