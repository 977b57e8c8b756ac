"""How the cost of a train step grows with completion length, vocabulary and model size: opd against TRL 1.16's
`DistillationTrainer`, same settings (reverse KL, batch 1, fp32, the same learning rate and fixed completions).

    opd bench scale                # the full run, about 40 minutes on 2 cores (an estimate is printed first)
    opd bench scale --quick        # plumbing check on tiny random models, about two minutes
    opd bench scale --dry-run      # the plan and its time estimate, nothing run

Sweeps (each point a worker process of its own, `benchmarks/scale/worker.py`, watched under a memory cap):
- length: SmolLM2-135M-Instruct teaching its 4-layer cut at `lengths` completion tokens; every system of `systems` at
  every length, the arms of `arm_systems` at `arm_lengths`, and sampling alone (`opd_sampling`) at `sampling_lengths`;
- vocabulary at `vocab_length` tokens: 49,152 (the SmolLM2 pair), 151,936 (random Qwen3-shaped models), 262,144 (Gemma
  3 270M and its cut);
- model size at `size_length` tokens: random Llama students of about 0.1B and 0.5B parameters under a 1B teacher.

Writes `results_dir`/scale.json, scale.md (a section for RESULTS.md: tables, fitted exponents, the goals) and the plots
scale_length.png and scale_vocab.png; model directories and per-point logs go to `out_dir`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from benchmarks.common.command import command_line
from benchmarks.common.measure import matmul_gflops
from benchmarks.common.results import write
from benchmarks.perf.report import machine
from benchmarks.scale import models, points, report
from benchmarks.scale.worker import STEP_SYSTEMS

ESTIMATED_MFU = {"opd": 0.7, "opd_topk": 0.2, "opd_hidden": 0.5, "opd_gc": 0.5, "opd_budget": 0.7,
                 "trl_distillation": 0.8}
"""What share of the matmul peak each system's step reached at the 1,024-token SmolLM2 point on 2 shared cores (the
top-k teacher's server computes full logits and JSON, uncounted): only for the time estimate printed before a run."""
OVERHEAD_S = {"opd_topk": 30.0, "opd_hidden": 30.0}
"""Seconds a point spends outside its steps (start, imports, loading; an `opd serve` for the remote teachers)."""
DEFAULT_OVERHEAD_S = 15.0
SAMPLING_TOKENS_PER_S = 20.0
"""Sampling speed of the SmolLM2 cut on 2 shared cores (per-token overhead dominates), for the estimate."""


@dataclass(frozen=True)
class ScaleArgs:
    """The scaling benchmark; the defaults are the full run."""

    quick: bool = False
    """Plumbing check: tiny random models, two short lengths, one vocabulary and one size point (numbers mean
    nothing)."""
    dry_run: bool = False
    """Print the points and the time estimate, run nothing."""
    lengths: tuple[int, ...] = (256, 1024, 2048, 4096, 8192)
    """Completion lengths of the length sweep (one past the context is recorded as not run, with the reason)."""
    systems: tuple[str, ...] = ("opd", "trl_distillation")
    """Systems run at every length (and at every vocabulary point)."""
    arm_systems: tuple[str, ...] = ("opd_topk", "opd_gc", "opd_budget")
    """Systems run at `arm_lengths` only: the top-k server teacher and the lever arms. `opd_hidden` (a hidden-state
    server teacher) is left out of the full run to fit its 40 minutes: its loss is opd's own, on the same hidden
    states, and what its transport costs is `opd bench remote_hidden`'s measurement."""
    arm_lengths: tuple[int, ...] = (1024, 2048)
    """Lengths of the arms (two, so that their exponent can be fitted; not 4096, to fit the full run's 40 minutes)."""
    budget_rows: int = 2
    """Rows of `opd_budget`'s batch, in micro-batches of one row each (a budget must hold a whole row: at batch 1 it has
    nothing to split). Its tokens/s counts every row."""
    sampling_lengths: tuple[int, ...] = (256, 1024)
    """Lengths at which the student's sampling is timed (`opd_sampling`)."""
    vocab_pairs: tuple[str, ...] = ("qwen", "gemma")
    """Vocabulary points besides SmolLM2's 49,152 (taken from the length sweep): `qwen` 151,936, `gemma` 262,144."""
    vocab_length: int = 1024
    """Completion length of the vocabulary sweep."""
    sizes: tuple[str, ...] = ("0.1B", "0.5B")
    """Students of the model-size sweep (`benchmarks.scale.models.SIZE_STUDENTS`), each under the 1B teacher."""
    size_systems: tuple[str, ...] = ("opd", "trl_distillation")
    """Systems of the model-size sweep."""
    size_length: int = 1024
    """Completion length of the model-size sweep."""
    warmup: int = 1
    """Untimed steps first (optimizer state, allocator growth)."""
    steps: int = 2
    """Timed steps per point."""
    sampling_steps: int = 1
    """Timed samples per sampling point (each is `length` tokens already)."""
    lr: float = 1e-5
    """AdamW learning rate, constant, for every system."""
    threads: int = 2
    """torch threads of every worker (and of the matmul-peak measurement)."""
    memory_cap_gib: float = 20.0
    """A point whose processes hold more RSS than this together is stopped and recorded as out of memory."""
    timeout_s: int = 1500
    """Longest a single point may run."""
    out_dir: str = "runs/scale"
    """Model directories and per-point work files."""
    results_dir: str = "benchmarks/results"
    """Where scale.json, scale.md and the plots go."""


