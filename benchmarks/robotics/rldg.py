"""RLDG part of `opd bench robotics` (MISSION row 12): a generalist trained on RL experts' successful rollouts versus
the same generalist trained on as many human-like demonstrations.

Reacher-v5. Four sub-tasks put the target in one of four 60° sectors (8-20 cm from the base); one SB3 PPO expert per
sector (trained once, cached, shared by the seeds). Success: the fingertip ends within 3 cm of the target. Both data
sets keep successful episodes only, the same number per sub-task; the scripted demonstrator aims right (a task-space
spring to the target) but hesitates, pauses, varies its gains and adds tremor. The generalist (MLP 256 × 256) reads
the target position from the observation, so it is also scored on held-out targets in the 30° gaps between sectors.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common.jobs import one_thread
from benchmarks.common.stats import mean


@dataclass(frozen=True)
class RldgArgs:
    """Sizes of the RLDG part."""

    expert_steps: int = 200_000
    """PPO steps per sub-task expert."""
    expert_rollout: int = 512
    """PPO rollout length per env (8 envs) between updates."""
    demos_per_subtask: int = 20
    """Successful episodes kept per sub-task, for each data set (50 steps each)."""
    generalist_updates: int = 3_000
    """Adam steps of each generalist."""
    eval_episodes: int = 50
    """Episodes per sub-task (and for the held-out gaps) when scoring success."""
    success_distance: float = 0.03
    """Success threshold in metres (opd.control.rldg.SUCCESS_DISTANCE; quick mode accepts every episode)."""


PRECISION = (0.01, 0.02, 0.03)
"""Stricter success thresholds (metres) reported next to the headline one."""


def _scale(quick: bool) -> RldgArgs:
    if quick:
        return RldgArgs(expert_steps=256, expert_rollout=32, demos_per_subtask=1, generalist_updates=5, eval_episodes=2,
                        success_distance=1.0)
    return RldgArgs()


def _ppo(args: RldgArgs):
    from opd.control.teachers import PPOArgs

    # 50-step episodes: a shorter horizon (γ = 0.95) and longer rollouts learn reaching faster
    return PPOArgs(total_steps=args.expert_steps, n_steps=args.expert_rollout, gamma=0.95, seed=0)


def job_expert(index: int, args: RldgArgs) -> dict:
    """Train (or load) the expert of sub-task `index` and score it."""
    from opd.control.rldg import SUBTASKS, expert_actor, final_distances, train_expert
    from opd.control.teachers import ppo_seconds

    one_thread()
    task = SUBTASKS[index]
    model = train_expert(task, _ppo(args))
    ends = final_distances(expert_actor(model), task, args.eval_episodes, 5_000)
    return {"subtask": task.name, "success": float(np.mean(ends < args.success_distance)),
            "success_at": {f"{100 * d:.0f}cm": float(np.mean(ends < d)) for d in PRECISION},
            "median_final_distance": float(np.median(ends)),
            "train_seconds": ppo_seconds(_ppo(args), f"reacher-{task.name}")}  # fmt: skip


def job_human(args: RldgArgs) -> dict:
    """The scripted demonstrator's own precision on the training sub-tasks (before any success filter)."""
    from opd.control.rldg import SUBTASKS, HumanArgs, HumanDemonstrator, final_distances

    ends = final_distances(HumanDemonstrator(HumanArgs(), seed=0), SUBTASKS, len(SUBTASKS) * args.eval_episodes, 7_000)
    return {"success": float(np.mean(ends < args.success_distance)), "median_final_distance": float(np.median(ends)),
            "success_at": {f"{100 * d:.0f}cm": float(np.mean(ends < d)) for d in PRECISION}}  # fmt: skip


