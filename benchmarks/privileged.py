"""`opd bench privileged`: learning without an outside teacher, from a teacher that sees the reference solution.

SDFT/OPSD-style self-distillation on the arithmetic task: the quickstart's warm-started student is its own teacher
(`--teacher self`, its starting weights, frozen) and, as the teacher, sees the problem's worked reference solution
before the problem (`teacher_prompt`); the student samples from the bare problem and learns per-token reverse KL to
that teacher. Against, at equal updates: SFT on the reference solutions (`--source data --loss sft`, what the
teacher's extra context holds), and the same self-distillation without the solution in the teacher's prompt (a
control: a teacher equal to the student's start teaches nothing new). 3 seeds, greedy accuracy on held-out problems.
The personalisation section (`benchmarks/privileged_docs.py`) does the same on a real chat model: continual
learning's stage 2 with the documents in the teacher's prompt. Writes benchmarks/results/privileged.{json,md};
`--quick` is a plumbing check with meaningless numbers.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import tyro

from benchmarks import privileged_docs
from benchmarks.common.results import RESULTS, quick_banner, write
from benchmarks.privileged_docs import ARMS as PERSONALISATION_ARMS
from opd.config import DistillConfig, OptimArgs, SamplingArgs
from opd.lm.eval import accuracy
from opd.lm.hf.model import library_bars
from opd.lm.recipes.supervised import get_teacher, warm_start_student
from opd.lm.train import distill
from opd.tasks import get_task

ARMS = {
    "self_privileged": ("self-distillation, the teacher sees the reference solution",
                        dict(teacher="self", source="student", loss="reverse_kl"), True),
    "sft": ("SFT on the reference solutions", dict(source="data", loss="sft"), False),
    "self_plain": ("self-distillation, the teacher sees the bare problem (control)",
                   dict(teacher="self", source="student", loss="reverse_kl"), False),
}
"""key -> (label, DistillConfig settings, whether the teacher's prompt holds the reference solution)."""
SECTIONS = ("arithmetic", "personalisation")


@dataclass(frozen=True)
class PrivilegedArgs:
    """The comparison; the defaults are what benchmarks/results/privileged.md reports."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """One run of each arm per seed (prompt order, sampling)."""
    steps: int = 200
    """Student updates per run."""
    batch_size: int = 32
    """Prompts per update."""
    lr: float = 1e-3
    """Student learning rate (every arm)."""
    train_examples: int = 5000
    """Training problems with their reference solutions."""
    warm_start_steps: int = 1500
    """Most SFT steps for the warm start, which stops at 20 % training accuracy (the quickstart's student)."""
    eval_examples: int = 500
    """Held-out problems for the final accuracy."""
    max_new_tokens: int = 56
    """Longest completion (the task's worked solutions fit)."""
    threads: int = 2
    """torch CPU threads."""
    out_dir: str = "runs/bench-privileged"
    """Run directories, data files and the starting student."""
    sections: tuple[str, ...] = SECTIONS
    """arithmetic (the task above) and/or personalisation (`benchmarks/privileged_docs.py`: SmolLM2 stage 2 with
    the documents in the teacher's prompt); a section not run keeps its numbers from the last privileged.json."""
    personalisation_arms: tuple[str, ...] = tuple(PERSONALISATION_ARMS)
    """Stage-2 arms of the personalisation section (each about 10 minutes a seed on two cores); an arm not run is taken
    from `opd bench continual`'s results where its stage-1 models are the same."""


def privileged_rows(examples, with_solution: bool) -> list[dict]:
    """Rows of the task's problems: `prompt`, `completion` (the reference solution) and, `with_solution`, a
    `teacher_prompt` that shows the worked solution first and then asks the same problem."""
    rows = []
    for e in examples:
        row = {"prompt": e.prompt, "completion": e.completion, "answer": e.answer}
        if with_solution:
            row["teacher_prompt"] = f"{e.prompt}{e.completion} {e.prompt}"
        rows.append(row)
    return rows


def main(args: Annotated[PrivilegedArgs, tyro.conf.arg(name="")] = PrivilegedArgs(), quick: bool = False) -> dict:
    """Run the comparison (a plumbing version with --quick); write results/privileged.json and .md after every
    seed, so a run cut short keeps its finished seeds."""
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown --sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if quick:
        args = dataclasses.replace(args, seeds=(0,), steps=2, batch_size=4, train_examples=16, warm_start_steps=4,
                                   eval_examples=8, max_new_tokens=24, out_dir=args.out_dir + "-quick")
    path = RESULTS / f"privileged{'_quick' if quick else ''}.json"
    results = json.loads(path.read_text()) if path.exists() else {}  # the sections not run now stay as they were

    def save(update: dict) -> None:
        results.update(update, quick=quick)
        write("privileged", results, section, quick, RESULTS)

    with library_bars(False):
        if "arithmetic" in args.sections:
            run(args, quick, on_seed=save)
        if "personalisation" in args.sections:
            def on_seed(part: dict) -> None:
                part["from_continual"] = privileged_docs.from_continual(part, RESULTS / "continual.json")
                save({"personalisation": part})

            privileged_docs.personalisation(args.seeds, args.personalisation_arms, args.threads, quick, on_seed)
    return results


def run(args: PrivilegedArgs, quick: bool, on_seed=lambda results: None) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out_dir)
    _, tokenizer, _ = get_teacher(progress=False)  # only its tokenizer: no outside teacher here
    task = get_task("arithmetic")
    test = task.examples(args.eval_examples, seed=0, split="test")
    student = warm_start_student(tokenizer, seed=0, steps=args.warm_start_steps, progress=False)
    start = out / "warm-start"
    student.save_pretrained(start)
    tokenizer.save_pretrained(start)
    train = task.examples(args.train_examples, seed=0, split="train")
    data = {}
    for with_solution in (True, False):
        path = out / f"train{'-with-solutions' if with_solution else ''}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in privileged_rows(train, with_solution)))
        data[with_solution] = str(path)
    context = {"student_before": accuracy(student, tokenizer, task, test), "args": dataclasses.asdict(args),
               "quick": quick, "machine": f"{platform.machine()} CPU, {args.threads} torch thread(s)",
               "example_teacher_prompt": privileged_rows(train[:1], True)[0]["teacher_prompt"]}
    finals = {key: [] for key in ARMS}
    for n, seed in enumerate(args.seeds):
        for key, (_, choice, with_solution) in ARMS.items():
            print(f"seed {seed}, {key} ({time.perf_counter() - t0:.0f} s so far)", flush=True)
            cfg = DistillConfig(
                student=str(start), data=data[with_solution], steps=args.steps, batch_size=args.batch_size,
                sampling=SamplingArgs(max_new_tokens=args.max_new_tokens), optim=OptimArgs(lr=args.lr),
                eval_every=0, save_every=args.steps, seed=seed, threads=args.threads, progress=False,
                out_dir=str(out / key / f"seed-{seed}"), **choice)
            distill(cfg)
            trained = _load(Path(cfg.out_dir) / "checkpoint")
            finals[key].append(accuracy(trained, tokenizer, task, test))
        results = {**{key: {"final_accuracy_per_seed": v, "mean": statistics.mean(v),
                            "std": statistics.stdev(v) if len(v) > 1 else 0.0} for key, v in finals.items()},
                   **context, "seeds": list(args.seeds[:n + 1]), "wall_seconds": round(time.perf_counter() - t0, 1)}
        on_seed(results)
    return results


def _load(checkpoint: Path):
    from opd.lm.hf.model import load_model

    return load_model(str(checkpoint)).eval()


def section(results: dict) -> str:
    """The RESULTS.md section: final accuracy of each arm and what the gap says, then the personalisation table."""
    lines = ["## A teacher that sees the reference solution (self-distillation with privileged context)", "",
             *quick_banner(results["quick"])]
    if "self_privileged" in results:
        lines += arithmetic_lines(results)
    if "personalisation" in results:
        lines += ["", privileged_docs.markdown(results["personalisation"]).rstrip()]
    return "\n".join(lines) + "\n"


def arithmetic_lines(results: dict) -> list[str]:
    a = results["args"]
    lines = [
        f"Command: `opd bench privileged` (arithmetic task; the quickstart's warm-started student, {a['steps']} "
        f"updates of batch {a['batch_size']} at lr {a['lr']} per arm; greedy accuracy on {a['eval_examples']} held-out "
        f"problems; seeds {results['seeds']}). {results['machine']}, {results['wall_seconds']:.0f} s wall time. The "
        f"teacher's prompt, e.g.: `{results['example_teacher_prompt']}`.",
        "",
        "| arm | final accuracy | per seed |",
        "|---|---|---|",
        f"| student before | {results['student_before']:.3f} | |",
    ]
    for key, (label, _, _) in ARMS.items():
        r = results[key]
        lines.append(f"| {label} | {r['mean']:.3f} ± {r['std']:.3f} | "
                     f"{', '.join(f'{v:.3f}' for v in r['final_accuracy_per_seed'])} |")
    gap = results["self_privileged"]["mean"] - results["sft"]["mean"]
    control = results["self_privileged"]["mean"] - results["self_plain"]["mean"]
    spread = max(results[k]["std"] for k in ARMS)
    lines += ["", f"Self-distillation with the solution in the teacher's prompt ends {gap:+.3f} from SFT on the same "
              f"solutions and {control:+.3f} from the control without it; the largest seed standard deviation is "
              f"{spread:.3f}."]
    return lines


if __name__ == "__main__":
    tyro.cli(main)
