"""The reliability benchmark's quick run holds every property it checks, and the checkpoint bugs it found stay fixed."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.reliability.run import ReliabilityArgs, _command, reliability
from opd.checkpoint import find_checkpoint, save_checkpoint
from opd.config import DistillConfig, SamplingArgs
from opd.lm.loop import run_dir as run_dir_module
from opd.lm.train import distill


def test_command_lists_only_the_flags_that_differ_from_the_defaults():
    assert _command(ReliabilityArgs()) == "opd bench reliability"
    assert _command(ReliabilityArgs(quick=True, kills=5, progress=False)) == (
        "opd bench reliability --quick --kills 5 --no-progress")


def test_quick_benchmark_holds_every_property_and_writes_well_formed_results(tmp_path):
    results_dir = tmp_path / "results"
    reliability(ReliabilityArgs(quick=True, work_dir=str(tmp_path / "work"), results_dir=str(results_dir),
                                progress=False))
    r = json.loads((results_dir / "reliability.json").read_text())
    assert r["quick"] and r["all_passed"] and isinstance(r["code_changed_during_run"], list)
    assert set(r["phase_s"]) == {"kill_resume", "fuzz", "load", "teacher_kill"} and len(r["load_average"]) == 2

    k = r["kill_resume"]
    assert k["kills"] == len(k["records"]) == 3 and all(rec["killed"] for rec in k["records"])
    assert k["resume_failures"] == k["corrupt_checkpoints"] == k["checkpoint_step_went_back"] == 0
    assert k["tmp_dirs_left_at_end"] == 0
    for rec in k["records"]:  # each kill left either no checkpoint yet or one that loads in full
        assert (rec["checkpoint_step"] is None) == (rec["checkpoint_loadable"] is None)
        assert rec["checkpoint_loadable"] in (None, True), rec
    assert k["checkpoint_steps_at_kills"] == sorted(k["checkpoint_steps_at_kills"])
    c = k["comparison"]
    assert c["weights_bit_exact"] and c["optimizer_bit_exact"] and c["metrics_match"]
    assert c["max_abs_weight_diff"] == 0.0 and c["final_step"] == k["steps"] == 5 * 3 + 5

    f = r["fuzz"]
    assert f["cases"] == 300 == sum(f["status_counts"].values()) == sum(f["family_counts"].values())
    assert f["failures"] == f["server_errors_5xx"] == f["no_answer"] == 0 and f["first_failures"] == []
    assert all(s == "200" or 400 <= int(s) < 500 for s in f["status_counts"])
    assert 0 < f["must_fail"] <= sum(n for s, n in f["status_counts"].items() if s != "200")
    assert f["server_alive"] and f["server_log_errors"] == [] and f["weights_version_after"] == 0

    ld = r["load"]
    assert ld["clients"] == 32 and ld["requests"] > 0 and ld["errors"] == 0 and ld["first_errors"] == []
    assert ld["by_kind"]["score"]["requests"] + ld["by_kind"]["generate"]["requests"] == ld["requests"]
    assert ld["latency"]["p50_ms"] <= ld["latency"]["p99_ms"]
    assert ld["tokens_per_s"] == pytest.approx(ld["scored_tokens_per_s"] + ld["generated_tokens_per_s"], abs=0.2)
    assert ld["server_alive"] and ld["server_log_errors"] == []

    t = r["teacher_kill"]
    assert t["server_killed_mid_run"] and t["exit_code"] == 2 and t["message_is_one_line"]
    assert t["message"].startswith("opd: error: http://127.0.0.1:")
    assert "did not answer after 2 attempts" in t["message"]  # --quick: --remote-max-retries 1
    assert f"checkpoint at step {t['steps_logged_at_kill']} " in t["message"] and t["message"].endswith("--resume")
    assert t["checkpoint"]["step"] == t["steps_logged_at_kill"] and t["checkpoint"]["loadable"]
    tc = t["comparison"]
    assert tc["weights_bit_exact"] and tc["optimizer_bit_exact"] and tc["metrics_match"] and tc["final_step"] == 12

    text = (results_dir / "reliability.md").read_text()
    assert text.startswith("## Reliability") and "--quick" in text and text.count("\n| ") == 7
    assert "All properties held: yes." in text and "**NO**" not in text


class _Died(BaseException):
    """Stands for SIGKILL: nothing catches it, nothing after it runs."""


def _cfg(dirs, out: Path, **kw) -> DistillConfig:
    return DistillConfig(student=dirs["student"], teacher=dirs["teacher"], batch_size=4, train_examples=64,
                         eval_examples=4, eval_every=0, save_every=1, sampling=SamplingArgs(max_new_tokens=8),
                         out_dir=str(out), progress=False, **kw)


def test_a_run_dying_right_after_a_checkpoint_swap_resumes_bit_for_bit(model_dirs, tmp_path, monkeypatch):
    # The loop's RNG state used to be written into the checkpoint after it was swapped in: a death in between left
    # a visible checkpoint without loop_rng.pt, and --resume failed on it.
    distill(_cfg(model_dirs, tmp_path / "straight", steps=3))
    real_save, calls = run_dir_module.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        path = real_save(*args, **kwargs)
        calls.append(path)
        if len(calls) == 2:
            raise _Died
        return path

    monkeypatch.setattr(run_dir_module, "save_checkpoint", save_then_die)
    with pytest.raises(_Died):
        distill(_cfg(model_dirs, tmp_path / "killed", steps=3))
    monkeypatch.undo()
    found = find_checkpoint(tmp_path / "killed" / "checkpoint")
    assert json.loads((found / "trainer_state.json").read_text())["step"] == 2 and (found / "loop_rng.pt").is_file()
    distill(_cfg(model_dirs, tmp_path / "killed", steps=3, resume=True))
    a = load_file(tmp_path / "straight" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_save_removes_temporary_directories_of_writers_that_died(model_dirs, tmp_path):
    from opd.lm.hf.model import load_model

    stale = [tmp_path / ".checkpoint.tmp-4242", tmp_path / ".checkpoint.tmp-77"]
    for d in stale:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half a file")
    keep = tmp_path / ".other.tmp-1"
    keep.mkdir()
    save_checkpoint(tmp_path / "checkpoint", load_model(model_dirs["student"]), None, step=1)
    assert not any(d.exists() for d in stale) and keep.is_dir()
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 1