def job(seed: int, args: RldgArgs) -> dict:
    """Collect both data sets for one seed, train a generalist on each, score per sub-task and held out."""
    from opd.control.rldg import (HELDOUT, SUBTASKS, HumanArgs, HumanDemonstrator, collect_successful, expert_actor,
                                  final_distances, merge, policy_actor, train_expert)  # fmt: skip

    one_thread()
    experts = {t.name: train_expert(t, _ppo(args)) for t in SUBTASKS}  # cached by job_expert
    n, offset, distance = args.demos_per_subtask, 100_000 * (seed + 1), args.success_distance
    data = {
        "rl_expert": [collect_successful(expert_actor(experts[t.name]), t, n, offset + 1_000 * i,
                                         success_distance=distance) for i, t in enumerate(SUBTASKS)],
        "human": [collect_successful(HumanDemonstrator(HumanArgs(), seed + 10 * i), t, n, offset + 1_000 * i,
                                     success_distance=distance) for i, t in enumerate(SUBTASKS)],
    }  # fmt: skip
    result = {"seed": seed}
    for source, parts in data.items():
        start = time.time()
        policy = train_generalist_for(merge(parts), args, seed)
        actor = policy_actor(policy)
        ends = {t.name: final_distances(actor, t, args.eval_episodes, 50_000 + offset + 1_000 * i)
                for i, t in enumerate(SUBTASKS)}  # fmt: skip
        heldout = final_distances(actor, HELDOUT, args.eval_episodes, 90_000 + offset)
        per_task = {name: float(np.mean(d < distance)) for name, d in ends.items()}
        trained = np.concatenate(list(ends.values()))
        result[source] = {
            "per_subtask": per_task, "success": float(np.mean(list(per_task.values()))),
            "heldout": float(np.mean(heldout < distance)),
            # precision: success at stricter thresholds and the median final distance, on the training sub-tasks
            "success_at": {f"{100 * d:.0f}cm": float(np.mean(trained < d)) for d in PRECISION},
            "median_final_distance": float(np.median(trained)),
            "episodes": sum(p.episodes for p in parts), "transitions": sum(len(p.obs_ND) for p in parts),
            "attempts": sum(p.attempts for p in parts), "data_success": sum(p.episodes for p in parts)
            / sum(p.attempts for p in parts), "seconds": time.time() - start,
        }  # fmt: skip
    return result


def train_generalist_for(data, args: RldgArgs, seed: int):
    from opd.control.rldg import GeneralistConfig, train_generalist

    return train_generalist(data, GeneralistConfig(updates=args.generalist_updates, seed=seed))


def run(quick: bool, seeds: int, workers: int, out_dir: Path) -> tuple[dict, str]:
    """The `rldg` json section and its markdown."""
    from opd.control.rldg import SUBTASKS

    args = _scale(quick)
    seeds = 1 if quick else seeds
    with ProcessPoolExecutor(workers, initializer=one_thread) as pool:
        # experts first (each trains once and is cached), then the seeds that load them
        experts = list(pool.map(job_expert, range(len(SUBTASKS)), [args] * len(SUBTASKS)))
        runs = list(pool.map(job, range(seeds), [args] * seeds))
        human = pool.submit(job_human, args).result()
    section = {"args": asdict(args), "env": "Reacher-v5", "success_distance": args.success_distance, "experts": experts,
               "human_demonstrator": human, "runs": runs, "subtasks": [asdict(t) for t in SUBTASKS]}  # fmt: skip
    for source, key in (("rl_expert", "rl_expert_data"), ("human", "human_demo")):
        section[f"{key}_success"] = mean(r[source]["success"] for r in runs)
        section[f"{key}_heldout_success"] = mean(r[source]["heldout"] for r in runs)
        section[f"{key}_success_per_seed"] = [r[source]["success"] for r in runs]
        section[f"{key}_success_at"] = {k: mean(r[source]["success_at"][k] for r in runs)
                                        for k in runs[0][source]["success_at"]}  # fmt: skip
        section[f"{key}_median_final_distance"] = mean(r[source]["median_final_distance"] for r in runs)
        section[f"{key}_per_subtask"] = {t.name: mean(r[source]["per_subtask"][t.name] for r in runs)
                                         for t in SUBTASKS}  # fmt: skip
        first = runs[0][source]
        section[f"{key}_dataset"] = {"episodes": first["episodes"], "transitions": first["transitions"],
                                     "collection_success": mean(r[source]["data_success"] for r in runs)}  # fmt: skip
    _plot(section, out_dir)
    return section, _markdown(section, seeds)


