"""Where on-policy distillation wins, hypothesis 5: Rusu's policy compression with the student's own play.

    opd bench opd_wins_control            # 2 games × 3 sizes × 2 collectors × 3 seeds: ~17 min on 1 core
    opd bench opd_wins_control --quick    # seconds: tiny step counts, checks that everything runs

Rusu et al. replay the teacher's ε-greedy play; our compressed students keep far less of the teacher's score than
theirs (control.md). Here the same runs are repeated with `PolicyDistillConfig(collector="student")`: after the
teacher-played warm-up the student acts and the teacher labels every state it visits (DAgger's aggregation). The
"teacher" arm uses the control benchmark's Rusu settings (KL τ = 0.01, 10,000 updates, warm-up 500, 20 evaluation
episodes), so it is comparable to control.json's rows. Writes opd_wins_control.json and .md (`*_quick.*` for --quick).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.common.command import command_line
from benchmarks.common.jobs import one_thread
from benchmarks.common.results import quick_banner
from benchmarks.common.stats import sd
from benchmarks.control.teachers import job_teacher, load_teacher
from opd.control.distill import COLLECTORS


@dataclass(frozen=True)
class OpdWinsControlArgs:
    """What `opd bench opd_wins_control` runs."""

    quick: bool = False
    """Tiny step counts (for tests): checks the pipeline, the numbers mean nothing."""
    seeds: tuple[int, ...] = tuple(range(10))
    """Seeds per (game, fraction, collector); the two collectors are paired by seed. Ten, because with three the seed
    spread (up to 7.5 points on Space Invaders) hid the 5-6-point gaps that ten show on 9-10 seeds of 10."""
    workers: int = 1
    """Parallel worker processes (one thread each)."""
    out_dir: str = "benchmarks/results"
    """Where opd_wins_control.json and .md go."""
    games: tuple[str, ...] = ("MinAtar/SpaceInvaders-v1", "MinAtar/Breakout-v1")
    """MinAtar games, each with a cached (or trained here) 500k-step DQN teacher as in the control benchmark."""
    fractions: tuple[float, ...] = (0.25, 0.07, 0.04)
    """Student sizes as fractions of the teacher's parameters (Rusu's Table 2)."""
    collectors: tuple[str, ...] = COLLECTORS
    """Who plays after the warm-up: "teacher" (Rusu's replay) and/or "student" (on-policy, DAgger-style)."""
    teacher_steps: int = 500_000
    """DQN training steps per teacher (the control benchmark's; cached under $OPD_CACHE/teachers)."""
    updates: int = 10_000
    """Student updates per run, the same for both collectors."""
    warmup_steps: int = 500
    """Vector-env steps of teacher play before the first update (both collectors)."""
    eval_episodes: int = 20
    """Greedy evaluation episodes per run, at the end."""
    other_load: str = "nothing else"
    """What else ran on the machine meanwhile (recorded: the wall times depend on it)."""
    runs_dir: str = "runs/opd_wins_control"
    """Each finished run is kept here as JSON and reused by a later invocation with the same settings (so an
    interrupted sweep resumes, and adding a game does not redo the others)."""


def _scale(args: OpdWinsControlArgs) -> OpdWinsControlArgs:
    if not args.quick:
        return args
    return replace(args, games=args.games[:1], fractions=args.fractions[:2], teacher_steps=1_000, updates=40,
                   warmup_steps=20, eval_episodes=4)  # fmt: skip


def run_path(game: str, fraction: float, collector: str, seed: int, args: OpdWinsControlArgs) -> Path:
    """Where one run's result is kept; the name holds every setting the result depends on."""
    name = (f"{game.replace('/', '_')}-f{fraction:g}-{collector}-s{seed}-t{args.teacher_steps}-u{args.updates}"
            f"-w{args.warmup_steps}-e{args.eval_episodes}.json")
    return Path(args.runs_dir) / name


def job_run(game: str, fraction: float, collector: str, seed: int, args: OpdWinsControlArgs) -> dict:
    """One compression run: the student at `fraction` of the teacher, data from `collector`'s play. Written to
    `run_path` as soon as it finishes."""
    from opd.control.distill import PolicyDistillConfig, compression_student, distill_policy, teacher_parameters
    from opd.control.policies import Policy, count_parameters

    start = time.time()
    teacher = load_teacher(game, args.teacher_steps)
    student = Policy(compression_student(game, teacher_parameters(teacher), fraction))
    config = PolicyDistillConfig(loss="kl", temperature=0.01, updates=args.updates, eval_every=args.updates,
                                 warmup_steps=args.warmup_steps, eval_episodes=args.eval_episodes, seed=seed,
                                 collector=collector, progress=False)  # fmt: skip
    result = distill_policy({game: teacher}, config, student)
    row = {"game": game, "fraction": fraction, "collector": collector, "seed": seed,
           "student_params": count_parameters(result.student), "score": result.history[-1][f"return/{game}"],
           "states": result.history[-1]["states"], "seconds": round(time.time() - start, 1)}  # fmt: skip
    path = run_path(game, fraction, collector, seed, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row) + "\n")
    return row


