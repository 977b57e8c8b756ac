"""`opd bench tools`: distilling a tool-using student, on-policy against SFT on the teacher's conversations.

The arithmetic task with a calculator (`arithmetic-tools`): each column is a turn in which the model calls
`calc(x+y+carry)` and ends its turn, the tool answers the sum, and the last turn states the answer. The teacher (the
task's 0.8M-parameter model, trained on such conversations) and a warm-started 0.1M-parameter student. Arms, at equal
updates, both through `distill --tools calc`:
- `opd`: the student holds the conversations and learns per-token reverse KL to the teacher on its own turns;
- `sft`: the teacher holds the conversations (sampled at temperature 1) and the student learns its turns by
  cross-entropy (SFT on teacher conversations, sequence-level KD).
Tool answers are context in both (no loss on them). 3 seeds; greedy held-out accuracy with the tool, tool calls per
problem and the share of calls the calculator could carry out (tool-call validity). Writes
benchmarks/results/tools.{json,md}; `--quick` is a plumbing check with meaningless numbers.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import tyro

from benchmarks.common.results import RESULTS, quick_banner, write
from opd.config import DistillConfig, OptimArgs, SamplingArgs
from opd.lm.eval import tool_conversations
from opd.lm.hf.model import library_bars, load_model
from opd.lm.recipes.supervised import get_teacher, train_supervised, warm_start_student
from opd.lm.train import distill
from opd.tasks import get_task
from opd.tasks.models import make_model
from opd.tasks.tokenizer import build_tokenizer

TASK = "arithmetic-tools"
ARMS = {
    "opd": ("on-policy distillation: the student holds the conversations, reverse KL on its turns",
            dict(source="student", loss="reverse_kl")),
    "sft": ("SFT on the teacher's conversations", dict(source="teacher", loss="sft")),
}
"""key -> (label, DistillConfig settings; every arm also gets the teacher and --tools calc)."""
MEASURES = ("accuracy", "tool_call_valid", "tool_calls")


@dataclass(frozen=True)
class ToolsArgs:
    """The comparison; the defaults are what benchmarks/results/tools.md reports."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """One run of each arm per seed (prompt order, sampling)."""
    steps: int = 200
    """Student updates per run."""
    batch_size: int = 32
    """Conversations per update."""
    lr: float = 1e-3
    """Student learning rate (both arms)."""
    warm_start_steps: int = 1500
    """Most SFT steps of the student's warm start, which stops at 20 % exact match on training problems."""
    eval_examples: int = 500
    """Held-out problems for the final numbers."""
    max_new_tokens: int = 16
    """Longest turn (a column's call, or the answer, fits)."""
    threads: int = 2
    """torch CPU threads."""
    out_dir: str = "runs/bench-tools"
    """Run directories, the teacher and the starting student."""


def main(args: Annotated[ToolsArgs, tyro.conf.arg(name="")] = ToolsArgs(), quick: bool = False) -> dict:
    """Run the comparison (a plumbing version with --quick); write results/tools.json and .md after every seed, so a
    run cut short keeps its finished seeds."""
    if quick:
        args = dataclasses.replace(args, seeds=(0,), steps=2, batch_size=4, warm_start_steps=4, eval_examples=8,
                                   out_dir=args.out_dir + "-quick")
    with library_bars(False):
        return run(args, quick, on_seed=lambda results: write("tools", results, section, quick, RESULTS))


def teacher_dir(out: Path, quick: bool) -> tuple[Path, dict]:
    """The task's teacher saved under `out` (the cached one, trained on first use; a few SFT steps with --quick)."""
    if quick:
        tokenizer = build_tokenizer(get_task(TASK))
        model = make_model("teacher", tokenizer, seed=0)
        train_supervised(model, tokenizer, get_task(TASK).examples(16, 0, "train"), 2, 8, 3e-3, 0, progress=False)
        info = {"test_accuracy": None}
    else:
        model, tokenizer, info = get_teacher(progress=False, task=TASK)
    path = out / "teacher"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, info


def measure(model, tokenizer, task, test, args: ToolsArgs) -> dict:
    """Greedy held-out accuracy with the tool, tool calls per problem and the share the calculator carried out."""
    return tool_conversations(model, tokenizer, task, test, max_new_tokens=args.max_new_tokens)


