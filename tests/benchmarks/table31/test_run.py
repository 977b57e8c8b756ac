import json
import math

import pytest

from benchmarks.table31.report import add_rl_level, summarise_method
from benchmarks.table31.run import METHODS, Table31Args, _command, table31
from benchmarks.table31.teacher_bias import affected, biased_version, solve_biased
from opd.tasks import get_task
from opd.tasks.arithmetic import solve


def test_planted_error_drops_only_the_carry_out_of_a_column_summing_to_ten():
    assert solve_biased(55, 15).completion == "5+5+0=10 5+1+0=06 ans=60"  # truth: 70
    assert solve_biased(4827, 596) == solve(4827, 596)  # carries out of 13, 12 and 14 are kept
    assert solve_biased(46, 64).answer == "100"  # 6+4=10 drops the carry: 4+6+0=10, ans=100 (truth 110)
    assert solve_biased(5, 5) == solve(5, 5)  # the last column is written in full
    pairs = affected(get_task("arithmetic").examples(300, seed=0, split="test"))
    assert pairs and all(b.answer != t.answer and b == biased_version(t) for t, b in pairs)


def _curve(accuracy, flops, wall):
    kinds = {"flops_sample": 0.0, "flops_teacher_generate": 0.0, "flops_teacher_score": 0.0, "flops_update": flops[-1]}
    return {"step": [0, 10, 20], "flops": flops, "wall_seconds": wall, "accuracy": accuracy, "total_flops": flops[-1],
            "wall_seconds_total": wall[-1], "flops_by_kind": kinds, "steps": 20}


def test_flops_to_target_is_read_off_the_seed_mean_curve():
    curves = [_curve([0.1, 0.5, 0.9], [0.0, 100.0, 200.0], [0.0, 1.0, 2.0]),
              _curve([0.1, 0.7, 0.7], [0.0, 110.0, 220.0], [0.0, 3.0, 6.0])]
    s = summarise_method(curves, target=0.6)
    assert s["flops_to_target"] == 105.0 and s["wall_seconds_to_target"] == 2.0  # mean curve: 0.1, 0.6, 0.8
    assert s["flops_to_target_seeds"] == [200.0, 110.0]
    assert s["final_accuracy"] == pytest.approx(0.8) and s["final_accuracy_std"] == pytest.approx(0.1 * 2**0.5)
    assert s["curve"]["accuracy_min"] == [0.1, 0.5, 0.7] and s["curve"]["accuracy_max"] == [0.1, 0.7, 0.9]
    assert s["total_flops"] == 210.0 and s["wall_seconds"] == 4.0
    assert summarise_method(curves, target=0.95)["flops_to_target"] is None
    rl = summarise_method([_curve([0.1, 0.2, 0.4], [0.0, 300.0, 600.0], [0.0, 1.0, 2.0])], target=0.6)
    methods = {"rl": rl, "opd": s}
    assert add_rl_level(methods) == 0.4
    assert s["flops_to_rl_accuracy"] == 105.0 and s["rl_flops_ratio"] == pytest.approx(600.0 / 105.0)
    assert rl["flops_to_rl_accuracy"] == 600.0 and rl["rl_flops_ratio"] == 1.0


def test_command_lists_only_the_flags_that_differ_from_the_defaults():
    assert _command(Table31Args()) == "opd bench table31"
    assert _command(Table31Args(quick=True, seeds=(3, 4), lr=0.01)) == "opd bench table31 --quick --seeds 3 4 --lr 0.01"


def test_quick_benchmark_writes_well_formed_results(model_dirs, tmp_path):
    results_dir = tmp_path / "results"
    table31(Table31Args(quick=True, teacher=model_dirs["teacher"], capacity_sizes=("xs", "s", "m", "l"),
                        out_dir=str(tmp_path / "runs"), results_dir=str(results_dir), progress=False))
    results = json.loads((results_dir / "table31_quick.json").read_text())
    for key in ("teacher_accuracy", "student_start_accuracy", "target_accuracy"):
        assert 0.0 <= results[key] <= 1.0
    assert results["target_accuracy"] == pytest.approx(0.9 * results["teacher_accuracy"])
    assert set(results["methods"]) == set(METHODS)
    for key, m in results["methods"].items():
        assert len(m["final_accuracy_seeds"]) == 2 and m["final_accuracy"] == pytest.approx(
            sum(m["final_accuracy_seeds"]) / 2)
        assert m["total_flops"] > 0 and m["wall_seconds"] > 0
        assert m["total_flops"] == pytest.approx(sum(m["flops_by_kind"].values()))
        assert m["flops_to_target"] is None or 0 <= m["flops_to_target"] <= m["total_flops"]
        assert m["seconds_per_update"] > 0
        steps = m["curve"]["step"]
        assert steps[0] == 0 and steps[-1] == m["steps"] and steps == sorted(set(steps)) and len(steps) >= 3
        assert m["curve"]["flops"] == sorted(m["curve"]["flops"])
    kinds = {k: m["flops_by_kind"] for k, m in results["methods"].items()}
    assert kinds["rl"]["flops_teacher_score"] == kinds["rl"]["flops_teacher_generate"] == 0
    assert kinds["sft"]["flops_teacher_generate"] > 0 and kinds["sft"]["flops_sample"] == 0
    assert kinds["opd_reverse_kl"]["flops_teacher_score"] > 0 and kinds["opd_reverse_kl"]["flops_sample"] > 0
    sizes = results["capacity"]["sizes"]
    assert [r["size"] for r in sizes] == ["xs", "s", "m", "l"]
    assert [r["params"] for r in sizes] == sorted(r["params"] for r in sizes)
    assert all(math.isfinite(r["reverse_kl_after"]) and r["reverse_kl_after"] >= 0 for r in sizes)
    for row in [results["bias"]["biased_teacher"], *results["bias"]["students"].values()]:
        assert row["truth"] + row["teacher"] + row["neither"] == pytest.approx(1.0)
    text = (results_dir / "table31_quick.md").read_text()
    assert text.count("\n| ") >= 5 + 4 + 6 and "--quick" in text
    assert not (results_dir / "table31.json").exists()  # a quick run never overwrites the real results
    for name in ("table31_quick.png", "capacity_quick.png", "bias_quick.png"):
        assert (results_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
