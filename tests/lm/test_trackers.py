"""--report-to: TensorBoard, wandb (offline) and trackio get each step's metrics, as metrics.jsonl has them, and the
config once; several at once; bad names, a tracker not installed and old config.json files."""

import json
import struct
import time
from pathlib import Path

import pytest

from opd.cli import load_config, main
from opd.config import DistillConfig, SamplingArgs, to_dict
from opd.lm.loop import process
from opd.lm.loop.run_dir import flat_config
from opd.lm.train import distill


def cfg(dirs, tmp_path, **kw):
    return DistillConfig(**{**dict(student=dirs["student"], teacher=dirs["teacher"], steps=2, batch_size=4,
                                   eval_examples=4, eval_every=0, sampling=SamplingArgs(max_new_tokens=8),
                                   out_dir=str(tmp_path / "run"), progress=False), **kw})


def metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def numbers(m):
    """What a tracker gets of a metrics.jsonl row (`RunDir.log`)."""
    return {k: v for k, v in m.items() if isinstance(v, (int, float))}


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb without an account or network, writing nothing outside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    for var in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)


def wandb_records(path: Path):
    """The records of an offline run's .wandb file (there is no reader for them offline): a 7-byte file header, then
    32 KiB blocks of chunks, each a 7-byte header (CRC, length, kind: 1 whole, 2 first, 3 middle, 4 last piece) and
    a piece of one serialized protobuf Record; a block's last < 7 bytes are padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            yield Record.FromString(pending)
            pending = b""


def wandb_run(wandb_dir: Path, file: Path | None = None) -> dict:
    """One offline run under `wandb_dir` (or its `file`): its project, name and id, logged rows by step (wandb's own
    `_` keys left out) and its config records (each a dict)."""
    if file is None:
        [file] = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    run, rows, configs = {}, {}, []
    for r in wandb_records(file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = {"project": r.run.project, "name": r.run.display_name, "id": r.run.run_id}
        elif kind == "history":
            items = {(i.key or i.nested_key[0]): json.loads(i.value_json) for i in r.history.item}
            rows[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind == "config":
            configs.append({u.key: json.loads(u.value_json) for u in r.config.update})
    return {**run, "rows": rows, "configs": configs}


def tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()  # the hparams sit in sub-directories


def test_tensorboard_gets_the_metrics(model_dirs, tmp_path):
    distill(cfg(model_dirs, tmp_path, report_to=("tensorboard",)))
    scalars = tensorboard_scalars(tmp_path)
    losses = scalars.Scalars("loss")
    assert [e.step for e in losses] == [m["step"] for m in metrics(tmp_path)] == [1, 2]
    assert [e.value for e in losses] == pytest.approx([m["loss"] for m in metrics(tmp_path)], rel=1e-6)  # float32
    assert [e.step for e in scalars.Scalars("lr")] == [1, 2]


def test_a_wandb_offline_run_holds_every_metric_of_every_step_and_the_config_once(model_dirs, tmp_path,
                                                                                  wandb_offline):
    run_cfg = cfg(model_dirs, tmp_path, report_to=("wandb",))
    distill(run_cfg)
    run = wandb_run(tmp_path / "run")  # no WANDB_DIR: the run's files stay in its directory
    assert (run["project"], run["name"]) == ("opd", "run")
    assert run["rows"] == {m["step"]: numbers(m) for m in metrics(tmp_path)} and list(run["rows"]) == [1, 2]
    ours = [c for c in run["configs"] if "student" in c]  # wandb.init writes its own (_wandb) config records
    want = flat_config(to_dict(run_cfg))
    assert len(ours) == 1 and {k: ours[0].get(k) for k in want} == want


def test_resume_goes_on_logging_to_the_same_wandb_run_and_a_new_run_starts_a_new_one(model_dirs, tmp_path,
                                                                                       wandb_offline):
    distill(cfg(model_dirs, tmp_path, report_to=("wandb",)))
    first = wandb_run(tmp_path / "run")
    assert (tmp_path / "run" / "wandb_run_id").read_text() == first["id"] + "\n" and list(first["rows"]) == [1, 2]
    time.sleep(1.1)  # wandb names an offline run's directory by its start, to the second, and its id
    distill(cfg(model_dirs, tmp_path, report_to=("wandb",), steps=4, resume=True))
    runs = [wandb_run(tmp_path / "run", f) for f in (tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb")]
    assert sorted(list(r["rows"]) for r in runs) == [[1, 2], [3, 4]] and {r["id"] for r in runs} == {first["id"]}
    distill(cfg(model_dirs, tmp_path / "fresh", report_to=("wandb",)))  # another directory: a run of its own
    assert wandb_run(tmp_path / "fresh" / "run")["id"] != first["id"]


def test_two_trackers_at_once_both_get_the_metrics(model_dirs, tmp_path, wandb_offline, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    distill(cfg(model_dirs, tmp_path, report_to=("wandb", "tensorboard")))
    losses = [m["loss"] for m in metrics(tmp_path)]
    run = wandb_run(tmp_path / "elsewhere")  # the user's WANDB_DIR and WANDB_PROJECT win
    assert run["project"] == "mine" and [run["rows"][s]["loss"] for s in (1, 2)] == losses
    assert [e.value for e in tensorboard_scalars(tmp_path).Scalars("loss")] == pytest.approx(losses, rel=1e-6)
    assert not (tmp_path / "run" / "wandb").exists()


def test_bad_tracker_names_are_one_line_naming_the_choices(model_dirs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--student", model_dirs["student"], "--report-to", "wandb", "bogus",
              "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("opd: error: unknown tracker 'bogus' in --report-to; choose from tensorboard, trackio, wandb")
    with pytest.raises(ValueError, match="--report-to names wandb twice"):
        cfg(model_dirs, tmp_path, report_to=("wandb", "wandb"))
    assert not (tmp_path / "run").exists()


def test_a_tracker_not_installed_is_one_line_saying_what_to_install(model_dirs, tmp_path, monkeypatch):
    real = process.importlib.util.find_spec
    monkeypatch.setattr(process.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"^--report-to wandb needs the wandb package: pip install 'opd\[tracking\]'$"):
        process.trackers(cfg(model_dirs, tmp_path, report_to=("tensorboard", "wandb")))
    assert len(process.trackers(cfg(model_dirs, tmp_path, report_to=("tensorboard",)))) == 1


@pytest.mark.parametrize("saved,want", [("none", ()), ("tensorboard", ("tensorboard",)),
                                        (["wandb", "tensorboard"], ("wandb", "tensorboard"))])
def test_config_files_from_before_several_trackers_still_read(model_dirs, tmp_path, saved, want):
    # a run's config.json held one name, or "none"; so did Python code (report_to="tensorboard")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**to_dict(cfg(model_dirs, tmp_path)), "report_to": saved}))
    assert load_config(str(path)).report_to == want
    assert cfg(model_dirs, tmp_path, report_to=saved).report_to == want


@pytest.mark.slow  # a child process imports trackio
def test_trackio_gets_the_metrics(model_dirs, tmp_path):
    import sqlite3
    import subprocess
    import sys

    # trackio reads its directory when imported: a child process with TRACKIO_DIR set keeps it off ~/.cache
    script = (f"from opd.config import DistillConfig, SamplingArgs; from opd.lm.train import distill; "
              f"distill(DistillConfig(student={model_dirs['student']!r}, teacher={model_dirs['teacher']!r}, steps=2, "
              f"batch_size=2, eval_examples=2, sampling=SamplingArgs(max_new_tokens=4), "
              f"out_dir={str(tmp_path / 'run')!r}, progress=False, report_to=('trackio',)))")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                   env={**__import__("os").environ, "TRACKIO_DIR": str(tmp_path / "trackio")})
    rows = sqlite3.connect(tmp_path / "trackio" / "run.db").execute("select step, metrics from metrics").fetchall()
    assert [step for step, _ in rows] == [1, 2] and all(b'"loss"' in m for _, m in rows)
