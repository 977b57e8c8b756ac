"""The RPD part of `opd bench robotics` in quick mode: every number and file the report reads is there."""

import json

from benchmarks.robotics import rpd as robotics_rpd


def test_quick_rpd_part_writes_its_section_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path / "cache"))  # the quick teacher is trained here, not in the cache
    section, markdown = robotics_rpd.run(quick=True, seeds=3, workers=1, out_dir=tmp_path)
    json.dumps(section)
    assert {"rpd_final", "ppo_final", "teacher", "rpd_curve", "ppo_curve", "steps_to_teacher"} <= set(section)
    assert section["rpd_final"] == section["rpd_final_per_seed"][0] and len(section["ppo_final_per_seed"]) == 1
    assert section["curve_steps"][0] == 0 and len(section["rpd_curve"]) == len(section["curve_steps"])
    lam = section["runs"]["rpd"][0]["lambda"]
    assert lam[0] == 1.0 and lam[-1] == 0.0 and all(v == 0.0 for v in section["runs"]["ppo"][0]["lambda"])
    assert robotics_rpd.steps_to_reach([0, 10, 20], [5.0, 50.0, 70.0], 40.0) == 10
    assert robotics_rpd.steps_to_reach([0, 10], [5.0, 6.0], 40.0) is None
    assert "| RPD |" in markdown and "| PPO from scratch |" in markdown and "(benchmarks/results/robotics_rpd.png)" in markdown
    assert (tmp_path / "robotics_rpd.png").stat().st_size > 0
    assert list((tmp_path / "cache" / "teachers").glob("InvertedPendulum-v5-ppo-256-s0.zip"))
