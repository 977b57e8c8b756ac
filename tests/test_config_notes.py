"""`opd.config_notes`: what a run warns about when it starts or resumes."""

from opd.config import DistillConfig, OptimArgs, to_dict
from opd.config_notes import config_changes, schedule_notes, unused_flags


def test_a_resume_names_each_changed_setting_once():
    cfg = DistillConfig(student="s", teacher="t", optim=OptimArgs(lr=2e-3), steps=300)
    saved = to_dict(DistillConfig(student="s", teacher="t", steps=200, progress=False))
    assert config_changes(saved, cfg) == ["steps 200 -> 300", "optim.lr 0.001 -> 0.002"]


def test_a_config_json_from_before_several_trackers_reads_as_the_same_setting():
    """--report-to took one name (or "none") before it took several: resuming such a run changed nothing."""
    cfg = DistillConfig(student="s", teacher="t")
    saved = to_dict(cfg)
    saved["report_to"] = "none"
    assert config_changes(saved, cfg) == []
    saved["report_to"] = "tensorboard"
    assert config_changes(saved, cfg) == ["report_to ['tensorboard'] -> []"]
    assert config_changes(saved, DistillConfig(student="s", teacher="t", report_to=("tensorboard",))) == []


def test_a_warm_up_longer_than_the_run_is_named():
    assert schedule_notes(DistillConfig(student="s", teacher="t", steps=5))[0].startswith(
        "--optim.warmup-steps 10 is longer than the run (--steps 5)")
    assert schedule_notes(DistillConfig(student="s", teacher="t", steps=10)) == []


def test_max_turns_without_tools_is_named_as_doing_nothing():
    assert unused_flags(DistillConfig(student="s", teacher="t", max_turns=3)) == [
        "--max-turns does nothing here: only --tools reads it"]
    assert unused_flags(DistillConfig(student="s", teacher="t", tools="calc", max_turns=3)) == []
