import json
import statistics

from benchmarks.continual import forgetting as bench


def test_quick_run_fills_both_arms_matrix_per_stage_task_and_seed(tmp_path):
    section, markdown = bench.run(quick=True, seeds=(0, 1), out_dir=tmp_path)
    assert json.loads(json.dumps(section)) == section
    assert set(section["config"]["tasks"].values()) == set(bench.TASKS) and section["config"]["quick"]
    assert section["config"]["updates_per_stage"] == bench.QUICK["stage"]["steps"]
    for arm in ("with_distillation", "without_distillation"):
        matrix = section[arm]["matrix"]
        assert [row["learned"] for row in matrix] == list(bench.TASKS)
        for row in matrix:
            assert set(row["accuracy"]) == set(bench.TASKS)
            assert all(len(v) == 2 and all(0.0 <= a <= 1.0 for a in v) for v in row["accuracy"].values())
        assert section[arm]["task_a"] == statistics.mean(matrix[-1]["accuracy"]["reverse"])
    # stage A is one run per seed, shared by both arms
    assert section["with_distillation"]["matrix"][0] == section["without_distillation"]["matrix"][0]
    assert markdown.count("\n| with distillation |") == 3 and markdown.count("\n| without distillation |") == 3
    assert list(tmp_path.iterdir()) == []  # quick mode leaves nothing behind
    bench.plot(section, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