def run(args: ToolsArgs, quick: bool, on_seed=lambda results: None) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out_dir)
    task = get_task(TASK)
    teacher, info = teacher_dir(out, quick)
    tokenizer = build_tokenizer(task)
    test = task.examples(args.eval_examples, seed=0, split="test")
    student = warm_start_student(tokenizer, seed=0, steps=args.warm_start_steps, task=TASK, use_cache=not quick,
                                 progress=False)
    start = out / "warm-start"
    student.save_pretrained(start)
    tokenizer.save_pretrained(start)
    context = {"student_before": measure(student, tokenizer, task, test, args),
               "teacher": measure(load_model(str(teacher)), tokenizer, task, test, args),
               "teacher_info_accuracy": info.get("test_accuracy"), "args": dataclasses.asdict(args), "quick": quick,
               "machine": f"{platform.machine()} CPU, {args.threads} torch thread(s)",
               "example": task.examples(1, seed=0, split="train")[0].__dict__}
    finals: dict[str, dict[str, list]] = {key: {m: [] for m in MEASURES} for key in ARMS}
    for n, seed in enumerate(args.seeds):
        for key, (_, choice) in ARMS.items():
            print(f"seed {seed}, {key} ({time.perf_counter() - t0:.0f} s so far)", flush=True)
            cfg = DistillConfig(
                student=str(start), teacher=str(teacher), task=TASK, tools="calc", max_turns=task.max_turns,
                steps=args.steps, batch_size=args.batch_size, sampling=SamplingArgs(max_new_tokens=args.max_new_tokens),
                optim=OptimArgs(lr=args.lr), eval_every=0, save_every=args.steps, seed=seed, threads=args.threads,
                progress=False, out_dir=str(out / key / f"seed-{seed}"), **choice)
            distill(cfg)
            numbers = measure(load_model(str(Path(cfg.out_dir) / "checkpoint")), tokenizer, task, test, args)
            for m in MEASURES:
                finals[key][m].append(numbers[m])
        results = {**{key: {m: summary(v) for m, v in arm.items()} for key, arm in finals.items()}, **context,
                   "seeds": list(args.seeds[:n + 1]), "wall_seconds": round(time.perf_counter() - t0, 1)}
        on_seed(results)
    return results


def summary(values: list) -> dict:
    """Per seed, mean and standard deviation (None where a model made no call: no validity to average)."""
    known = [v for v in values if v is not None]
    return {"per_seed": values, "mean": statistics.mean(known) if known else None,
            "std": statistics.stdev(known) if len(known) > 1 else 0.0}


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def section(results: dict) -> str:
    """The RESULTS.md section: accuracy and tool-call validity of each arm."""
    a = results["args"]
    e = results["example"]
    lines = [
        "## Distilling a tool-using student: on-policy against SFT on teacher conversations",
        "",
        *quick_banner(results["quick"]),
        f"Command: `opd bench tools` (arithmetic with a calculator tool, one `calc(...)` turn per column; "
        f"{a['steps']} updates of batch {a['batch_size']} at lr {a['lr']} per arm from the same warm-started "
        f"student; greedy accuracy with the tool on {a['eval_examples']} held-out problems; seeds {results['seeds']}). "
        f"{results['machine']}, {results['wall_seconds']:.0f} s wall time. A worked conversation: "
        f"`{e['prompt']}{e['completion']}` (`<eos>` ends a turn; the number after it is the tool's answer).",
        "",
        "| model | accuracy | tool-call validity | calls per problem | accuracy per seed |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("teacher", "teacher"), ("student_before", "student before")):
        r = results[name]
        lines.append(f"| {label} | {_fmt(r['accuracy'])} | {_fmt(r['tool_call_valid'])} | {_fmt(r['tool_calls'])} | |")
    for key, (label, _) in ARMS.items():
        r = results[key]
        lines.append(f"| {label} | {_fmt(r['accuracy']['mean'])} ± {_fmt(r['accuracy']['std'])} | "
                     f"{_fmt(r['tool_call_valid']['mean'])} | {_fmt(r['tool_calls']['mean'])} | "
                     f"{', '.join(_fmt(v) for v in r['accuracy']['per_seed'])} |")
    gap = results["opd"]["accuracy"]["mean"] - results["sft"]["accuracy"]["mean"]
    spread = max(results[k]["accuracy"]["std"] for k in ARMS)
    lines += ["", f"On-policy distillation ends {gap:+.3f} in accuracy from SFT on the teacher's conversations; the "
              f"larger seed standard deviation is {spread:.3f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    tyro.cli(main)
