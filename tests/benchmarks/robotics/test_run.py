"""The robotics benchmark's driver: runs the parts asked for, merges into one robotics.json, rejects unknown parts."""

import json

import pytest
import torch

from benchmarks.robotics import run as bench

torch.set_num_threads(1)


def test_driver_writes_the_parts_run_and_keeps_the_others_with_merge(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    (out).mkdir()
    (out / "robotics.json").write_text(json.dumps({"rpd": {"rpd_final": 1.0, "ppo_final": 2.0, "teacher": 3.0}}))
    data = bench.robotics_bench_main(bench.RoboticsBenchArgs(quick=True, seeds=1, workers=1, out_dir=str(out),
                                                             sections=("interpretable",), merge=True))
    saved = json.loads((out / "robotics.json").read_text())
    assert saved == json.loads(json.dumps(data))
    assert saved["rpd"] == {"rpd_final": 1.0, "ppo_final": 2.0, "teacher": 3.0}  # kept, not rerun
    cartpole = saved["interpretable"]["cartpole"]
    assert {"teacher_return", "tree_return", "linear_return", "formula_return", "tree_nodes"} <= set(cartpole)
    assert saved["interpretable"]["wall_seconds"] > 0 and saved["meta"]["args"]["quick"] is True
    assert "### Interpretable" in (out / "robotics.md").read_text()


def test_unknown_section_is_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="unknown --sections \\['arm'\\]; choose from sim_to_real"):
        bench.robotics_bench_main(bench.RoboticsBenchArgs(out_dir=str(tmp_path), sections=("arm",)))
