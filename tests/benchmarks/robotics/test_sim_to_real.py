import json

import numpy as np

from benchmarks.robotics import sim_to_real as robotics_sim_to_real


def test_quick_sim_to_real_writes_every_promised_number(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE", str(tmp_path / "cache"))
    section, markdown = robotics_sim_to_real.run(quick=True, seeds=3, workers=1, out_dir=tmp_path)
    section = json.loads(json.dumps(section))  # what robotics.json will hold
    for key in ("student", "bc", "rl_student_obs", "teacher"):
        assert np.isfinite(section[f"{key}_shifted"]) and np.isfinite(section[f"{key}_nominal"])
        assert len(section[f"{key}_shifted_per_seed"]) == 1  # quick mode runs one seed
    shifts = set(robotics_sim_to_real.SHIFTS)
    assert all(set(section["per_shift"][m]) == shifts for m in robotics_sim_to_real.METHODS)
    shifted = [section["per_shift"]["student"][n] for n in shifts - {"nominal"}]
    assert section["student_shifted"] == np.mean(shifted)  # the headline is the mean over shifts, nominal excluded
    assert section["labels"] == 2 * 20 * 4  # iterations × steps × envs
    # which method each student ran: DAgger hands the acting over to the student (exponential β), BC never does
    (run,) = section["runs"]
    assert run["bc_beta"] == [1.0, 1.0] and run["dagger_beta"] == [1.0, 0.5]
    assert "| DAgger student |" in markdown and "benchmarks/results/robotics_sim_to_real.png" in markdown
    assert (tmp_path / "robotics_sim_to_real.png").stat().st_size > 0
    assert list((tmp_path / "cache" / "teachers").glob("pendulum-privileged-*.zip"))  # teachers are cached
