"""`opd bench control`: the control-side lineage (MISSION rows 1-6) as tables and plots.

    opd bench control            # full: 3 seeds, trains + caches MinAtar teachers on first use
    opd bench control --quick    # seconds: tiny step counts, checks that everything runs

Writes benchmarks/results/control.json, control.md (tables for RESULTS.md) and control_*.png. Independent runs are
spread over `--workers` processes, each on one thread.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.common.jobs import one_thread
from benchmarks.control.teachers import job_teacher, load_teacher, soft_cartpole_teacher


@dataclass(frozen=True)
class ControlBenchArgs:
    """What `opd bench control` runs."""

    quick: bool = False
    """Tiny step counts (for tests): checks the pipeline, the numbers mean nothing."""
    seeds: int = 3
    """Seeds per configuration."""
    workers: int = 2
    """Parallel worker processes (one thread each)."""
    out_dir: str = "benchmarks/results"
    """Where control.json, control.md and the PNG plots go."""
    games: tuple[str, ...] = ("MinAtar/Breakout-v1", "MinAtar/SpaceInvaders-v1", "MinAtar/Asterix-v1")
    """MinAtar games with a DQN teacher each (compression sweep, multi-task, Actor-Mimic experts)."""
    heldout_game: str = "MinAtar/Freeway-v1"
    """Actor-Mimic transfer target (not among `games`)."""
    teacher_steps: int = 500_000
    """DQN training steps per MinAtar teacher (cached under $OPD_CACHE/teachers after the first run)."""
    fractions: tuple[float, ...] = (0.25, 0.07, 0.04)
    """Student sizes as fractions of the teacher's parameters."""
    distill_updates: int = 10_000
    """Student updates per policy-distillation / Actor-Mimic run."""
    transfer_steps: int = 100_000
    """DQN steps on the held-out game, per initialisation."""
    sections: tuple[str, ...] = ("kd", "dagger", "rusu", "multitask", "actor_mimic")
    """Which parts to run."""
    merge: bool = False
    """Keep the other sections of an existing control.json in `out_dir` and replace only the ones run now (e.g.
    `--sections dagger --merge` redoes the CartPole comparison in minutes, not the hour)."""


DAGGER_METHODS = ("bc", "linear", "exponential", "onpolicy", "onpolicy_aggregated")
"""CartPole columns: BC, DAgger with two β schedules, and the on-policy analogue (the student acts, the loss is the
reverse KL to the teacher's action distribution) without ("onpolicy": each round trains on that round's states only)
and with DAgger's aggregation of every visited state ("onpolicy_aggregated")."""


def _scale(args: ControlBenchArgs) -> ControlBenchArgs:
    if not args.quick:
        return args
    return replace(args, seeds=1, teacher_steps=1_000, distill_updates=40, transfer_steps=600,
                   games=args.games[:2], fractions=args.fractions[:2])  # fmt: skip


# --- jobs (top-level functions so that worker processes can run them) ------------------------------------------


def job_kd(seed: int, quick: bool) -> dict:
    from opd.kd import KDConfig, run_classic_kd

    config = KDConfig(seed=seed, steps=60 if quick else 2_000)
    return run_classic_kd(config, temperatures=(1.0, 4.0) if quick else (1.0, 2.0, 4.0, 8.0, 16.0))


def job_dagger(method: str, seed: int, quick: bool) -> dict:
    from opd.control.dagger import DAggerConfig, OnPolicyDistillConfig, run_dagger, run_onpolicy_distill
    from opd.control.envs import evaluate
    from opd.control.teachers import as_teacher

    teacher = as_teacher(soft_cartpole_teacher, kind="logits")
    iterations, steps = (2, 5) if quick else (10, 10)
    if method == "onpolicy_aggregated":
        # the student always acts (β = 0) and the teacher's distribution over every visited state is kept and
        # trained on with the reverse KL: on-policy distillation with DAgger's data aggregation
        config = DAggerConfig(schedule="zero", loss="reverse_kl", iterations=iterations, steps_per_iteration=steps,
                              num_envs=4, seed=seed, progress=False)  # fmt: skip
        result = run_dagger(teacher, config)
    elif method == "onpolicy":
        config = OnPolicyDistillConfig(iterations=iterations, steps_per_iteration=steps, num_envs=4, seed=seed,
                                       progress=False, updates_per_iteration=100)  # fmt: skip
        result = run_onpolicy_distill(teacher, config)
    else:
        config = DAggerConfig(schedule=method, iterations=iterations, steps_per_iteration=steps, num_envs=4,
                              seed=seed, progress=False)  # fmt: skip
        result = run_dagger(teacher, config)
    horizons = (100, 500) if quick else (100, 250, 500, 1000, 2000)
    by_horizon = {h: float(evaluate(result.student.act, "CartPole-v1", 4 if quick else 10, seed=50_000 + seed,
                                    max_episode_steps=h).mean()) for h in horizons}  # fmt: skip
    return {"labels": [r["step"] for r in result.history], "returns": [r["return_mean"] for r in result.history],
            "by_horizon": by_horizon, "config": asdict(config)}  # fmt: skip