QUICK = {"lengths": (32, 64, 8192), "systems": ("opd", "trl_distillation"),
         "arm_systems": ("opd_topk", "opd_hidden", "opd_gc", "opd_budget"), "arm_lengths": (64,),
         "sampling_lengths": (32,), "vocab_pairs": ("quick",), "vocab_length": 64, "sizes": ("tiny",),
         "size_length": 64, "steps": 1, "threads": 1}
"""What `--quick` overrides: every system once, opd and TRL at two lengths (each point starts a process, 5-15 s) and
at one past the models' context (a row saying so, nothing run)."""
QUICK_VOCAB = (1024, 2048)
"""--quick: the vocabulary of the length sweep's pair and of the one vocabulary point."""


def command(args: ScaleArgs) -> str:
    """The command line that reproduces `args` (flags that differ from the defaults; not those --quick sets)."""
    return command_line("scale", args, skip=QUICK if args.quick else ())


def plan(args: ScaleArgs, root: Path) -> list[tuple[str, dict, dict]]:
    """(sweep, pair, the point's spec) of every point to run, in order; builds the model directories."""
    common = {"warmup": args.warmup, "steps": args.steps, "threads": args.threads, "lr": args.lr}
    length_pair = models.quick_pair(root, QUICK_VOCAB[0]) if args.quick else models.smollm2_pair(root)
    rows = {"opd_budget": args.budget_rows}
    todo = [("length", length_pair, points.spec(s, length_pair, n, **common, batch_size=rows.get(s, 1)))
            for n in args.lengths for s in (*args.systems, *(args.arm_systems if n in args.arm_lengths else ()))]
    todo += [("length", length_pair, points.spec("opd_sampling", length_pair, n, **common | {
        "warmup": 0, "steps": args.sampling_steps})) for n in args.sampling_lengths]
    if args.vocab_length not in args.lengths:  # else the length sweep's point is the vocabulary sweep's first
        todo += [("vocab", length_pair, points.spec(s, length_pair, args.vocab_length, **common))
                 for s in args.systems]
    builders = {"qwen": models.qwen_vocab_pair, "gemma": models.gemma_pair,
                "quick": lambda r: models.quick_pair(r, QUICK_VOCAB[1], "qwen3")}
    for name in args.vocab_pairs:
        pair = builders[name](root)
        todo += [("vocab", pair, points.spec(s, pair, args.vocab_length, **common)) for s in args.systems]
    for pair in models.size_pairs(root, args.sizes, args.quick).values():
        todo += [("model_size", pair, points.spec(s, pair, args.size_length, **common)) for s in args.size_systems]
    return todo


