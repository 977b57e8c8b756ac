"""Sim-to-real part of `opd bench robotics` (MISSION row 11): a privileged teacher distilled DAgger-style into a
"real robot" student, evaluated under dynamics changed beyond training.

InvertedPendulum-v5. The teacher (SB3 PPO) sees the clean state [cart position, pole angle, both velocities]; every
other policy sees the robot observation: positions only, Gaussian noise, one step of latency, the last 4 frames
stacked. All training uses mild domain randomisation (masses and gear × [0.8, 1.25]); evaluation shifts go beyond it.

    student      DAgger (β = 0.5^i), MSE to the teacher's action on every state the mixture visits
    bc           the same student and label count, teacher-driven states only (β = 1)
    rl_student   SB3 PPO trained directly on the robot observation, as many env steps as the teacher
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.common.jobs import one_thread
from benchmarks.common.stats import mean

SHIFTS = {
    "nominal": {},
    "pole_mass_x3": dict(mass=3.0, bodies=("pole",)),
    "cart_mass_x3": dict(mass=3.0, bodies=("cart",)),
    "gear_x0.5": dict(gear=0.5),
    "damping_x4": dict(damping=4.0),
    "mass_x2_gear_x0.6": dict(mass=2.0, gear=0.6),
}
"""Evaluation dynamics (DynamicsShift fields); every one but nominal lies outside the training randomisation."""

METHODS = ("teacher", "student", "bc", "rl_student")


@dataclass(frozen=True)
class SimToRealArgs:
    """Sizes of the sim-to-real part."""

    teacher_steps: int = 100_000
    """PPO steps of the privileged teacher, and of the RL baseline on the robot observation."""
    ppo_rollout: int = 256
    """PPO rollout length per env (8 envs) between updates."""
    iterations: int = 10
    """DAgger / BC rounds."""
    steps_per_iteration: int = 500
    """Steps per round per env (4 envs): 20,000 teacher labels in all."""
    updates_per_iteration: int = 800
    """Student updates per round."""
    eval_episodes: int = 10
    """Episodes per (policy, dynamics)."""


def _scale(quick: bool) -> SimToRealArgs:
    if quick:
        return SimToRealArgs(teacher_steps=256, ppo_rollout=32, iterations=2, steps_per_iteration=20,
                             updates_per_iteration=5, eval_episodes=2)  # fmt: skip
    return SimToRealArgs()


def train_rl(seed: int, args: SimToRealArgs, observation: str):
    """The PPO model of one seed on the privileged ("teacher") or robot ("robot") observation; trained once, cached."""
    from opd.control.sim2real import PrivilegedDistillConfig, make_robot_env
    from opd.control.teachers import PPOArgs, train_ppo

    config = PrivilegedDistillConfig()
    obs = None if observation == "teacher" else config.obs
    ppo = PPOArgs(total_steps=args.teacher_steps, n_steps=args.ppo_rollout, seed=seed)
    name = "pendulum-privileged" if observation == "teacher" else "pendulum-robot-obs"
    return train_ppo(lambda: make_robot_env(config.env_id, obs, randomize=config.randomize), ppo, name), ppo, name


def job(seed: int, args: SimToRealArgs) -> dict:
    """Train teacher, RL baseline, DAgger student and BC student for one seed; evaluate all under every shift."""
    import time

    from opd.control.sim2real import (DynamicsShift, PrivilegedDistillConfig, distill_privileged, evaluate_robot,
                                      make_robot_env, sb3_actor)  # fmt: skip
    from opd.control.teachers import ppo_seconds

    one_thread()
    config = PrivilegedDistillConfig(iterations=args.iterations, steps_per_iteration=args.steps_per_iteration,
                                     updates_per_iteration=args.updates_per_iteration, seed=seed)  # fmt: skip
    env_id, robot = config.env_id, config.obs
    teacher, ppo, _ = train_rl(seed, args, "teacher")
    rl, _, _ = train_rl(seed, args, "robot")
    start = time.time()
    dagger = distill_privileged(sb3_actor(teacher), config)
    dagger_seconds = time.time() - start
    bc = distill_privileged(sb3_actor(teacher), replace(config, schedule="bc"))
    actors = {"teacher": (sb3_actor(teacher), True), "student": (dagger.student.act, False),
              "bc": (bc.student.act, False), "rl_student": (sb3_actor(rl), False)}  # fmt: skip
    returns = {m: {} for m in METHODS}
    for name, fields in SHIFTS.items():
        shift = DynamicsShift(**fields)
        for method, (actor, privileged) in actors.items():
            values = evaluate_robot(actor, lambda: make_robot_env(env_id, robot, shift), args.eval_episodes,
                                    seed=20_000 + 100 * seed, privileged=privileged)  # fmt: skip
            returns[method][name] = float(values.mean())
    seconds = {"teacher": ppo_seconds(ppo, "pendulum-privileged"), "rl_student": ppo_seconds(ppo, "pendulum-robot-obs"),
               "dagger": dagger_seconds}  # PPO times are from when the model was trained and cached
    return {"seed": seed, "returns": returns, "labels": dagger.history[-1]["dataset_size"], "seconds": seconds,
            "dagger_curve": [r["return_mean"] for r in dagger.history],
            "bc_curve": [r["return_mean"] for r in bc.history],
            # who acted: the teacher's share β of each iteration (BC: always the teacher)
            "dagger_beta": [r["beta"] for r in dagger.history], "bc_beta": [r["beta"] for r in bc.history]}  # fmt: skip


def run(quick: bool, seeds: int, workers: int, out_dir: Path) -> tuple[dict, str]:
    """The `sim_to_real` json section and its markdown."""
    args = _scale(quick)
    seeds = 1 if quick else seeds
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=one_thread) as pool:
            runs = list(pool.map(job, range(seeds), [args] * seeds))
    else:
        runs = [job(s, args) for s in range(seeds)]
    shifted = [n for n in SHIFTS if n != "nominal"]
    per_shift = {m: {n: mean(r["returns"][m][n] for r in runs) for n in SHIFTS} for m in METHODS}
    per_seed_shifted = {m: [mean(r["returns"][m][n] for n in shifted) for r in runs] for m in METHODS}
    section = {"args": asdict(args), "env": "InvertedPendulum-v5", "shifts": SHIFTS, "runs": runs,
               "per_shift": per_shift, "per_seed_shifted": per_seed_shifted, "labels": runs[0]["labels"]}  # fmt: skip
    for method, key in (("teacher", "teacher"), ("student", "student"), ("bc", "bc"), ("rl_student", "rl_student_obs")):
        section[f"{key}_shifted"] = mean(per_seed_shifted[method])
        section[f"{key}_nominal"] = per_shift[method]["nominal"]
        section[f"{key}_shifted_per_seed"] = per_seed_shifted[method]
    _plot(section, out_dir)
    return section, _markdown(section, seeds)


def _markdown(s: dict, seeds: int) -> str:
    names = {"teacher": "teacher (privileged state)", "student": "DAgger student", "bc": "BC student",
             "rl_student": "PPO on robot obs"}  # fmt: skip
    shifts = list(SHIFTS)
    lines = ["### Sim-to-real: privileged teacher → robot-observation student (InvertedPendulum-v5)", "",
             f"Mean return (max 1000) over {seeds} seeds × {s['args']['eval_episodes']} episodes. The student sees "
             "positions only, noisy (σ 0.002), one step late, 4 frames stacked; the teacher sees the clean state. "
             "Training randomises masses and gear in [0.8, 1.25]×; the shifts below go beyond it. "
             f"DAgger and BC get {s['labels']} teacher labels each; PPO on the robot observation gets "
             f"{s['args']['teacher_steps']} env steps, as many as the teacher.", "",
             "| policy | " + " | ".join(shifts) + " | mean shifted | per seed (shifted) |",
             "|---|" + "---|" * (len(shifts) + 2)]  # fmt: skip
    for m in METHODS:
        lines.append(f"| {names[m]} | " + " | ".join(f"{s['per_shift'][m][n]:.0f}" for n in shifts)
                     + f" | {mean(s['per_seed_shifted'][m]):.0f} | "
                     + ", ".join(f"{v:.0f}" for v in s["per_seed_shifted"][m]) + " |")  # fmt: skip
    lines += ["", "![sim-to-real](benchmarks/results/robotics_sim_to_real.png)", ""]
    return "\n".join(lines)


def _plot(s: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = list(SHIFTS)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.2
    for i, m in enumerate(METHODS):
        ax.bar(np.arange(len(shifts)) + (i - 1.5) * width, [s["per_shift"][m][n] for n in shifts], width, label=m)
    ax.set_xticks(np.arange(len(shifts)), shifts, rotation=15, fontsize=8)
    ax.set(ylabel="return", title="InvertedPendulum-v5 under dynamics shifts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "robotics_sim_to_real.png", dpi=100)
    plt.close(fig)
