import json
import statistics
from pathlib import Path

from benchmarks.continual import forgetting as bench
from tests.benchmarks.run_helpers import fields


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
    # which arm each stage ran: stage A is SFT on reference completions, one run per seed; every later stage is
    # on-policy distillation from the task teacher, from the previous stage's model, which teaches the earlier
    # tasks' prompts in the arm with distillation only
    runs = section["runs"]
    assert len(runs["shared"]) == 2
    for seed, shared in enumerate(runs["shared"]):
        teacher = shared["teachers"]  # the task teacher alone: new=TEACHER
        assert (shared["source"], shared["loss"]) == ("data", "sft") and "," not in teacher
        for arm, keeps_old in (("without_distillation", False), ("with_distillation", True)):
            assert len(runs[arm][seed]) == len(bench.TASKS) - 1
            start = str(Path(shared["out_dir"]) / "checkpoint")
            for cfg in runs[arm][seed]:
                want = dict(student=start, teachers=f"{teacher},old={start}" if keeps_old else teacher,
                            teacher_column="teacher", source="student", loss="reverse_kl")
                assert fields(cfg, *want) == want, arm
                start = str(Path(cfg["out_dir"]) / "checkpoint")
    assert markdown.count("\n| with distillation |") == 3 and markdown.count("\n| without distillation |") == 3
    assert list(tmp_path.iterdir()) == []  # quick mode leaves nothing behind
    bench.plot(section, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