def job_distill(games: tuple[str, ...], fraction: float | None, loss: str, temperature: float, seed: int,
                args: ControlBenchArgs) -> dict:
    from opd.control.distill import PolicyDistillConfig, compression_student, distill_policy, teacher_parameters
    from opd.control.policies import Policy, count_parameters

    teachers = {g: load_teacher(g, args.teacher_steps) for g in games}
    student = None
    if fraction is not None:
        student = Policy(compression_student(games[0], teacher_parameters(teachers[games[0]]), fraction))
    config = PolicyDistillConfig(loss=loss, temperature=temperature, updates=args.distill_updates,
                                 eval_every=args.distill_updates, seed=seed, progress=False,
                                 eval_episodes=4 if args.quick else 20, warmup_steps=20 if args.quick else 500)  # fmt: skip
    result = distill_policy(teachers, config, student)
    return {"games": list(games), "fraction": fraction, "loss": loss, "temperature": temperature, "seed": seed,
            "student_params": count_parameters(result.student),
            "scores": {g: result.history[-1][f"return/{g}"] for g in games}}  # fmt: skip


def job_actor_mimic(seed: int, args: ControlBenchArgs) -> dict:
    from opd.control.actor_mimic import ActorMimicConfig, TransferConfig, actor_mimic, transfer_dqn

    experts = {g: load_teacher(g, args.teacher_steps) for g in args.games}
    config = ActorMimicConfig(updates=args.distill_updates, eval_every=args.distill_updates, seed=seed,
                              progress=False, eval_episodes=4 if args.quick else 20,
                              warmup_steps=20 if args.quick else 500)  # fmt: skip
    result = actor_mimic(experts, config)
    transfer = TransferConfig(args.heldout_game, args.transfer_steps, window=max(args.transfer_steps // 10, 100),
                              seed=seed, progress=False)  # fmt: skip
    return {"seed": seed, "scores": {g: result.history[-1][f"return/{g}"] for g in args.games},
            "from_actor_mimic": transfer_dqn(transfer, init=result.student),
            "from_scratch": transfer_dqn(transfer, spec=result.student.spec)}  # fmt: skip


# --- the benchmark -------------------------------------------------------------------------------------------------


def _mean(values):
    values = [v for v in values if v == v]  # NaN: a window without a finished episode
    return float(np.mean(values)) if values else float("nan")


def control_bench_main(args: ControlBenchArgs) -> dict:
    """Run the selected sections; write control.json, control.md and plots into `args.out_dir`. Returns the json."""
    args = _scale(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = range(args.seeds)
    previous = out / "control.json"
    results: dict = json.loads(previous.read_text()) if args.merge and previous.exists() else {}
    wall_before = results.get("wall_seconds", 0.0)
    results["args"] = asdict(args)
    start = time.time()
    with ProcessPoolExecutor(args.workers, initializer=one_thread) as pool:
        futures = {}
        if "kd" in args.sections:
            futures["kd"] = [pool.submit(job_kd, s, args.quick) for s in seeds]
        if "dagger" in args.sections:
            futures["dagger"] = {m: [pool.submit(job_dagger, m, s, args.quick) for s in seeds]
                                 for m in DAGGER_METHODS}  # fmt: skip
        needs_teachers = {"rusu", "multitask", "actor_mimic"} & set(args.sections)
        if needs_teachers:  # train/cache every teacher before the jobs that load them
            teachers = [f.result() for f in [pool.submit(job_teacher, g, args.teacher_steps) for g in args.games]]
            results["teachers"] = teachers
        if "rusu" in args.sections:
            futures["compression"] = [pool.submit(job_distill, (g,), f, "kl", 0.01, s, args)
                                      for g in args.games for f in args.fractions for s in seeds]  # fmt: skip
            losses = [("kl", 0.01), ("kl", 1.0), ("nll", 1.0), ("mse", 1.0)]
            futures["losses"] = [pool.submit(job_distill, args.games[:1], args.fractions[0], loss, tau, s, args)
                                 for loss, tau in losses for s in seeds]  # fmt: skip
        if "multitask" in args.sections:
            futures["multitask"] = [pool.submit(job_distill, args.games, None, "kl", 0.01, s, args) for s in seeds]
        if "actor_mimic" in args.sections:
            futures["actor_mimic"] = [pool.submit(job_actor_mimic, s, args) for s in seeds]
        done = {k: ({m: [f.result() for f in fs] for m, fs in v.items()} if isinstance(v, dict)
                    else [f.result() for f in v]) for k, v in futures.items()}  # fmt: skip
    results["wall_seconds"] = round(wall_before + time.time() - start, 1)  # with --merge: all sections' time
    teacher_score = {t["game"]: t["score"] for t in results.get("teachers", [])}
    if "kd" in done:
        results["classic_kd"] = done["kd"]
    if "dagger" in done:
        d = done["dagger"]
        results["dagger_runs"] = d
        results["dagger_vs_bc"] = {
            "env": "CartPole-v1 (scripted expert)",
            "expert_labels": d["bc"][0]["labels"],
            "bc_return": [_mean(r["returns"][i] for r in d["bc"]) for i in range(len(d["bc"][0]["labels"]))],
            "dagger_return": [_mean(r["returns"][i] for r in d["linear"]) for i in range(len(d["bc"][0]["labels"]))],
        }
    if "compression" in done:
        rows = done["compression"]
        results["rusu_compression"] = [
            {"game": g, "param_fraction": f,
             "score_fraction": _mean(r["scores"][g] for r in rows if r["games"] == [g] and r["fraction"] == f)
             / teacher_score[g] if teacher_score[g] else float("nan"),
             "student_score": _mean(r["scores"][g] for r in rows if r["games"] == [g] and r["fraction"] == f),
             "teacher_score": teacher_score[g]}
            for g in args.games for f in args.fractions
        ]  # fmt: skip
        results["rusu_losses"] = done["losses"]
    if "multitask" in done:
        results["multitask"] = done["multitask"]
    if "actor_mimic" in done:
        results["actor_mimic"] = done["actor_mimic"]
    (out / "control.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "control.md").write_text(markdown(results, args))
    plots(results, out)
    return results


def markdown(results: dict, args: ControlBenchArgs) -> str:
    """The tables for RESULTS.md."""
    how = (f"{results['wall_seconds'] / 60:.1f} min in all; the last run, `--sections {' '.join(args.sections)} "
           f"--merge`, on {args.workers} workers" if args.merge else
           f"{results['wall_seconds'] / 60:.1f} min on {args.workers} workers")
    lines = [f"## Control lineage ({args.seeds} seeds{', QUICK: numbers meaningless' if args.quick else ''}; {how})",
             ""]  # fmt: skip
    if "classic_kd" in results:
        runs = results["classic_kd"]
        ms = lambda xs: f"{100 * np.mean(xs):.1f} ± {100 * np.std(xs):.1f}"  # noqa: E731
        lines += ["### Classic KD on digits (test accuracy %, 200 labels + 800 unlabelled transfer images)", "",
                  "| model | accuracy |", "|---|---|",
                  f"| teacher MLP (256, 256) | {ms([r['teacher'] for r in runs])} |",
                  f"| student (8) alone | {ms([r['student_alone'] for r in runs])} |"]  # fmt: skip
        for t in runs[0]["hinton_kd"]:
            lines.append(f"| student (8), Hinton KD T={t} | {ms([r['hinton_kd'][t] for r in runs])} |")
        lines += [f"| deep-thin (16,16,16) alone | {ms([r['fitnet_alone'] for r in runs])} |",
                  f"| deep-thin, KD only | {ms([r['fitnet_kd_only'] for r in runs])} |",
                  f"| deep-thin, FitNets (hint stage + KD) | {ms([r['fitnets'] for r in runs])} |",
                  f"| mutual learning, two students (8) | {ms([a for r in runs for a in r['mutual_learning']])} |",
                  ""]  # fmt: skip
    if "dagger_vs_bc" in results:
        d = results["dagger_runs"]
        lines += ["### BC vs DAgger vs on-policy distillation (CartPole-v1, scripted expert; return vs labels)", "",
                  "| expert labels | " + " | ".join(d) + " |", "|---" * (len(d) + 1) + "|"]  # fmt: skip
        for i, labels in enumerate(d["bc"][0]["labels"]):
            lines.append(f"| {labels} | " + " | ".join(f"{_mean(r['returns'][i] for r in d[m]):.0f}" for m in d) + " |")
        lines += ["", "Return / horizon at the last iteration (compounding error):", "",
                  "| horizon | " + " | ".join(d) + " |", "|---" * (len(d) + 1) + "|"]  # fmt: skip
        for h in d["bc"][0]["by_horizon"]:
            lines.append(f"| {h} | " + " | ".join(f"{_mean(r['by_horizon'][h] for r in d[m]) / int(h):.2f}"
                                                 for m in d) + " |")  # fmt: skip
        lines.append("")
    if "teachers" in results:
        lines += ["### MinAtar DQN teachers", "", "| game | score | params | train s |", "|---|---|---|---|"]
        lines += [f"| {t['game']} | {t['score']:.1f} | {t['params']} | {t['train_seconds']:.0f} |"
                  for t in results["teachers"]] + [""]  # fmt: skip
    if "rusu_compression" in results:
        lines += ["### Rusu policy distillation: compression (KL, τ = 0.01)", "",
                  "| game | params / teacher | student score | teacher score | score / teacher |", "|---|---|---|---|---|"]
        lines += [f"| {r['game']} | {100 * r['param_fraction']:.0f} % | {r['student_score']:.1f} | "
                  f"{r['teacher_score']:.1f} | {100 * r['score_fraction']:.0f} % |" for r in results["rusu_compression"]]
        lines += ["", "Rusu et al. (Atari, their Table 2): 108 % at 25 %, 102 % at 7 %, 84 % at 4 % of the teacher.", "",
                  f"Losses on {args.games[0]} at {100 * args.fractions[0]:.0f} % size:", "",
                  "| loss | τ | score |", "|---|---|---|"]  # fmt: skip
        by = {}
        for r in results["rusu_losses"]:
            by.setdefault((r["loss"], r["temperature"]), []).append(r["scores"][args.games[0]])
        lines += [f"| {loss} | {tau} | {_mean(v):.1f} |" for (loss, tau), v in by.items()] + [""]
    for key, title in (("multitask", "Multi-task policy distillation"), ("actor_mimic", "Actor-Mimic")):
        if key in results:
            teacher = {t["game"]: t["score"] for t in results["teachers"]}
            lines += [f"### {title}: one student, a head per game (score / teacher)", "", "| game | score | / teacher |",
                      "|---|---|---|"]  # fmt: skip
            for g in args.games:
                score = _mean(r["scores"][g] for r in results[key])
                lines.append(f"| {g} | {score:.1f} | {100 * score / teacher[g] if teacher[g] else float('nan'):.0f} % |")
            lines.append("")
    if "actor_mimic" in results:
        runs = results["actor_mimic"]
        steps = runs[0]["from_scratch"]["steps"]
        lines += [f"Transfer to {args.heldout_game} (mean training return per window):", "",
                  "| steps | from Actor-Mimic | from scratch |", "|---|---|---|"]  # fmt: skip
        for i, s in enumerate(steps):
            lines.append(f"| {s} | {_mean(r['from_actor_mimic']['returns'][i] for r in runs):.2f} | "
                         f"{_mean(r['from_scratch']['returns'][i] for r in runs):.2f} |")
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> None:
    """control_dagger.png (return vs labels) and control_transfer.png (learning curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "dagger_runs" in results:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, runs in results["dagger_runs"].items():
            ax.plot(runs[0]["labels"], [_mean(r["returns"][i] for r in runs) for i in range(len(runs[0]["labels"]))],
                    marker="o", label=method)  # fmt: skip
        ax.set(xlabel="expert labels", ylabel="return", title="CartPole-v1: BC vs DAgger")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "control_dagger.png", dpi=100)
        plt.close(fig)
    if "actor_mimic" in results:
        runs = results["actor_mimic"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key in ("from_actor_mimic", "from_scratch"):
            steps = runs[0][key]["steps"]
            ax.plot(steps, [_mean(r[key]["returns"][i] for r in runs) for i in range(len(steps))], label=key)
        ax.set(xlabel="DQN steps", ylabel="training return", title=f"transfer: {results['args']['heldout_game']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "control_transfer.png", dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    import tyro

    control_bench_main(tyro.cli(ControlBenchArgs))
