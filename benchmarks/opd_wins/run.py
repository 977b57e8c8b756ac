"""`opd bench opd_wins`: where on-policy distillation beats SFT on teacher samples, and where it does not.

From the quickstart's warm-started student, teacher and settings (batch 32, learning rate 1e-3), regimes that the
seed's claim says should favour on-policy distillation (OPD: the student samples, per-token reverse KL to the
teacher) over SFT on the teacher's samples, each measured on the same seeds:

- long:     both methods for `steps` updates (the quickstart stops at 200), whole curves;
- plateau:  from the SFT run's checkpoint at `plateau_at` updates, `extra_steps` more updates of OPD or of SFT (equal
            extra updates; the long runs are trained to `plateau_at` first, then extended to `steps`);
- recovery: OPD and SFT under a teacher fine-tuned on noisy prefixes (DART-style, `opd.lm.recipes.recovery`), after
            measuring how often each teacher recovers from a student's wrong prefix;
- sweep:    a learning-rate (and, for OPD, sampling-temperature) sweep on a validation split, 1 seed;
- tuned:    the sweep, then both methods at their chosen values on every seed;
- harder:   longer chains (5-7-digit addition, `harder.py`), where compounding errors matter more;
- noisy:    the same, under a half-trained teacher whose temperature-1 samples are often wrong (and SFT on its greedy
            outputs as a third arm).

Writes `results_dir`/opd_wins.json (one entry per regime: each method's final test accuracy per seed, the paired
gap OPD − SFT, the seed spread, the curves), opd_wins.md and opd_wins*.png; the hand-written reading is
opd_wins_notes.md. Runs go to `out_dir`; a finished run found there is reused. `--quick` checks the plumbing in a
minute or two (its numbers mean nothing; files named opd_wins_quick.*).

    opd bench opd_wins            # the full benchmark (about 1.5 h on 2 cores other jobs shared)
    opd bench opd_wins --quick
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

from benchmarks.common.command import command_line
from benchmarks.common.jobs import in_worker
from benchmarks.opd_wins import harder, report, runs
from benchmarks.opd_wins.args import PARTS, QUICK, OpdWinsArgs
from opd.cache import cache_root
from opd.lm.recipes.supervised import get_teacher, warm_start_student


def opd_wins(args: OpdWinsArgs) -> dict:
    """Run the regimes `args.parts` names and write the results files; returns the results."""
    command = command_line("opd_wins", args)
    if args.quick:  # its runs go next to the real ones, never over them
        args = dataclasses.replace(args, **QUICK, out_dir=args.out_dir.rstrip("/") + "-quick")
    _check(args)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out_dir)
    paths = _prepare(args, out)
    plan = make_plan(args, paths)
    reused = sum(fn is runs.train and runs.finished(fn_args[0]) for fn, fn_args, _ in plan.values())
    execute(plan, args.workers, args.threads)
    chosen = report.sweep_choice(args, paths) if {"sweep", "tuned"} & set(args.parts) else None
    if "tuned" in args.parts:  # the second round waits for the sweep's validation numbers
        execute(tuned_plan(args, paths, chosen), args.workers, args.threads)
    results = report.summarise(args, paths, chosen)
    for regime, (entry, setup) in harder.summarise(args, paths).items():
        results["regimes"][regime], results[f"{regime}_setup"] = entry, setup
    results.update(wall_seconds_total=round(time.perf_counter() - t0, 1), args=dataclasses.asdict(args),
                   command=command, runs_reused=reused)
    report.write_all(results, Path(args.results_dir))
    return results


def _check(args: OpdWinsArgs) -> None:
    unknown = set(args.parts) - set(PARTS)
    if unknown or not args.parts:
        raise ValueError(f"parts must be some of {', '.join(PARTS)}; got {args.parts}")
    for name in ("steps", "extra_steps", "recovery_steps", "sweep_steps", "tuned_steps", "harder_steps",
                 "noisy_steps"):
        if getattr(args, name) % args.eval_every:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be a multiple of --eval-every "
                             f"{args.eval_every} (the regimes compare evaluations)")
    if max(args.recovery_steps, args.sweep_steps, args.tuned_steps, _plateau_at(args)) > args.steps:
        raise ValueError("recovery, sweep and tuned steps and --plateau-at must not exceed --steps: they are read "
                         "from (or branch off) the long runs")
    if _plateau_at(args) % args.eval_every:
        raise ValueError(f"--plateau-at {args.plateau_at} must be a multiple of --eval-every {args.eval_every}")


def _plateau_at(args: OpdWinsArgs) -> int:
    return args.steps if args.plateau_at is None else args.plateau_at


def _prepare(args: OpdWinsArgs, out: Path) -> dict:
    """The teacher and the warm start on disk (the warm start cached as the quickstart's is)."""
    teacher, tokenizer, _ = get_teacher(progress=False)
    paths = {"teacher": out / "teacher", "warm": out / "warm-start", "runs": out / "runs",
             # the recovery teacher is as expensive as a warm start: cached with them, except a --quick one
             "recovery_teacher": out / "recovery-teacher" if args.quick else
             cache_root() / "arithmetic-teacher-recovery"}
    teacher.save_pretrained(paths["teacher"])
    tokenizer.save_pretrained(paths["teacher"])
    student = warm_start_student(tokenizer, seed=args.warm_start_seed, steps=args.warm_start_steps,
                                 use_cache=not args.quick, progress=False)
    student.save_pretrained(paths["warm"])
    tokenizer.save_pretrained(paths["warm"])
    if set(harder.REGIMES) & set(args.parts):
        paths |= harder.prepare(args, paths)
    return paths


def make_plan(args: OpdWinsArgs, paths: dict) -> dict:
    """key -> (function, arguments, keys it waits for): every run and the recovery teacher's training."""
    plan = {}
    cfg = lambda method, seed, out_dir, steps, **kw: runs.method_config(  # noqa: E731
        args, method, student=paths["warm"], teacher=paths["teacher"], seed=seed, out_dir=out_dir, steps=steps, **kw)
    at = _plateau_at(args) if "plateau" in args.parts else args.steps
    for seed in args.seeds:
        for method in runs.METHODS:
            long = lambda steps: runs.Run(  # noqa: E731
                cfg(method, seed, paths["runs"] / "long" / f"seed-{seed}" / method, steps),
                val_examples=args.val_examples)
            if at < args.steps:  # to the branch point, then (once the branches copied its checkpoint) extended
                plan[("long_to_plateau", method, seed)] = (runs.train, (long(at),), ())
                after = [("long_to_plateau", method, seed)] + [("plateau", m, seed) for m in runs.METHODS
                                                               if method == "sft"]
                plan[("long", method, seed)] = (runs.train, (long(args.steps),), tuple(after))
            else:
                plan[("long", method, seed)] = (runs.train, (long(args.steps),), ())
    if "plateau" in args.parts:
        for seed in args.seeds:
            base = paths["runs"] / "long" / f"seed-{seed}" / "sft"
            first = ("long_to_plateau" if at < args.steps else "long", "sft", seed)
            for method in runs.METHODS:
                run = runs.Run(cfg(method, seed, paths["runs"] / "plateau" / f"seed-{seed}" / f"sft-then-{method}",
                                   at + args.extra_steps),
                               branch_from=str(base), start_step=at, val_examples=args.val_examples)
                plan[("plateau", method, seed)] = (runs.train, (run,), (first,))
    if "recovery" in args.parts:
        plan[("recovery_teacher",)] = (train_recovery_teacher, (args, paths), ())
        for seed in args.seeds:
            for method in runs.METHODS:
                # SFT on the recovery teacher's own samples: they are not all the true solutions (the probe says how
                # many are), so sft_source does not apply here
                run = runs.Run(dataclasses.replace(
                    cfg(method, seed, paths["runs"] / "recovery" / f"seed-{seed}" / method, args.recovery_steps),
                    teacher=str(paths["recovery_teacher"]), source=runs.METHODS[method]["source"]),
                    val_examples=args.val_examples)
                plan[("recovery", method, seed)] = (runs.train, (run,), (("recovery_teacher",),))
    plan |= harder.plan(args, paths)
    if {"sweep", "tuned"} & set(args.parts):
        for method, lr, temperature in runs.sweep_points(args):
            if (lr, temperature) == (args.lr, 1.0):
                continue  # read from the long run of the sweep's seed (constant schedule: the same run)
            out_dir = paths["runs"] / "sweep" / runs.point_name(method, lr, temperature)
            run = runs.Run(cfg(method, args.sweep_seed, out_dir, args.sweep_steps, lr=lr, temperature=temperature),
                           val_examples=args.val_examples)
            plan[("sweep", method, lr, temperature)] = (runs.train, (run,), ())
    return plan


def tuned_plan(args: OpdWinsArgs, paths: dict, chosen: dict) -> dict:
    """The tuned regime's runs for the settings the sweep chose (methods at the defaults reuse the long runs)."""
    plan = {}
    for method, (lr, temperature) in chosen.items():
        if (lr, temperature) == (args.lr, 1.0):
            continue
        for seed in args.seeds:
            out_dir = paths["runs"] / "tuned" / f"seed-{seed}" / runs.point_name(method, lr, temperature)
            run = runs.Run(runs.method_config(args, method, student=paths["warm"], teacher=paths["teacher"], seed=seed,
                                              out_dir=out_dir, steps=args.tuned_steps, lr=lr, temperature=temperature),
                           val_examples=args.val_examples)
            plan[("tuned", method, seed)] = (runs.train, (run,), ())
    return plan


def train_recovery_teacher(args: OpdWinsArgs, paths: dict) -> None:
    from opd.lm.recipes.recovery import recovery_teacher

    recovery_teacher(paths["teacher"], Path(paths["recovery_teacher"]), args.teacher_steps, args.teacher_batch_size,
                     args.teacher_lr, args.corrupt_share, progress=False)


def execute(plan: dict, workers: int, threads: int) -> None:
    """Run every job of `plan` once the jobs it waits for are done, `workers` at a time in their own processes
    (one after the other in this process when workers <= 1). A failed job's exception is re-raised here."""
    # longest first, so that the workers finish together; SFT first among equals, since the plateau runs wait for it
    order = sorted(plan, key=lambda key: (-_length(plan[key]), "sft" not in key))
    if workers <= 1:
        done: set = set()
        while len(done) < len(plan):
            key = next(k for k in order if k not in done and set(plan[k][2]) <= done)
            plan[key][0](*plan[key][1])
            done.add(key)
        return
    context = multiprocessing.get_context("spawn")  # fork after torch has started threads is unsafe
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        done, running = set(), {}
        while len(done) < len(plan):
            for key in order:
                if key not in done and key not in running.values() and set(plan[key][2]) <= done \
                        and len(running) < workers:
                    running[pool.submit(in_worker, threads, plan[key][0], plan[key][1])] = key
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                future.result()
                done.add(running.pop(future))


def _length(job) -> float:
    fn, fn_args, _ = job
    # the recovery teacher first: runs wait for it
    return fn_args[0].cfg.steps - fn_args[0].start_step if fn is runs.train else 1e9


def opd_wins_main(args: OpdWinsArgs) -> None:
    """CLI: run the benchmark and print the markdown section it wrote (`opd bench` then rebuilds RESULTS.md)."""
    opd_wins(args)
    print((Path(args.results_dir) / report.output_names(args.quick)["md"]).read_text())


if __name__ == "__main__":
    import tyro

    opd_wins_main(tyro.cli(OpdWinsArgs))