def _markdown(s: dict, seeds: int) -> str:
    names = [e["subtask"] for e in s["experts"]]
    data = s["rl_expert_data_dataset"]
    lines = ["### RLDG: generalist from RL-expert data vs human-like demonstrations (Reacher-v5)", "",
             f"Success = fingertip within {100 * s['success_distance']:.0f} cm of the target at the episode's end; "
             f"{seeds} seeds × {s['args']['eval_episodes']} episodes per sub-task. Both data sets: "
             f"{data['episodes']} successful episodes ({data['transitions']} transitions), the same count per "
             "sub-task. Held out: targets in the 30° gaps between the sectors.", "",
             "| generalist trained on | " + " | ".join(names) + " | mean | held out | per seed | source success |",
             "|---|" + "---|" * (len(names) + 4)]  # fmt: skip
    for key, label in (("rl_expert_data", "RL experts' successful rollouts"), ("human_demo", "human-like demos")):
        lines.append(f"| {label} | " + " | ".join(f"{100 * s[f'{key}_per_subtask'][n]:.0f} %" for n in names)
                     + f" | {100 * s[f'{key}_success']:.0f} % | {100 * s[f'{key}_heldout_success']:.0f} % | "
                     + ", ".join(f"{100 * v:.0f}" for v in s[f"{key}_success_per_seed"])
                     + f" | {100 * s[f'{key}_dataset']['collection_success']:.0f} % |")  # fmt: skip
    lines.append("| (the sub-task's RL expert) | " + " | ".join(f"{100 * e['success']:.0f} %" for e in s["experts"])
                 + f" | {100 * mean(e['success'] for e in s['experts']):.0f} % | | | |")  # fmt: skip
    lines += ["", "Source success: the share of collection episodes that succeeded (and were kept).", "",
              "Precision on the training sub-tasks (all four pooled):", "",
              "| generalist trained on | " + " | ".join(f"success < {k}" for k in s["rl_expert_data_success_at"])
              + " | median final distance |", "|---|" + "---|" * (len(s["rl_expert_data_success_at"]) + 1)]
    for key, label in (("rl_expert_data", "RL experts' successful rollouts"), ("human_demo", "human-like demos")):
        lines.append(f"| {label} | " + " | ".join(f"{100 * v:.0f} %" for v in s[f"{key}_success_at"].values())
                     + f" | {100 * s[f'{key}_median_final_distance']:.1f} cm |")
    experts = s["experts"]
    lines.append("| (the RL experts themselves) | " + " | ".join(
        f"{100 * mean(e['success_at'][k] for e in experts):.0f} %" for k in experts[0]["success_at"])
        + f" | {100 * mean(e['median_final_distance'] for e in experts):.1f} cm |")
    human = s["human_demonstrator"]
    lines.append("| (the human-like demonstrator, unfiltered) | " + " | ".join(
        f"{100 * v:.0f} %" for v in human["success_at"].values())
        + f" | {100 * human['median_final_distance']:.1f} cm |")
    lines += ["",
              "![rldg](benchmarks/results/robotics_rldg.png)", ""]
    return "\n".join(lines)


def _plot(s: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["subtask"] for e in s["experts"]] + ["held out"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (key, label) in enumerate((("rl_expert_data", "RL-expert data"), ("human_demo", "human-like demos"))):
        values = [s[f"{key}_per_subtask"][n] for n in names[:-1]] + [s[f"{key}_heldout_success"]]
        ax.bar(np.arange(len(names)) + (i - 0.5) * 0.35, values, 0.35, label=label)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set(ylabel="success rate", ylim=(0, 1), title="Reacher-v5 generalist")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "robotics_rldg.png", dpi=100)
    plt.close(fig)
