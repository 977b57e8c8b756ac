"""`opd bench table31`: the seed's Table 3.1 as an experiment, with its two companions from chapter 5.

1. Methods (MISSION rows 8-9). From the same warm-started student (one per seed), five ways to spend compute:
   SFT on teacher samples, sparse-reward RL (GRPO, no teacher), on-policy distillation with the full-vocabulary
   reverse KL, on-policy distillation with the sampled-token estimator, and GKD (λ = 0.5, JSD β = 0.5). Held-out
   accuracy is measured along the way against the FLOPs each method has spent (`opd.flops`) and its wall time.
2. Capacity (row 14): students of four sizes distilled on-policy from the same teacher; final accuracy and
   per-token reverse KL to the teacher against student parameters.
3. Teacher bias (row 15): a copy of the teacher fine-tuned to make one systematic error; after distillation, how
   often the student's answer on the affected problems is the truth and how often it is the teacher's.

Writes `results_dir`/table31.json, table31.md (a section for RESULTS.md), table31.png, capacity.png and bias.png;
the runs (configs, metrics.jsonl, checkpoints) go to `out_dir`. A finished run found there is reused, not redone.
`--quick` shrinks every step count so the whole thing takes a few minutes: it checks the plumbing, and its numbers
mean nothing.

    python -m benchmarks.table31            # the full benchmark (about an hour on 2 quiet cores)
    python -m benchmarks.table31 --quick
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import table31_report as report
from benchmarks import teacher_bias as bias
from opd.chunked import chunked_divergence
from opd.config import DistillConfig, OptimArgs, SamplingArgs, to_dict
from opd.lm.eval import accuracy
from opd.lm.model import final_hidden, lm_head, load_model, load_tokenizer
from opd.lm.rl import RLConfig, rl
from opd.lm.rollout import encode_prompts, sample
from opd.lm.train import distill
from opd.losses import reverse_kl
from opd.tasks import get_task
from opd.tasks.models import num_params
from opd.tasks.train import cache_root, get_teacher, warm_start_student


@dataclass(frozen=True)
class Table31Args:
    """The Table 3.1 benchmark; the defaults are the full run whose numbers are in RESULTS.md."""

    quick: bool = False
    """Plumbing check in a few minutes: overrides the step counts, seeds and evaluation sizes with `QUICK`."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One warm start and one run of each method per seed."""
    steps: int = 200
    """Updates for SFT on teacher samples, both on-policy distillation estimators and GKD."""
    rl_steps: int = 800
    """Updates for RL. An RL step has no teacher in it, so it costs about a quarter of an on-policy distillation
    step's FLOPs here; 800 RL steps spend about as much compute as 200 distillation steps."""
    batch_size: int = 32
    """Sequences per update, for every method (RL: batch_size / group_size prompts, group_size samples of each)."""
    group_size: int = 8
    """RL's completions per prompt."""
    lr: float = 1e-3
    """Student learning rate for every method (AdamW, 10 warm-up steps, then constant)."""
    max_new_tokens: int = 48
    """Longest completion (the longest worked solution is 45 characters plus end-of-sequence)."""
    warm_start_steps: int = 100
    """SFT steps on ground truth (batch 32) that give every student its starting point."""
    evals: int = 8
    """Held-out evaluations per run, evenly spaced (plus the warm start)."""
    eval_examples: int = 200
    """Held-out problems per evaluation."""
    target_fraction: float = 0.9
    """The target accuracy for `flops_to_target` is this fraction of the teacher's accuracy."""
    capacity_sizes: tuple[str, ...] = ("xs", "s", "m", "l")
    """Student sizes for the capacity sweep (keys of `opd.tasks.models.MODEL_SIZES`)."""
    capacity_seeds: tuple[int, ...] = (0,)
    """Seeds for the capacity sweep."""
    bias_steps: int = 400
    """Fine-tuning steps (batch 64) that plant the error in a copy of the teacher."""
    bias_eval_examples: int = 200
    """Held-out problems affected by the planted error (and as many unaffected) for the agreement measurement."""
    parts: tuple[str, ...] = ("methods", "capacity", "bias")
    """Which parts to run; leave one out to skip it."""
    teacher: str | None = None
    """A teacher directory; by default the task's teacher (`opd.tasks.train.get_teacher`: committed, cached or
    trained on first use)."""
    out_dir: str = "runs/table31"
    """Run directories: teacher/, seed-*/, capacity/, bias/."""
    results_dir: str = "benchmarks/results"
    """Where table31.json, table31.md and the plots go."""
    threads: int = 1
    """torch CPU threads."""
    progress: bool = True
    """Progress bars."""


