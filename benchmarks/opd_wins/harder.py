"""The harder and noisy regimes of `opd bench opd_wins`: longer chains, where a student's early slip has longer to
compound.

The task is `arithmetic-long` (the same column-by-column addition with 5-7-digit operands: 5-7 dependent steps
instead of 2-4). Its teacher is the arithmetic task teacher fine-tuned on the longer problems, and its warm start
is the quickstart's warm start fine-tuned on them until it writes `harder_warm_target` of 200 training problems
exactly (the quickstart's stopping rule, on the new task). Both are cached like the quickstart's (they take minutes);
a `--quick` run keeps its own under its run directory. Then OPD and SFT run `harder_steps` updates on every seed.

The noisy regime is the same task and warm start under a teacher fine-tuned only `noisy_teacher_steps` (about 3 in 4
greedy answers right, far fewer temperature-1 samples), with a third arm: SFT on that teacher's greedy outputs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from benchmarks.opd_wins import report, runs
from opd.cache import cache_root
from opd.lm.recipes.supervised import save_teacher, stop_at_exact_match, train_supervised

VERSION = 1
"""Part of the cache keys: bump it when the preparation below changes."""


def _teacher_key(args, steps: int) -> str:
    return f"{args.harder_task}-teacher-steps{steps}-batch{args.teacher_batch_size}-lr{args.teacher_lr:g}-v{VERSION}"


def _warm_key(args) -> str:
    return (f"{args.harder_task}-warm-steps{args.harder_warm_steps}-lr{args.harder_warm_lr:g}"
            f"-target{args.harder_warm_target:g}-v{VERSION}")


REGIMES = {"harder": "harder_teacher_steps", "noisy": "noisy_teacher_steps"}
"""Regime -> the argument with its teacher's fine-tuning steps: a teacher trained to 100 % on the longer problems,
and one stopped halfway (right greedy answers on about 3 in 4 problems, far fewer right samples)."""


def prepare(args, paths: dict) -> dict:
    """The teachers of the regimes `args.parts` names and their shared warm start on disk (made, or found in the
    cache); returns their paths."""
    root = Path(args.out_dir) / "harder" if args.quick else cache_root() / "opd_wins-harder"
    out = {"harder_warm": root / _warm_key(args)}
    for regime, steps in REGIMES.items():
        if regime in args.parts:
            out[f"{regime}_teacher"] = root / _teacher_key(args, getattr(args, steps))
            if not (out[f"{regime}_teacher"] / "info.json").is_file():
                _extend_teacher(args, Path(paths["teacher"]), out[f"{regime}_teacher"], getattr(args, steps))
    if not (out["harder_warm"] / "warm_start.json").is_file():
        _extend_student(args, Path(paths["warm"]), out["harder_warm"])
    return out


def _extend_teacher(args, base: Path, out: Path, steps: int) -> None:
    """The task teacher, fine-tuned on the longer problems (warm-up, cosine decay); its held-out accuracy and how
    often its temperature-1 samples are the true solutions go into info.json."""
    from opd.lm.eval import accuracy
    from opd.lm.hf.model import load_model, load_tokenizer
    from opd.lm.recipes.recovery import sample_match_rate
    from opd.tasks import get_task

    task, model, tokenizer = get_task(args.harder_task), load_model(str(base)), load_tokenizer(str(base))
    examples = task.examples(steps * args.teacher_batch_size, seed=0, split="train")
    start = time.perf_counter()
    losses = train_supervised(model, tokenizer, examples, steps, args.teacher_batch_size,
                              args.teacher_lr, seed=0, progress=False)
    seconds = time.perf_counter() - start
    held_out = task.examples(args.probe_examples, seed=0, split="test")
    info = {"task": args.harder_task, "base": str(base), "steps": steps,
            "batch_size": args.teacher_batch_size, "lr": args.teacher_lr, "final_loss": losses[-1],
            "train_wall_s": round(seconds, 1), "test_examples": len(held_out),
            "test_accuracy": accuracy(model, tokenizer, task, held_out, max_new_tokens=args.harder_max_new_tokens),
            "sample_is_true_solution": sample_match_rate(model, tokenizer, held_out, args.harder_max_new_tokens)}
    save_teacher(model, tokenizer, info, out)


def _extend_student(args, base: Path, out: Path) -> None:
    """The quickstart's warm start, fine-tuned on the longer problems until it writes `harder_warm_target` of 200
    training problems exactly (checked every 20 steps), at most `harder_warm_steps` steps."""
    from opd.lm.hf.model import load_model, load_tokenizer
    from opd.tasks import get_task

    task, model, tokenizer = get_task(args.harder_task), load_model(str(base)), load_tokenizer(str(base))
    examples = task.examples(args.harder_warm_steps * 64, seed=1, split="train")
    probe = task.examples(200, seed=2, split="train")
    stop = stop_at_exact_match(model, tokenizer, probe, args.harder_warm_target, every=20)
    losses = train_supervised(model, tokenizer, examples, args.harder_warm_steps, 64, args.harder_warm_lr, seed=0,
                              progress=False, should_stop=stop)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "warm_start.json").write_text(json.dumps({"steps_done": len(losses), "final_loss": losses[-1]}) + "\n")


def sft_source(args, teacher: Path) -> str:
    """`args.sft_source`, unless that is "data" and the teacher's samples are not (nearly all) the true solutions:
    then SFT learns from the teacher's own samples ("teacher"), which is what the comparison is about."""
    info = json.loads((Path(teacher) / "info.json").read_text())
    return "teacher" if info["sample_is_true_solution"] < args.min_sample_match else args.sft_source


