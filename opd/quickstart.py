"""`opd quickstart`: from nothing to a table — teacher, student before, after on-policy distillation, after SFT.

The teacher comes from the package (committed checkpoint, reproduced by `opd teacher`) or is trained and cached;
a small student is warm-started once with a little SFT on ground truth; for each seed it then spends the same number
of updates on (a) on-policy distillation: the student samples, the teacher scores every token, per-token reverse KL; and
(b) SFT on teacher samples: the teacher samples, the student imitates them with cross-entropy.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from opd.args import QuickstartArgs  # noqa: F401 (re-exported: it lives with the other commands' settings)
from opd.config import DistillConfig, OptimArgs, SamplingArgs
from opd.lm.eval import accuracy
from opd.lm.hf.model import library_bars
from opd.lm.train import distill
from opd.tasks import get_task
from opd.lm.recipes.supervised import ASSETS_DIR, get_teacher, warm_start_student
from opd.tasks.models import num_params


METHODS = {
    "on-policy distillation": dict(source="student", loss="reverse_kl"),
    "SFT on teacher samples": dict(source="teacher", loss="sft"),
}

LOSS_NOTES = {"on-policy distillation": "per-token reverse KL"}
"""What the table says about a method's loss besides its name (SFT's cross-entropy goes without saying)."""


def quickstart(args: QuickstartArgs) -> dict:
    """Run the comparison, print the table, write out_dir/results.json; returns the results."""
    # Dozens of small models load and save here: transformers' per-file bars would bury the table's progress.
    with library_bars(False):
        return _quickstart(args)


def _quickstart(args: QuickstartArgs) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out_dir)
    teacher, tokenizer, info = get_teacher()
    teacher_dir = out / "teacher"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    task = get_task("arithmetic")
    test = task.examples(args.eval_examples, seed=0, split="test")
    results = {"teacher": accuracy(teacher, tokenizer, task, test), **{m: [] for m in METHODS},
               "seeds": list(args.seeds), "teacher params": num_params(teacher),
               # get_teacher's first choice is the committed checkpoint
               "teacher shipped": (ASSETS_DIR / "arithmetic-teacher" / "info.json").is_file()}
    # Every method and seed starts from the same student, so the comparison isolates who acts and the loss.
    student = warm_start_student(tokenizer, seed=args.warm_start_seed, steps=args.warm_start_steps)
    init_dir = out / "warm-start"
    student.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    results["student before"] = accuracy(student, tokenizer, task, test)
    results["student params"] = num_params(student)
    runs = [(seed, name, choice) for seed in args.seeds for name, choice in METHODS.items()]
    for k, (seed, name, choice) in enumerate(runs):
        # One overall line per run; each run's bar is labelled with its method and seed.
        print(f"[{k + 1}/{len(runs)}] {name}, seed {seed} ({time.perf_counter() - t0:.0f} s so far)", flush=True)
        cfg = DistillConfig(
            student=str(init_dir), teacher=str(teacher_dir), steps=args.steps, batch_size=args.batch_size,
            sampling=SamplingArgs(max_new_tokens=56), optim=OptimArgs(lr=args.lr), eval_every=args.steps,
            eval_examples=args.eval_examples, save_every=args.steps, seed=seed,
            out_dir=str(out / f"seed-{seed}" / choice["source"]), **choice,
        )
        results[name].append(distill(cfg)["accuracy"])
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    results["args"] = dataclasses.asdict(args)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    return results


def _label(name: str, *details: str | None) -> str:
    """`name (detail, detail)`, leaving out the details that are None; just `name` if all are."""
    kept = [d for d in details if d]
    return f"{name} ({', '.join(kept)})" if kept else name


def _params(n: int | None) -> str | None:
    return None if n is None else f"{n / 1e6:.2f}M params"


def format_table(results: dict) -> str:
    """A markdown table: mean ± std over seeds (and the per-seed values) for each row.

    The row labels are the README's: each model's size and how it was made (details a results.json written by an
    older version lacks are left out).
    """
    args = results.get("args", {})
    steps = args.get("steps")
    updates = None if steps is None else f"{steps} updates"
    problems = args.get("eval_examples")
    header = _label("held-out accuracy", None if problems is None else f"{problems} problems")
    lines = [f"| model | {header} | per seed |", "|---|---|---|"]
    shipped = "ships in `opd/assets/`" if results.get("teacher shipped") else None
    teacher = _label("teacher", _params(results.get("teacher params")), shipped)
    lines.append(f"| {teacher} | {results['teacher']:.3f} | |")
    student = _label(
        "student before", _params(results.get("student params")),
        "SFT on ground truth until 20 % on training problems",
    )
    lines.append(f"| {student} | {results['student before']:.3f} | |")
    for name in METHODS:
        vals = results[name]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row = _label(name, updates, LOSS_NOTES.get(name))
        lines.append(f"| {row} | {statistics.mean(vals):.3f} ± {sd:.3f} | {', '.join(f'{v:.3f}' for v in vals)} |")
    lines.append(f"\n{len(results['seeds'])} seeds, {results['wall_seconds']:.0f} s wall time")
    return "\n".join(lines)
