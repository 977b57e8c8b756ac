"""Robotics part 17: Refined Policy Distillation (RPD) against PPO from scratch and against its teacher.

A "generalist" teacher: PPO stopped early on InvertedPendulum-v5 (MuJoCo, continuous torque), good but far from the
maximum return (1000), so that surpassing it is possible and measurable. RPD = PPO + λ(t)·MSE(student mean action,
teacher action) with λ decaying by a half cosine to 0 at `anneal_steps`; PPO from scratch is the same code with λ = 0.
We report the learning curves, the steps each method needs to reach the teacher's return, and the final return.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.common.jobs import one_thread, pool_for

ENV_ID = "InvertedPendulum-v5"


def _settings(quick: bool) -> dict:
    if quick:
        return dict(teacher_steps=256, total_steps=512, anneal_steps=512, eval_every=256, eval_episodes=2,
                    final_episodes=2, ppo=dict(n_steps=64, n_epochs=2))  # fmt: skip
    return dict(teacher_steps=20_000, total_steps=30_000, anneal_steps=15_000, eval_every=3_000, eval_episodes=5,
                final_episodes=20, ppo={})  # fmt: skip


def _teacher(quick: bool):
    from opd.control.rpd import train_generalist_teacher

    s = _settings(quick)
    return train_generalist_teacher(ENV_ID, s["teacher_steps"], seed=0, **s["ppo"])


def job_teacher(quick: bool) -> float:
    """Train (or load) the teacher; its greedy return on the final-evaluation episodes."""
    from opd.control.rpd import evaluate_model

    one_thread()
    return float(evaluate_model(_teacher(quick), ENV_ID, _settings(quick)["final_episodes"], seed=50_000).mean())


def job_run(method: str, seed: int, quick: bool) -> dict:
    """One RPD (λ_max = 1) or PPO (λ_max = 0) run: its learning curve and final greedy return."""
    from opd.control.rpd import RPDConfig, evaluate_model, run_rpd

    one_thread()
    s = _settings(quick)
    config = RPDConfig(env_id=ENV_ID, total_steps=s["total_steps"], anneal_steps=s["anneal_steps"],
                       lambda_max=1.0 if method == "rpd" else 0.0, eval_every=s["eval_every"],
                       eval_episodes=s["eval_episodes"], seed=seed, **s["ppo"])  # fmt: skip
    result = run_rpd(_teacher(quick), config)
    final = evaluate_model(result.model, ENV_ID, s["final_episodes"], seed=50_000)
    return {"steps": [r["step"] for r in result.history], "returns": [r["return_mean"] for r in result.history],
            "lambda": [r["rpd_lambda"] for r in result.history], "final": float(final.mean())}  # fmt: skip


def steps_to_reach(steps: list[int], returns: list[float], level: float) -> int | None:
    """The first evaluated step whose return is at least `level` (None: never within the budget)."""
    return next((s for s, r in zip(steps, returns) if r >= level), None)


def run(quick: bool, seeds: int, workers: int, out_dir: Path) -> tuple[dict, str]:
    """RPD vs PPO from scratch vs the teacher; json section, markdown, robotics_rpd.png."""
    seeds = 1 if quick else seeds
    s = _settings(quick)
    with pool_for(workers) as pool:
        teacher = pool.submit(job_teacher, quick).result()  # trained once, before the runs load it from the cache
        futures = {m: [pool.submit(job_run, m, seed, quick) for seed in range(seeds)] for m in ("rpd", "ppo")}
        runs = {m: [f.result() for f in fs] for m, fs in futures.items()}
    steps = runs["rpd"][0]["steps"]
    curve = lambda m: [float(np.mean([r["returns"][i] for r in runs[m]])) for i in range(len(steps))]  # noqa: E731
    to_teacher = {m: [steps_to_reach(r["steps"], r["returns"], teacher) for r in runs[m]] for m in runs}
    section = {
        "env": ENV_ID, "teacher": teacher, "teacher_steps": s["teacher_steps"], "total_steps": s["total_steps"],
        "anneal_steps": s["anneal_steps"], "lambda_max": 1.0, "seeds": seeds,
        "rpd_final": float(np.mean([r["final"] for r in runs["rpd"]])),
        "ppo_final": float(np.mean([r["final"] for r in runs["ppo"]])),
        "rpd_final_per_seed": [r["final"] for r in runs["rpd"]],
        "ppo_final_per_seed": [r["final"] for r in runs["ppo"]],
        "curve_steps": steps, "rpd_curve": curve("rpd"), "ppo_curve": curve("ppo"),
        "steps_to_teacher": to_teacher, "runs": runs,
        "rpd_surpasses_teacher_seeds": sum(r["final"] > teacher for r in runs["rpd"]),
    }  # fmt: skip
    _plot(section, out_dir)
    return section, markdown(section, quick)


def _fmt_steps(values: list[int | None]) -> str:
    reached = [v for v in values if v is not None]
    mean = f"{np.mean(reached):,.0f}" if reached else "—"
    return f"{mean} ({len(reached)}/{len(values)} seeds reach it)"


def markdown(section: dict, quick: bool) -> str:
    """The RPD table and curve for RESULTS.md."""
    ms = lambda xs: f"{np.mean(xs):.0f} ± {np.std(xs):.0f}"  # noqa: E731
    lines = [f"### RPD: PPO + a cosine-annealed pull toward a generalist teacher ({section['env']}"
             f"{', QUICK: numbers meaningless' if quick else ''})", "",
             f"Teacher: PPO stopped after {section['teacher_steps']:,} steps. Students: {section['total_steps']:,} "
             f"steps, {section['seeds']} seeds; RPD's λ decays from {section['lambda_max']} to 0 over the first "
             f"{section['anneal_steps']:,} steps (loss: MSE to the teacher's mean action). Greedy returns; 1000 is "
             "the maximum.", "",
             "| policy | final return | steps to reach the teacher's return | final > teacher |", "|---|---|---|---|",
             f"| teacher | {section['teacher']:.0f} | — | — |",
             f"| RPD | {ms(section['rpd_final_per_seed'])} | {_fmt_steps(section['steps_to_teacher']['rpd'])} | "
             f"{section['rpd_surpasses_teacher_seeds']}/{section['seeds']} seeds |",
             f"| PPO from scratch | {ms(section['ppo_final_per_seed'])} | "
             f"{_fmt_steps(section['steps_to_teacher']['ppo'])} | "
             f"{sum(f > section['teacher'] for f in section['ppo_final_per_seed'])}/{section['seeds']} seeds |", "",
             "| env steps | " + " | ".join(f"{s:,}" for s in section["curve_steps"]) + " |",
             "|---" * (len(section["curve_steps"]) + 1) + "|",
             "| RPD | " + " | ".join(f"{r:.0f}" for r in section["rpd_curve"]) + " |",
             "| PPO | " + " | ".join(f"{r:.0f}" for r in section["ppo_curve"]) + " |", "",
             "![RPD vs PPO learning curves](benchmarks/results/robotics_rpd.png)", ""]  # fmt: skip
    return "\n".join(lines)


def _plot(section: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    steps = section["curve_steps"]
    for method, label in (("rpd", "RPD"), ("ppo", "PPO from scratch")):
        runs = np.array([r["returns"] for r in section["runs"][method]])
        mean, std = runs.mean(0), runs.std(0)
        ax.plot(steps, mean, marker="o", ms=3, label=label)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.axhline(section["teacher"], color="gray", ls="--", label="teacher")
    ax.axvline(section["anneal_steps"], color="gray", ls=":", lw=1)
    ax.set(xlabel="environment steps", ylabel="greedy return", title=f"RPD on {section['env']}")
    ax.legend()
    fig.tight_layout()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(out_dir) / "robotics_rpd.png", dpi=100)
    plt.close(fig)
