"""Robotics part 18: interpretable policies distilled from RL teachers (VIPER tree, linear policy, short formula).

Teachers: SB3 PPO on CartPole-v1 and Acrobot-v1 (cached under $OPD_CACHE/teachers). Each student kind runs VIPER's
loop (`opd.control.interpretable.distill_interpretable`): DAgger, states weighted by the teacher's log-prob gap,
best student of the iterations on validation episodes; a tree without the weights (plain DAgger) is the ablation.
Reported: greedy return on held-out episodes against the teacher's, and the size of each student. The seed-0 students
are saved under `robotics_interpretable/<task>/` for `opd interpret --policy DIR`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.common.jobs import one_thread, pool_for

TASKS = {"cartpole": ("CartPole-v1", 50_000), "acrobot": ("Acrobot-v1", 100_000)}
"""json key → (gymnasium id, PPO teacher steps)."""
KINDS = ("tree", "tree_unweighted", "linear", "formula")


def _settings(quick: bool) -> dict:
    if quick:
        return dict(iterations=2, steps_per_iteration=20, select_episodes=1, test_episodes=1,
                    resample=500)  # fmt: skip
    return dict(iterations=8, steps_per_iteration=250, select_episodes=10, test_episodes=30,
                resample=20_000)  # fmt: skip


def _teacher(task: str, quick: bool):
    from opd.control.teachers import TeacherConfig, train_teacher

    env_id, steps = TASKS[task]
    if quick:  # an untrained PPO network: the pipeline runs in seconds, the numbers mean nothing
        from stable_baselines3 import PPO

        return PPO("MlpPolicy", env_id, seed=0, device="cpu")
    return train_teacher(TeacherConfig(env_id, "ppo", steps, 0), progress=False)


def job_teacher(task: str, quick: bool) -> float:
    """Train (or load) the task's teacher; its greedy return on the test episodes."""
    from opd.control.envs import evaluate
    from opd.control.teachers import as_teacher

    one_thread()
    env_id = TASKS[task][0]
    return float(evaluate(as_teacher(_teacher(task, quick)).act, env_id, _settings(quick)["test_episodes"],
                          seed=50_000).mean())  # fmt: skip


def job_student(task: str, kind: str, seed: int, quick: bool) -> dict:
    """One student of `kind` distilled from the task's teacher: its test return, size and the student itself."""
    from opd.control.envs import evaluate
    from opd.control.interpretable import InterpretConfig, distill_interpretable

    one_thread()
    s = _settings(quick)
    config = InterpretConfig(env_id=TASKS[task][0], kind="tree" if kind == "tree_unweighted" else kind,
                             weighted=kind != "tree_unweighted", iterations=s["iterations"],
                             steps_per_iteration=s["steps_per_iteration"], select_episodes=s["select_episodes"],
                             resample=s["resample"], seed=seed)  # fmt: skip
    result = distill_interpretable(_teacher(task, quick), config)
    returns = evaluate(result.student.act, config.env_id, s["test_episodes"], seed=50_000)
    return {"return": float(returns.mean()), "size": result.student.size(), "best_iteration": result.best_iteration,
            "history": result.history, "student": result.student}  # fmt: skip