ARMS = {"opd": ("opd", 1.0), "sft": ("sft", 1.0), "sft_greedy": ("sft", 0.0)}
"""Arm -> (method, sampling temperature). sft_greedy, SFT on the teacher's greedy outputs (Kim & Rush's
sequence-level KD), runs in the noisy regime only: there the teacher's samples and its greedy answers differ."""


def _arms(regime: str) -> list[str]:
    return list(ARMS) if regime == "noisy" else ["opd", "sft"]


def _steps(args, regime: str) -> int:
    return args.harder_steps if regime == "harder" else args.noisy_steps


def plan(args, paths: dict) -> dict:
    """key -> (runs.train, (run,), ()) for every arm of every regime `args.parts` names, on every seed."""
    out = {}
    for regime in (r for r in REGIMES if r in args.parts):
        teacher = paths[f"{regime}_teacher"]
        for seed in args.seeds:
            for arm in _arms(regime):
                method, temperature = ARMS[arm]
                cfg = runs.method_config(args, method, student=paths["harder_warm"], teacher=teacher, seed=seed,
                                         out_dir=paths["runs"] / regime / f"seed-{seed}" / arm,
                                         steps=_steps(args, regime), temperature=temperature, task=args.harder_task,
                                         max_new_tokens=args.harder_max_new_tokens)
                if method == "sft":
                    source = "teacher" if arm == "sft_greedy" else sft_source(args, teacher)
                    cfg = dataclasses.replace(cfg, source=source)
                out[(regime, arm, seed)] = (runs.train, (runs.Run(cfg, val_examples=args.val_examples),), ())
    return out


def by_chain_length(args, model_dir: Path) -> dict[int, float]:
    """Greedy accuracy on `probe_examples` test problems, by the number of column steps in the solution: if errors
    compound, accuracy falls with length, and a method that recovers better should fall more slowly."""
    from opd.lm.eval import generate_greedy
    from opd.lm.hf.model import load_model, load_tokenizer
    from opd.tasks import get_task

    task, model, tokenizer = get_task(args.harder_task), load_model(str(model_dir)), load_tokenizer(str(model_dir))
    problems = task.examples(args.probe_examples, seed=0, split="test")
    completions = generate_greedy(model, tokenizer, [e.prompt for e in problems], args.harder_max_new_tokens)
    right: dict[int, list[bool]] = {}
    for e, c in zip(problems, completions):
        right.setdefault(e.completion.count("="), []).append(task.is_correct(e, c))
    return {steps - 1: sum(r) / len(r) for steps, r in sorted(right.items())}  # the "ans=" is not a step


DESCRIPTIONS = {"harder": "{task} (5-7-digit operands: longer chains), {steps} updates",
                "noisy": "{task} under a half-trained teacher (noisy samples), {steps} updates"}


def summarise(args, paths: dict) -> dict[str, tuple[dict, dict]]:
    """regime -> (its `compare` entry, its teacher's and warm start's info) for the regimes `args.parts` names. An
    entry adds the warm start's accuracy, accuracy by chain length and, for the noisy regime, SFT on the teacher's
    greedy outputs. The shared warm start is scored once."""
    start, start_val = report.start_accuracies(args, paths["harder_warm"], args.harder_task, args.harder_max_new_tokens)
    warm = json.loads((Path(paths["harder_warm"]) / "warm_start.json").read_text())
    warm |= {"test_accuracy": start, "val_accuracy": start_val}
    warm_by_length = by_chain_length(args, paths["harder_warm"])
    label = {k: v["label"] for k, v in runs.METHODS.items()}
    out = {}
    for regime in (r for r in REGIMES if r in args.parts):
        teacher, steps = Path(paths[f"{regime}_teacher"]), _steps(args, regime)
        run_dir = lambda arm, seed: paths["runs"] / regime / f"seed-{seed}" / arm  # noqa: E731
        curves = {arm: [runs.read_run(run_dir(arm, seed), start, start_val) for seed in args.seeds]
                  for arm in _arms(regime)}
        entry = report.compare(DESCRIPTIONS[regime].format(task=args.harder_task, steps=steps), steps,
                               {m: {"label": label[m], "curves": curves[m]} for m in runs.METHODS})
        entry["student_start_accuracy"] = start
        entry["sft_source"] = sft_source(args, teacher)
        if "sft_greedy" in curves:
            seeds = [runs.accuracy_at(c, steps) for c in curves["sft_greedy"]]
            entry["sft_greedy_same_step"] = {"label": "SFT on the teacher's greedy outputs", "seeds": seeds,
                                             "mean": sum(seeds) / len(seeds)}
        entry["accuracy_by_chain_length"] = {"warm start": warm_by_length} | {
            arm: [by_chain_length(args, run_dir(arm, seed) / "checkpoint") for seed in args.seeds] for arm in curves}
        out[regime] = entry, {"teacher": json.loads((teacher / "info.json").read_text()), "warm_start": warm}
    return out