def summarise(runs: list[dict], teachers: dict[str, dict], args: OpdWinsControlArgs) -> dict:
    """Per (game, fraction, collector): seeds, mean, sd, score / teacher; per (game, fraction): the paired gap
    student − teacher collector, its sd, the seed spread (the larger arm sd) and who is ahead beyond it, as
    benchmarks/opd_wins/report.compare does for the LM regimes."""
    rows = []
    for game in args.games:
        teacher_score = teachers[game]["score"]
        for fraction in args.fractions:
            arms = {}
            for collector in args.collectors:
                key = (game, fraction, collector)
                mine = sorted((r for r in runs if (r["game"], r["fraction"], r["collector"]) == key),
                              key=lambda r: r["seed"])  # fmt: skip
                scores = [r["score"] for r in mine]
                mean = statistics.mean(scores)
                ratio = mean / teacher_score if teacher_score else math.nan
                arms[collector] = {"seeds": [r["seed"] for r in mine], "scores": scores, "mean": mean,
                                   "std": sd(scores), "score_fraction": ratio,
                                   "student_params": mine[0]["student_params"],
                                   "seconds": [r["seconds"] for r in mine]}  # fmt: skip
            row = {"game": game, "param_fraction": fraction, "teacher_score": teacher_score, "collectors": arms}
            if {"teacher", "student"} <= set(arms):
                gaps = [s - t for s, t in zip(arms["student"]["scores"], arms["teacher"]["scores"])]
                spread = max(arms["student"]["std"], arms["teacher"]["std"])
                gap = statistics.mean(gaps)
                row |= {"gap_seeds": gaps, "gap_mean": gap, "gap_std": sd(gaps), "seed_spread": spread,
                        "onpolicy_wins_beyond_spread": gap > spread, "replay_wins_beyond_spread": -gap > spread}
            rows.append(row)
    return {"rows": rows}


def _reference(out_dir: Path) -> dict:
    """control.json's Rusu compression rows (teacher replay, same settings) by (game, fraction), if there."""
    path = out_dir / "control.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text()).get("rusu_compression", [])
    return {(r["game"], r["param_fraction"]): r for r in rows}


