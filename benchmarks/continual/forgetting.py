"""Catastrophic forgetting: three digit tasks learned one after another, with and without on-policy distillation from
the earlier model on the earlier tasks' prompts (`opd.lm.recipes.continual`).

A = reverse the digits, B = add one to every digit, C = sort the digits (`opd.tasks.digits`); prompts differ only in
the operation's word, so learning one operation pulls the old prompts towards it. Stage A is learned by SFT on its
reference completions from a randomly initialised student (nothing to forget yet; on-policy distillation from a random
model learns it far slower), once per seed. From its checkpoint two arms learn B, then C, each by on-policy
distillation (reverse KL on the student's own samples) from one teacher that knows all three tasks (SFT on reference
completions, larger than the student, trained once and cached), with the same updates and batch size per stage:

- without distillation: every prompt of a stage is the new task's;
- with distillation: half of a stage's prompts are the earlier tasks' training prompts, routed by the data's
  `teacher` column to the stage's starting checkpoint, frozen (`--teachers new=TEACHER,old=PREV`).

Held-out accuracy (greedy, exact answer) of A, B and C is measured after every stage. This part alone is `opd bench
continual --sections forgetting --merge`: its section goes into benchmarks/results/continual.{json,md}, its plot into
continual_forgetting.png; `--quick` is a plumbing check with meaningless numbers (continual_quick.{json,md}, no plot).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common.stats import sd
from opd.lm.recipes.continual import (ContinualConfig, evaluate_dir, init_student, run_sequence, run_stage,
    task_teacher)
from opd.lm.hf.model import library_bars
from opd.tasks.models import MODEL_SIZES

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "runs" / "bench-continual-forgetting"
TASKS = ("reverse", "shift", "sort")
LETTERS = "ABC"
ARMS = {"without_distillation": False, "with_distillation": True}

FULL = dict(teacher=dict(size="teacher", steps=1200, batch_size=64, lr=3e-3),
            student_size="student", stage=dict(steps=400, batch_size=32, lr=3e-3, first_source="data", first_lr=5e-3,
                                               train_examples=2000, eval_examples=200, old_fraction=0.5))
"""What the reported numbers use."""
QUICK = dict(teacher=dict(size="xs", steps=5, batch_size=8, lr=3e-3),
             student_size="xs", stage=dict(steps=2, batch_size=4, lr=3e-3, first_source="data", first_lr=5e-3,
                                           train_examples=40, eval_examples=8, old_fraction=0.5))
"""A plumbing check: seconds, meaningless numbers."""


def run(quick: bool, seeds: tuple[int, ...], out_dir: Path) -> tuple[dict, str]:
    """Both arms for every seed; returns the json section and its markdown table, and draws `plot` into
    out_dir/continual_forgetting.png (not with `quick`, which leaves nothing behind). The run directories go to
    runs/bench-continual-forgetting (a temporary directory with `quick`)."""
    settings = QUICK if quick else FULL
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, library_bars(False):
        torch.set_num_threads(1)
        runs = Path(tmp) if quick else RUNS
        # the quick teacher is trained in the temporary directory too, so a plumbing check leaves no cache behind
        teacher = task_teacher(TASKS, **settings["teacher"], cache_dir=Path(tmp) / "cache" if quick else None,
                               progress=False)
        teacher_info = json.loads((teacher / "info.json").read_text())
        # accuracy[arm][stage][task] -> one value per seed
        accuracy = {arm: [{t: [] for t in TASKS} for _ in TASKS] for arm in ARMS}
        # configs["shared"][seed]: stage A's run config; configs[arm][seed]: each later stage's (the json keeps them:
        # a quick run's directories are gone once it returns)
        configs = {"shared": [], **{arm: [] for arm in ARMS}}
        for seed in seeds:
            base = ContinualConfig(teacher=str(teacher), student="", tasks=TASKS, seed=seed, **settings["stage"])
            student = init_student(TASKS, runs / f"seed{seed}" / "start", settings["student_size"], seed=seed)
            # stage A has no earlier task: one run serves both arms
            first = replace(base, student=str(student), out_dir=str(runs / f"seed{seed}" / "shared"))
            checkpoint = run_stage(first, 0, str(student))
            configs["shared"].append(_config(checkpoint))
            after_a = evaluate_dir(checkpoint, TASKS, base.eval_examples, base.max_new_tokens)
            for arm, keep_old in ARMS.items():
                accuracy[arm][0] = {t: accuracy[arm][0][t] + [after_a[t]] for t in TASKS}
                result = run_sequence(replace(base, student=str(checkpoint), first_stage=1, keep_old=keep_old,
                                              out_dir=str(runs / f"seed{seed}" / arm)))
                for stage in result["stages"]:
                    for t in TASKS:
                        accuracy[arm][stage["stage"]][t].append(stage["accuracy"][t])
                configs[arm].append([_config(stage["checkpoint"]) for stage in result["stages"]])
            print(f"continual forgetting: seed {seed} done, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    section = dict(
        config=dict(tasks=dict(zip(LETTERS, TASKS)), seeds=list(seeds), updates_per_stage=settings["stage"]["steps"],
                    stage=settings["stage"], student_size=settings["student_size"],
                    student_model=MODEL_SIZES[settings["student_size"]], teacher=settings["teacher"],
                    teacher_model=MODEL_SIZES[settings["teacher"]["size"]], teacher_params=teacher_info["num_params"],
                    teacher_accuracy=teacher_info["test_accuracy"],
                    learning="A: SFT on reference completions; B, C: on-policy distillation (reverse KL) from the "
                    "multi-task teacher", quick=quick),
        **{arm: _arm_section(accuracy[arm]) for arm in ARMS},
        wall_s=round(time.perf_counter() - start, 1),
        runs=configs,
    )
    if not quick:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        plot(section, Path(out_dir) / "continual_forgetting.png")
    return section, table(section)


def _config(checkpoint) -> dict:
    """The config a stage's run wrote next to its checkpoint."""
    return json.loads((Path(checkpoint).parent / "config.json").read_text())


