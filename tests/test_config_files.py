"""`opd train --config FILE`: YAML or JSON settings that flags override; a run's config.json re-runs it exactly; every
shipped recipe in configs/recipes parses."""

import json
from pathlib import Path

import pytest

import opd.lm.train
from opd.cli import load_config, main
from opd.config import DistillConfig
from opd.config_notes import unused_flags

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_into_a_config_that_uses_all_its_settings(recipe):
    cfg = load_config(str(recipe))
    assert isinstance(cfg, DistillConfig)
    assert not unused_flags(cfg), unused_flags(cfg)


def test_the_recipes_cover_opd_gkd_lora_and_several_teachers():
    assert len(RECIPES) >= 4
    cfgs = [load_config(str(r)) for r in RECIPES]
    assert any(c.source == "mixture" and c.loss == "jsd" for c in cfgs)   # GKD
    assert any(c.lora.r > 0 for c in cfgs)
    assert any(c.teachers and c.teacher_column for c in cfgs)
    assert any(c.source == "student" and c.data and c.checker for c in cfgs)


@pytest.fixture
def captured(monkeypatch):
    """The DistillConfig `opd train` would run, without running it."""
    got = []
    monkeypatch.setattr(opd.lm.train, "distill", lambda cfg: got.append(cfg) or {})
    return got


def test_flags_override_the_file(tmp_path, captured):
    path = tmp_path / "run.yaml"
    path.write_text("student: s\nteacher: t\nsteps: 7\noptim:\n  lr: 1e-4\n  warmup_steps: 3\n"
                    "lora:\n  r: 8\n  target_modules: [q_proj, v_proj]\n")
    main(["train", "--config", str(path), "--steps", "9", "--optim.warmup-steps", "0", "--out-dir", str(tmp_path / "o")])
    (cfg,) = captured
    assert (cfg.student, cfg.teacher, cfg.steps, cfg.out_dir) == ("s", "t", 9, str(tmp_path / "o"))
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (1e-4, 0)  # YAML's `1e-4` is a string to PyYAML: read as float
    assert (cfg.lora.r, cfg.lora.target_modules) == (8, ("q_proj", "v_proj"))
    assert cfg.batch_size == DistillConfig(student="s").batch_size  # what neither sets keeps its default


@pytest.mark.parametrize("text, message", [
    ("student: s\nstepz: 3\n", "unknown setting 'stepz'"),
    ("student: s\noptim:\n  learning_rate: 0.1\n", "unknown setting 'optim.learning_rate'"),
    ("student: s\nsteps: three\n", "steps must be int, not 'three'"),
    ("student: s\nsteps: 2.5\n", "steps must be int, not 2.5"),
    ("student: s\nprogress: 1\n", "progress must be bool, not 1"),
    ("student: s\nsampling:\n  temperature: hot\n", "sampling.temperature must be float, not 'hot'"),
    ("student: s\nsource: teachers\n", "source must be 'student' or 'teacher'"),
    ("student: s\nsteps: 0\n", "--steps must be >= 1"),
    ("teacher: t\n", "has no 'student'"),
    ("student: [s\n", "is not valid YAML"),
    ("- student\n", "must hold a mapping"),
])
def test_a_bad_file_is_one_line_naming_the_setting(tmp_path, capsys, captured, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and message in err, err
    assert not captured


def test_a_missing_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(tmp_path / "nope.json")])
    assert info.value.code == 2 and "nope.json: no such file" in capsys.readouterr().err


def test_a_runs_config_json_reruns_it_exactly(model_dirs, tmp_path):
    main(["train", "--student", model_dirs["student"], "--teacher", model_dirs["teacher"], "--steps", "2",
          "--batch-size", "2", "--train-examples", "8", "--eval-examples", "2", "--eval-every", "0",
          "--sampling.max-new-tokens", "4", "--optim.warmup-steps", "0", "--optim.lr", "0.01", "--loss", "jsd",
          "--no-progress", "--out-dir", str(tmp_path / "first")])
    main(["train", "--config", str(tmp_path / "first" / "config.json"), "--out-dir", str(tmp_path / "again")])

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses("first")) == 2 and losses("again") == losses("first")
    saved = [json.loads((tmp_path / run / "config.json").read_text()) for run in ("first", "again")]
    assert saved[1].pop("out_dir") != saved[0].pop("out_dir") and saved[1] == saved[0]