QUICK = dict(seeds=(0, 1), steps=3, rl_steps=4, batch_size=8, group_size=4, warm_start_steps=3, evals=2,
             eval_examples=16, capacity_seeds=(0,), bias_steps=2, bias_eval_examples=8)
"""What `--quick` overrides."""

METHODS = {
    "sft": dict(label="SFT on teacher samples", source="teacher", loss="sft"),
    "rl": dict(label="RL (GRPO, 0/1 answer reward, no teacher)"),
    "opd_reverse_kl": dict(label="on-policy distillation, full-vocab reverse KL", source="student", loss="reverse_kl"),
    "opd_sampled": dict(label="on-policy distillation, sampled-token estimator", source="student", loss="sampled"),
    "gkd": dict(label="GKD (λ = 0.5, JSD β = 0.5)", source="mixture", lmbda=0.5, loss="jsd", beta=0.5),
}
"""Method key -> its label and the `DistillConfig` choices that make it (RL has its own loop)."""
READING = Path(__file__).with_name("table31_reading.md")
"""Hand-written reading of the full run's numbers, appended to table31.md by a full (not --quick) run."""


def table31(args: Table31Args) -> dict:
    """Run the parts `args.parts` names, write the results files; returns the results."""
    command = _command(args)
    if args.quick:
        args = dataclasses.replace(args, **QUICK)
    unknown = set(args.parts) - {"methods", "capacity", "bias"}
    if unknown or not args.parts:
        raise ValueError(f"parts must be some of methods, capacity, bias; got {args.parts}")
    if args.batch_size % args.group_size:
        raise ValueError(f"batch_size {args.batch_size} must be a multiple of group_size {args.group_size}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out, results_dir = Path(args.out_dir), Path(args.results_dir)
    teacher_dir, tokenizer = _teacher_dir(args, out)
    task = get_task("arithmetic")
    test = task.examples(args.eval_examples, seed=0, split="test")  # the set every run of distill/rl evaluates on
    teacher = load_model(teacher_dir)
    results = {
        "teacher_accuracy": _accuracy(teacher, tokenizer, test, args),
        "teacher_params": num_params(teacher),
        "eval_examples": args.eval_examples,
        "flops_formula": report.FLOPS_FORMULA,
    }
    results["target_accuracy"] = args.target_fraction * results["teacher_accuracy"]
    results["target_definition"] = f"{args.target_fraction:g} × the teacher's held-out accuracy"
    if "methods" in args.parts:
        results.update(run_methods(args, teacher_dir, tokenizer, test, out, results["target_accuracy"]))
    if "capacity" in args.parts:
        results["capacity"] = run_capacity(args, teacher_dir, tokenizer, test, out)
    if "bias" in args.parts:
        results["bias"] = run_bias(args, teacher_dir, tokenizer, out)
    results["wall_seconds_total"] = round(time.perf_counter() - t0, 1)
    results["args"] = dataclasses.asdict(args)
    results["command"] = command
    report.write_all(results, results_dir, reading=None if args.quick else READING)
    return results


def run_methods(args, teacher_dir, tokenizer, test, out, target) -> dict:
    """Every method from every seed's warm start; returns the top-level fields and the per-method summaries."""
    start_acc, curves = [], {key: [] for key in METHODS}
    for seed in args.seeds:
        init_dir = warm_start(args, tokenizer, "student", seed, out / f"seed-{seed}" / "warm-start")
        start_acc.append(_accuracy(load_model(init_dir), tokenizer, test, args))
        for key in METHODS:
            run_dir = out / f"seed-{seed}" / key
            _run(method_config(args, key, init_dir, teacher_dir, seed, run_dir))
            curves[key].append(report.read_curve(run_dir, start_acc[-1]))
    methods = {key: {"label": METHODS[key]["label"], **report.summarise_method(curves[key], target)} for key in METHODS}
    return {"student_start_accuracy": sum(start_acc) / len(start_acc), "student_start_accuracy_seeds": start_acc,
            "seeds": list(args.seeds), "methods": methods}


def method_config(args, key: str, student: str, teacher: str | None, seed: int, out_dir: Path):
    """The run config of method `key` from `student` (with `teacher`) for this benchmark's settings."""
    common = dict(student=str(student), batch_size=args.batch_size,
                  sampling=SamplingArgs(max_new_tokens=args.max_new_tokens), optim=OptimArgs(lr=args.lr),
                  eval_examples=args.eval_examples, seed=seed, out_dir=str(out_dir), progress=args.progress)
    if key == "rl":
        steps = args.rl_steps
        common["batch_size"] = args.batch_size // args.group_size
        return RLConfig(**common, steps=steps, group_size=args.group_size, eval_every=max(1, steps // args.evals),
                        save_every=steps)
    steps = args.steps
    choice = {k: v for k, v in METHODS[key].items() if k != "label"}
    return DistillConfig(**common, **choice, teacher=str(teacher), steps=steps, eval_every=max(1, steps // args.evals),
                         save_every=steps)


def run_capacity(args, teacher_dir, tokenizer, test, out) -> dict:
    """On-policy distillation (full reverse KL) of each student size; accuracy and reverse KL before and after."""
    teacher = load_model(teacher_dir)
    prompts = encode_prompts(tokenizer, [e.prompt for e in test], tokenizer.model_max_length - args.max_new_tokens)
    rows = []
    for size in args.capacity_sizes:
        row = {"size": size, "start_accuracy_seeds": [], "final_accuracy_seeds": [], "reverse_kl_before_seeds": [],
               "reverse_kl_after_seeds": []}
        for seed in args.capacity_seeds:
            init_dir = warm_start(args, tokenizer, size, seed, out / "capacity" / f"{size}-seed-{seed}" / "warm-start")
            run_dir = out / "capacity" / f"{size}-seed-{seed}" / "opd_reverse_kl"
            _run(method_config(args, "opd_reverse_kl", init_dir, teacher_dir, seed, run_dir))
            before, after = load_model(init_dir), load_model(str(run_dir / "checkpoint"))
            row["params"] = num_params(before)
            row["start_accuracy_seeds"].append(_accuracy(before, tokenizer, test, args))
            row["final_accuracy_seeds"].append(report.read_curve(run_dir, 0.0)["accuracy"][-1])
            row["reverse_kl_before_seeds"].append(per_token_reverse_kl(before, teacher, tokenizer, prompts, args, seed))
            row["reverse_kl_after_seeds"].append(per_token_reverse_kl(after, teacher, tokenizer, prompts, args, seed))
        for name in ("start_accuracy", "final_accuracy", "reverse_kl_before", "reverse_kl_after"):
            row[name] = sum(row[f"{name}_seeds"]) / len(row[f"{name}_seeds"])
        rows.append(row)
    return {"method": "opd_reverse_kl", "steps": args.steps, "seeds": list(args.capacity_seeds), "sizes": rows}


@torch.no_grad()
def per_token_reverse_kl(student, teacher, tokenizer, prompt_ids, args, seed: int) -> float:
    """Mean over the student's own sampled completion tokens (temperature 1) of KL(student ‖ teacher), full vocab."""
    torch.manual_seed(seed)
    batch = sample(student, prompt_ids, tokenizer.pad_token_id, tokenizer.eos_token_id, args.max_new_tokens)
    mask_BT = batch.mask_BT.bool()
    student_ND = final_hidden(student, batch.input_ids_BL, batch.attention_mask_BL)[:, :-1][mask_BT]
    teacher_ND = final_hidden(teacher, batch.input_ids_BL, batch.attention_mask_BL)[:, :-1][mask_BT]
    kl_N = chunked_divergence(reverse_kl, student_ND, lm_head(student), teacher_hidden_ND=teacher_ND,
                              teacher_head=lm_head(teacher))
    return kl_N.mean().item()


def run_bias(args, teacher_dir, tokenizer, out) -> dict:
    """Plant the error in a copy of the teacher, distil students from it, measure whose answers they give."""
    task = get_task("arithmetic")
    pool = task.examples(20 * args.bias_eval_examples, seed=1, split="test")
    pairs = bias.affected(pool)[: args.bias_eval_examples]
    unaffected = [e for e in pool if bias.biased_version(e).answer == e.answer][: args.bias_eval_examples]
    default_teacher = args.teacher is None and not args.quick
    biased_dir = cache_root() / "arithmetic-teacher-carry10" if default_teacher else out / "bias" / "teacher"
    train = task.examples(args.bias_steps * 64, seed=100, split="train")
    base_id = hashlib.sha256((Path(teacher_dir) / "model.safetensors").read_bytes()).hexdigest()[:16]
    biased, _, info = bias.plant_bias(load_model(teacher_dir), tokenizer, train, args.bias_steps, 64, 1e-3, seed=0,
                                      out_dir=biased_dir, base_id=base_id, progress=args.progress)

    def measure(model) -> dict:
        return {**bias.answer_agreement(model, tokenizer, pairs, args.max_new_tokens),
                "unaffected_accuracy": accuracy(model, tokenizer, task, unaffected, max_new_tokens=args.max_new_tokens)}

    result = {"rule": bias.RULE, "affected_share": len(bias.affected(pool)) / len(pool), "teacher_dir": str(biased_dir),
              "plant": info.get("bias"), "clean_teacher": measure(load_model(teacher_dir)),
              "biased_teacher": measure(biased)}
    students = {"warm start": [], "OPD (reverse KL) from the biased teacher": [],
                "SFT on the biased teacher's samples": [], "OPD (reverse KL) from the clean teacher": []}
    for seed in args.seeds:
        init_dir = warm_start(args, tokenizer, "student", seed, out / f"seed-{seed}" / "warm-start")
        students["warm start"].append(measure(load_model(init_dir)))
        for name, key in (("OPD (reverse KL) from the biased teacher", "opd_reverse_kl"),
                          ("SFT on the biased teacher's samples", "sft")):
            run_dir = out / "bias" / f"seed-{seed}" / key
            _run(method_config(args, key, init_dir, str(biased_dir), seed, run_dir))
            students[name].append(measure(load_model(str(run_dir / "checkpoint"))))
        control = out / f"seed-{seed}" / "opd_reverse_kl"
        if "methods" not in args.parts:
            _run(method_config(args, "opd_reverse_kl", init_dir, teacher_dir, seed, control))
        students["OPD (reverse KL) from the clean teacher"].append(measure(load_model(str(control / "checkpoint"))))
    result["students"] = {name: report.mean_of_dicts(rows) | {"seeds": rows} for name, rows in students.items()}
    result["seeds"] = list(args.seeds)
    return result


def warm_start(args, tokenizer, size: str, seed: int, path: Path) -> str:
    """A warm-started student saved at `path` (reused if one with the same settings is there); returns the path."""
    settings = {"size": size, "seed": seed, "steps": args.warm_start_steps, "threads": args.threads}
    marker = path / "warm_start.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == settings):
        student = warm_start_student(tokenizer, size, seed, steps=args.warm_start_steps, progress=args.progress)
        student.save_pretrained(path)
        tokenizer.save_pretrained(path)
        marker.write_text(json.dumps(settings) + "\n")
    return str(path)


def _run(cfg) -> None:
    """Run `cfg` (a DistillConfig or an RLConfig) unless its directory holds the finished run of this exact config."""
    out = Path(cfg.out_dir)
    if report.finished(out, json.loads(json.dumps(to_dict(cfg))), cfg.steps):
        return
    shutil.rmtree(out, ignore_errors=True)  # a half-finished run would append to its old metrics
    (rl if isinstance(cfg, RLConfig) else distill)(cfg)


def _teacher_dir(args, out: Path) -> tuple[str, object]:
    if args.teacher is not None:
        return args.teacher, load_tokenizer(args.teacher)
    model, tokenizer, _ = get_teacher(progress=args.progress)
    path = out / "teacher"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), load_tokenizer(str(path))


def _command(args: Table31Args) -> str:
    """The command line that reproduces `args` (the flags that differ from the defaults)."""
    flags = []
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if value != f.default:
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else f"--no-{f.name.replace('_', '-')}")
            else:
                flags += [flag, *(map(str, value) if isinstance(value, tuple) else [str(value)])]
    return " ".join(["python -m benchmarks.table31", *flags])


def _accuracy(model, tokenizer, examples, args) -> float:
    return accuracy(model, tokenizer, get_task("arithmetic"), examples, max_new_tokens=args.max_new_tokens)


def table31_main(args: Table31Args) -> None:
    """CLI: run the benchmark and print the markdown section it wrote."""
    table31(args)
    print((Path(args.results_dir) / "table31.md").read_text())


if __name__ == "__main__":
    import tyro

    table31_main(tyro.cli(Table31Args))
