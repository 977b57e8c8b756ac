import json
import math

import pytest

from benchmarks.scale import points, report
from benchmarks.scale.run import QUICK, ScaleArgs, command, scale
from benchmarks.scale.worker import STEP_SYSTEMS, SYSTEMS


def test_fit_exponent_recovers_the_power_of_a_power_law():
    xs = [256, 1024, 2048, 4096]
    assert report.fit_exponent(xs, [3 * x**2 for x in xs]) == pytest.approx(2.0)
    assert report.fit_exponent(xs, [5 * x**0.5 for x in xs]) == pytest.approx(0.5)
    assert report.fit_exponent(xs, [7.0] * 4) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="two distinct"):
        report.fit_exponent([1024, 1024], [1.0, 2.0])


def test_a_length_past_the_context_is_a_failed_row_not_a_run():
    point = points.spec("opd", {"student": "s", "teacher": "t"}, 8192, warmup=1, steps=2, threads=1)
    assert points.context_failure(point, 8192, 16) == "length 8192 exceeds context 8192"
    assert points.context_failure(point, 8192 + 16, 16) is None


def test_command_lists_only_the_flags_that_differ_from_the_defaults():
    assert command(ScaleArgs()) == "opd bench scale"
    assert command(ScaleArgs(quick=True, lr=0.01)) == "opd bench scale --quick --lr 0.01"


def test_a_point_over_the_memory_cap_or_crashing_becomes_a_failed_row(tmp_path):
    point = points.spec("opd", {"student": str(tmp_path / "no-such-model"), "teacher": str(tmp_path / "no-teacher")},
                        32, warmup=1, steps=1, threads=1)
    row = points.run_point(point, tmp_path, "cap", cap_mb=30, timeout_s=120, peak_gflops=1.0)
    assert row["failed"] == "out of memory under 0.0292969 GiB cap"
    row = points.run_point(point, tmp_path, "crash", cap_mb=8000, timeout_s=120, peak_gflops=1.0)
    assert "no-such-model" in row["failed"] and "Error" in row["failed"]  # the exception's own last line


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    results = scale(ScaleArgs(quick=True, out_dir=str(root / "runs"), results_dir=str(root / "results")))
    return results, root / "results"


def test_quick_run_writes_every_sweep_with_sane_rows(quick):
    results, out = quick
    assert json.loads((out / "scale_quick.json").read_text()) == json.loads(json.dumps(results))
    assert not (out / "scale.md").exists()  # a --quick run makes no section of RESULTS.md
    for sweep, key in (("length", "length"), ("vocab", "vocab"), ("model_size", "params")):
        assert results[sweep], sweep
        for row in results[sweep]:
            assert set(row) >= {"system", key, "peak_rss_mb", "tokens_per_s", "step_s", "teacher_s", "student_s",
                                "sampling_s", "mfu", "failed"} or row["failed"], row
            if row["failed"]:
                continue
            assert row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0 and 0 < row["mfu"] < 1, row
            if row["system"] != "opd_sampling":
                assert row["teacher_s"] > 0 and row["step_s"] == pytest.approx(row["teacher_s"] + row["student_s"])
                assert row["tokens_per_s"] == pytest.approx(row["completion_tokens"] / row["step_s"])
    assert {r["vocab"] for r in results["vocab"]} == {1024, 2048}
    assert all(r["params"] > 0 and r["teacher_params"] > r["params"] for r in results["model_size"])


def test_quick_run_has_opd_and_trl_at_each_length_and_every_system_somewhere(quick):
    results, _ = quick
    rows = results["length"]
    ran = {r["system"] for sweep in ("length", "vocab", "model_size") for r in results[sweep] if not r["failed"]}
    assert ran == set(SYSTEMS)
    for length in QUICK["lengths"]:
        mine = {r["system"]: r for r in rows if r["length"] == length}
        assert {"opd", "trl_distillation"} <= set(mine)
        if length > 4096:  # past the quick models' context: recorded, not run
            assert all(r["failed"] == f"length {length} exceeds context 4096" for r in mine.values())
            continue
        opd, trl = mine["opd"], mine["trl_distillation"]
        # the same fixed batch, and the same divergence from the same weights: the same first loss
        assert opd["completion_tokens"] == trl["completion_tokens"] == length
        assert opd["prompt_tokens"] == trl["prompt_tokens"]
        assert opd["losses"][0] == pytest.approx(trl["losses"][0], rel=1e-4)
    budget = next(r for r in rows if r["system"] == "opd_budget")
    assert budget["micro_batches"] == 2 and budget["completion_tokens"] == 2 * budget["length"]
    remote = [r for r in rows if r["system"] in ("opd_topk", "opd_hidden")]
    assert remote and all(r["peak_rss_mb"] == r["trainer_peak_rss_mb"] + r["server_peak_rss_mb"] for r in remote)
    assert set(results["exponents"]) == {"opd", "trl_distillation"}  # the only systems at two lengths
    assert set(results["goals"]) >= {"memory_vs_trl", "speed_vs_trl", "vocab_flat", "length_linear"}


def test_quick_results_render_as_a_section_and_plots(quick, tmp_path):
    results, _ = quick
    text = report.markdown(results)
    assert "| goal | measured | met? |" in text and "--quick" in text
    for system in STEP_SYSTEMS:
        assert f"| {report.SYSTEM_NAMES[system]} |" in text
    assert "exceeds context" in text and "Sampling alone" in text
    report.plot_length(results, tmp_path / "length.png")
    report.plot_vocab(results, tmp_path / "vocab.png")
    for name in ("length.png", "vocab.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert math.isfinite(results["goals"]["speed_vs_trl"]["value"])