def _arm_section(accuracy: list[dict[str, list[float]]]) -> dict:
    """The matrix (per stage, per task, per seed) and its summaries; `task_a` is A's accuracy after the last stage."""
    last = accuracy[-1]
    return dict(
        task_a=statistics.mean(last[TASKS[0]]),
        task_a_sd=sd(last[TASKS[0]]),
        final={t: statistics.mean(v) for t, v in last.items()},
        matrix=[dict(stage=i, learned=TASKS[i], accuracy=acc) for i, acc in enumerate(accuracy)],
    )


def plot(section: dict, path: Path) -> None:
    """One panel per arm: each task's held-out accuracy after each stage (mean over seeds, bars from min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = section["config"]["tasks"]
    fig, axes = plt.subplots(1, len(ARMS), figsize=(11, 4), sharey=True)
    for ax, arm in zip(axes, ARMS):
        matrix = section[arm]["matrix"]
        x = list(range(len(matrix)))
        for letter, task in names.items():
            values = [row["accuracy"][task] for row in matrix]
            mean = [statistics.mean(v) for v in values]
            err = [[m - min(v) for m, v in zip(mean, values)], [max(v) - m for m, v in zip(mean, values)]]
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=f"{letter}: {task}")
        ax.set_xticks(x, [f"after {LETTERS[row['stage']]}" for row in matrix])
        ax.set_title(arm.replace("_", " "))
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(section: dict) -> str:
    """Markdown: for each arm, every task's held-out accuracy (mean ± sd over seeds) after each stage."""
    names = section["config"]["tasks"]
    seeds = len(section["config"]["seeds"])
    lines = [f"Held-out accuracy after each stage (greedy, exact answer; mean ± sd over {seeds} seeds, "
             f"{section['config']['updates_per_stage']} updates per stage). Stage A is shared by both arms.", "",
             "| arm | after learning | " + " | ".join(f"{k}: {v}" for k, v in names.items()) + " |",
             "|---|---|" + "---|" * len(names)]
    for arm in ARMS:
        for row in section[arm]["matrix"]:
            cells = [f"{statistics.mean(v):.3f} ± {sd(v):.3f}" for v in row["accuracy"].values()]
            letter = LETTERS[row["stage"]]
            lines.append(f"| {arm.replace('_', ' ')} | {letter} ({row['learned']}) | " + " | ".join(cells) + " |")
    teacher = ", ".join(f"{k} {v:.3f}" for k, v in section["config"]["teacher_accuracy"].items())
    lines += ["", f"Teacher ({section['config']['teacher_params']:,} parameters) held-out accuracy: {teacher}. "
              f"Wall time {section['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"