def run(quick: bool, seeds: int, workers: int, out_dir: Path) -> tuple[dict, str]:
    """Teacher vs tree / linear / formula on CartPole and Acrobot: json section, markdown, plot."""
    from dataclasses import asdict

    from opd.control.envs import env_shapes
    from opd.control.interpretable import names, save_interpretable

    seeds = 1 if quick else seeds
    with pool_for(workers) as pool:
        teachers = {t: pool.submit(job_teacher, t, quick).result() for t in TASKS}  # cached before the students run
        futures = {(t, k, s): pool.submit(job_student, t, k, s, quick)
                   for t in TASKS for k in KINDS for s in range(seeds)}
        runs = {key: f.result() for key, f in futures.items()}
    section = {}
    for task, (env_id, _) in TASKS.items():
        (obs_dim,), num_actions = env_shapes(env_id)
        features, actions = names(env_id, obs_dim, num_actions)
        per = {k: [runs[(task, k, s)] for s in range(seeds)] for k in KINDS}
        first = {k: per[k][0]["student"] for k in ("tree", "linear", "formula")}
        save_interpretable(Path(out_dir) / "robotics_interpretable" / task, env_id, first,
                           {"teacher": f"SB3 PPO, {TASKS[task][1]:,} steps", "seed": 0})  # fmt: skip
        section[task] = {
            "env": env_id, "teacher_return": teachers[task],
            **{f"{k}_return": float(np.mean([r["return"] for r in per[k]])) for k in KINDS},
            **{f"{k}_return_per_seed": [r["return"] for r in per[k]] for k in KINDS},
            "tree_nodes": float(np.mean([r["size"]["nodes"] for r in per["tree"]])),
            "tree_nodes_per_seed": [r["size"]["nodes"] for r in per["tree"]],
            "tree_depth_per_seed": [r["size"]["depth"] for r in per["tree"]],
            "tree_unweighted_nodes": float(np.mean([r["size"]["nodes"] for r in per["tree_unweighted"]])),
            "linear_parameters": per["linear"][0]["size"]["parameters"],
            "linear_params": asdict(first["linear"]),
            "formula_terms": float(np.mean([r["size"]["terms"] for r in per["formula"]])),
            "formula_terms_per_seed": [r["size"]["terms"] for r in per["formula"]],
            "formula_text": first["formula"].text(features, actions),
            "linear_text": first["linear"].text(features, actions),
            "tree_text": first["tree"].text(features, actions),
            "history": {k: [r["history"] for r in per[k]] for k in KINDS},
        }  # fmt: skip
    _plot(section, out_dir)
    return section, markdown(section, seeds, quick)


def markdown(section: dict, seeds: int, quick: bool) -> str:
    """The table, the seed-0 formulas and the plot link for RESULTS.md."""
    ms = lambda xs: f"{np.mean(xs):.1f} ± {np.std(xs):.1f}"  # noqa: E731
    lines = [f"### Interpretable policies distilled from PPO teachers ({seeds} seeds"
             f"{', QUICK: numbers meaningless' if quick else ''})", "",
             "VIPER's loop for every student: DAgger (the teacher acts in the first round, the student afterwards), "
             "states weighted by the teacher's log-prob gap max_a log π(a|s) − min_a log π(a|s), the best round on "
             "validation episodes kept. Greedy return on 30 held-out episodes.", "",
             "| task | teacher | VIPER tree | tree, unweighted DAgger | linear | formula | tree nodes | linear params "
             "| formula terms |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for task, r in section.items():
        lines.append(f"| {r['env']} | {r['teacher_return']:.1f} | {ms(r['tree_return_per_seed'])} | "
                     f"{ms(r['tree_unweighted_return_per_seed'])} | {ms(r['linear_return_per_seed'])} | "
                     f"{ms(r['formula_return_per_seed'])} | {r['tree_nodes']:.1f} | {r['linear_parameters']} | "
                     f"{r['formula_terms']:.1f} |")  # fmt: skip
    lines += ["", "Formulas and linear policies of seed 0 (`opd interpret --policy benchmarks/results/"
              "robotics_interpretable/TASK` prints these and the tree's rules):", ""]  # fmt: skip
    for task, r in section.items():
        lines += [f"- {r['env']}, formula ({r['formula_terms_per_seed'][0]} terms):", "", "  ```",
                  *["  " + line for line in r["formula_text"].splitlines()], "  ```", "",
                  f"- {r['env']}, linear:", "", "  ```", *["  " + line for line in r["linear_text"].splitlines()],
                  "  ```", ""]  # fmt: skip
    lines += ["![interpretable students vs teacher](benchmarks/results/robotics_interpretable.png)", ""]
    return "\n".join(lines)


def _plot(section: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(section), figsize=(4.5 * len(section), 3.5))
    for ax, (task, r) in zip(np.atleast_1d(axes), section.items()):
        labels = ["teacher", "tree", "tree\n(unweighted)", "linear", "formula"]
        values = [[r["teacher_return"]]] + [r[f"{k}_return_per_seed"] for k in KINDS]
        ax.bar(labels, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], color="C0", alpha=0.8)
        ax.set(title=r["env"], ylabel="greedy return")
    fig.tight_layout()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(out_dir) / "robotics_interpretable.png", dpi=100)
    plt.close(fig)