def markdown(results: dict) -> str:
    """The RESULTS.md section."""
    args = results["args"]
    out = ["## Where on-policy distillation wins, control: Rusu compression with the student's own play", ""]
    out += quick_banner(args["quick"])
    out += [f"KL τ = 0.01, {args['updates']} updates, warm-up {args['warmup_steps']} vector steps of teacher play, "
            f"{args['eval_episodes']} greedy evaluation episodes, seeds {list(args['seeds'])}. \"replay\": Rusu's "
            "replay of the teacher's ε-greedy play; \"on-policy\": after the warm-up the student acts (greedy, same "
            "ε = 0.05) and the teacher labels every visited state (DAgger aggregation). Gap = on-policy − replay "
            "paired by seed; spread = the larger of the two arms' seed sds; ahead = who leads by more than the "
            f"spread. Command: `{results['command']}`; {results['wall_seconds']:.0f} s wall on {args['workers']} "
            f"worker(s) of one thread ({results['runs_reused']} runs found finished and reused; "
            f"{results['run_seconds_total']:.0f} s in all runs); what else ran meanwhile: {args['other_load']}.", "",
            "| game | params / teacher | teacher | replay (mean ± sd; seeds) | on-policy (mean ± sd; seeds) | "
            "replay / teacher | on-policy / teacher | gap (seeds) | spread | ahead |",
            "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def cell(arm):
        return f"{arm['mean']:.1f} ± {arm['std']:.1f} ({', '.join(f'{s:.1f}' for s in arm['scores'])})"

    for r in results["rows"]:
        arms = r["collectors"]
        if "gap_mean" not in r:
            continue
        ahead = ("on-policy" if r["onpolicy_wins_beyond_spread"] else "replay" if r["replay_wins_beyond_spread"]
                 else "neither")  # fmt: skip
        out.append(f"| {r['game']} | {100 * r['param_fraction']:.0f} % ({arms['teacher']['student_params']}) | "
                   f"{r['teacher_score']:.1f} | {cell(arms['teacher'])} | {cell(arms['student'])} | "
                   f"{100 * arms['teacher']['score_fraction']:.0f} % | {100 * arms['student']['score_fraction']:.0f} % "
                   f"| {r['gap_mean']:+.1f} ({', '.join(f'{g:+.1f}' for g in r['gap_seeds'])}) | "
                   f"{r['seed_spread']:.1f} | {ahead} |")  # fmt: skip
    if results.get("control_reference"):
        out += ["", "control.json's Rusu rows (replay, same settings and cached teachers): " + "; ".join(
            f"{r['game']} {100 * r['param_fraction']:.0f} %: {r['student_score']:.1f} of {r['teacher_score']:.1f}"
            for r in results["control_reference"]) + ". Rusu et al. (Atari): 108 / 102 / 84 % at 25 / 7 / 4 %."]
    t = results["teachers"]
    out += ["", "Teachers (greedy, 20 episodes): " + "; ".join(
        f"{g} {v['score']:.1f} ({v['params']} params)" for g, v in t.items()) + "."]
    return "\n".join(out) + "\n"


def run(quick: bool, seeds: tuple[int, ...], workers: int, out_dir: str, **settings) -> tuple[dict, str]:
    """Every (game, fraction, collector, seed) run, summarised; writes opd_wins_control(_quick).json and .md into
    `out_dir`. `settings`: the other fields of `OpdWinsControlArgs`. Returns (json, markdown)."""
    args = OpdWinsControlArgs(quick=quick, seeds=tuple(seeds), workers=workers, out_dir=out_dir, **settings)
    command = command_line("opd_wins_control", args)
    args = _scale(args)
    unknown = set(args.collectors) - set(COLLECTORS)
    if unknown:
        raise ValueError(f"unknown collectors {sorted(unknown)}; choose from {', '.join(COLLECTORS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with ProcessPoolExecutor(workers, initializer=one_thread) as pool:
        # train/cache every teacher before the runs that load it
        teachers = {g: pool.submit(job_teacher, g, args.teacher_steps) for g in args.games}
        teachers = {g: f.result() for g, f in teachers.items()}
        keys = [(g, f, c, s) for g in args.games for f in args.fractions for s in args.seeds for c in args.collectors]
        done = {k: json.loads(run_path(*k, args).read_text()) for k in keys if run_path(*k, args).exists()}
        futures = {k: pool.submit(job_run, *k, args) for k in keys if k not in done}
        runs = [done[k] if k in done else futures[k].result() for k in keys]
    reference = _reference(out)
    results = {"args": asdict(args), "command": command, "wall_seconds": round(time.time() - start, 1),
               "runs_reused": len(done), "run_seconds_total": round(sum(r["seconds"] for r in runs), 1),
               "teachers": teachers, **summarise(runs, teachers, args), "runs": runs,
               "control_reference": [reference[g, f] for g in args.games for f in args.fractions
                                     if (g, f) in reference and not quick]}  # fmt: skip
    text = markdown(results)
    name = "opd_wins_control_quick" if quick else "opd_wins_control"
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{name}.md").write_text(text)
    return results, text


def main(args: OpdWinsControlArgs) -> dict:
    """CLI entry point: `run` with every field of `args`."""
    fields = asdict(args)
    return run(fields.pop("quick"), fields.pop("seeds"), fields.pop("workers"), fields.pop("out_dir"), **fields)[0]


if __name__ == "__main__":
    import tyro

    main(tyro.cli(OpdWinsControlArgs))