def estimate_s(pair: dict, point: dict, peak_gflops: float) -> float:
    """About how long `point` takes: its steps' FLOPs at the share of the peak in `ESTIMATED_MFU`, plus overhead."""
    from benchmarks.scale.worker import meta_model, step_flops

    n = point["warmup"] + point["steps"]
    if point["system"] == "opd_sampling":
        return DEFAULT_OVERHEAD_S + n * point["length"] * point["batch_size"] / SAMPLING_TOKENS_PER_S
    flops = step_flops(meta_model(pair["student"]), meta_model(pair["teacher"]), 16,
                       [[0] * point["length"]] * point["batch_size"])
    seconds = n * flops / (ESTIMATED_MFU[point["system"]] * peak_gflops * 1e9)
    return OVERHEAD_S.get(point["system"], DEFAULT_OVERHEAD_S) + seconds


def keyed(row: dict, sweep: str, pair: dict) -> dict:
    """`row` with its sweep's value in front (`length`, `vocab` or `params`) and the pair it ran on."""
    key = {"length": {"length": row["length"]}, "vocab": {"vocab": pair["vocab"]},
           "model_size": {"params": pair["student_params"], "teacher_params": pair["teacher_params"]}}[sweep]
    return {"system": row["system"], **key, **row, "pair": pair["description"]}


def scale(args: ScaleArgs) -> dict:
    """Run the benchmark `args` describes; write scale.json, scale.md and the plots; returns the results."""
    if args.quick:
        args = dataclasses.replace(args, **QUICK)
    unknown = set(args.systems + args.arm_systems + args.size_systems) - set(STEP_SYSTEMS)
    if unknown or set(args.vocab_pairs) - {"qwen", "gemma", "quick"}:
        raise ValueError(f"systems must be among {STEP_SYSTEMS} (opd_sampling runs at sampling_lengths) and "
                         f"vocab_pairs among qwen, gemma; got {sorted(unknown)}, {args.vocab_pairs}")
    from opd.lm.hf.model import context_length, load_tokenizer

    root, work = Path(args.out_dir) / "models", Path(args.out_dir) / "points"
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    todo = plan(args, root)
    peak = matmul_gflops(args.threads)
    skip = [points.context_failure(point, min(context_length(pair["student"]), context_length(pair["teacher"])),
                                   len(load_tokenizer(pair["student"])(text=point["prompt"])["input_ids"]))
            for _, pair, point in todo]
    estimates = [0.0 if why else estimate_s(pair, point, peak) for (_, pair, point), why in zip(todo, skip)]
    print(f"scale: {len(todo)} points, about {sum(estimates) / 60:.0f} min at the measured fp32 matmul peak of "
          f"{peak:.0f} GFLOP/s ({args.threads} threads)", flush=True)
    if args.dry_run:
        for (sweep, pair, point), est, why in zip(todo, estimates, skip):
            print(f"  {sweep} {point['system']} L={point['length']} ({pair['description']}): "
                  f"{why or f'~{est:.0f} s'}")
        return {}
    results = {"quick": args.quick, "command": command(args), "args": dataclasses.asdict(args),
               "machine": machine(args.threads), "matmul_gflops": peak, "estimate_s": sum(estimates),
               "length": [], "vocab": [], "model_size": []}
    for i, ((sweep, pair, point), est, why) in enumerate(zip(todo, estimates, skip)):
        name = f"{sweep}-{i:02d}-{point['system']}-L{point['length']}"
        if why:
            row = {"system": point["system"], "length": point["length"], "failed": why}
        else:
            row = points.run_point(point, work, name, args.memory_cap_gib * 1024, args.timeout_s, peak)
        results[sweep].append(keyed(row, sweep, pair))
        print(f"  {name}: {report.one_line(row)} (estimated {est:.0f} s)", flush=True)
    length_pair = next((pair for sweep, pair, _ in todo if sweep == "length"), None)
    results["vocab"] = [keyed(r, "vocab", length_pair) for r in results["length"]
                        if r["length"] == args.vocab_length and r["system"] in args.systems] + results["vocab"]
    results["wall_s"] = time.perf_counter() - started
    results["matmul_gflops_end"] = matmul_gflops(args.threads)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["exponents"] = report.exponents(results["length"])
    results["goals"] = report.goals(results)
    out = Path(args.results_dir)
    write("scale", results, report.markdown, args.quick, out)
    if not args.quick:
        report.plot_length(results, out / "scale_length.png")
        report.plot_vocab(results, out / "scale_vocab.png")
    return results


if __name__ == "__main__":
    scale(tyro.cli(ScaleArgs))
