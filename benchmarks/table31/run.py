"""`opd bench table31`: the seed's Table 3.1 as an experiment, with its two companions from chapter 5.

1. Methods (MISSION rows 8-9). From the same warm-started student (one per seed), five ways to spend compute:
   SFT on teacher samples, sparse-reward RL (GRPO, no teacher), on-policy distillation with the full-vocabulary
   reverse KL, on-policy distillation with the sampled-token estimator, and GKD (λ = 0.5, JSD β = 0.5). Held-out
   accuracy is measured along the way against the FLOPs each method has spent (`opd.flops`) and its wall time.
2. Capacity (row 14): students of four sizes distilled on-policy from the same teacher; final accuracy and
   per-token reverse KL to the teacher against student parameters.
3. Teacher bias (row 15): a copy of the teacher fine-tuned to make one systematic error; after distillation, how
   often the student's answer on the affected problems is the truth and how often it is the teacher's.

Writes `results_dir`/table31.json, table31.md (a section for RESULTS.md; the hand-written reading of the numbers is
table31_notes.md next to it), table31.png, capacity.png and bias.png; the runs (configs, metrics.jsonl, checkpoints)
go to `out_dir`, and a finished run found there is reused, not redone. `--quick` shrinks every step count so the
whole thing takes a few minutes: it checks the plumbing, its numbers mean nothing, and its files are named
table31_quick.* etc. so that it never overwrites the real ones.

    opd bench table31            # the full benchmark (about an hour on 2 quiet cores)
    opd bench table31 --quick
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

from benchmarks.common.command import command_line
from benchmarks.common.jobs import run_parallel
from benchmarks.table31 import report
from benchmarks.table31 import teacher_bias as bias
from opd.chunked import chunked_divergence
from opd.config import DistillConfig, OptimArgs, SamplingArgs, to_dict
from opd.lm.eval import accuracy
from opd.lm.hf.model import final_hidden, lm_head, load_model, load_tokenizer
from opd.lm.recipes.rl import RLConfig, rl
from opd.lm.batch import encode_prompts
from opd.lm.rollouts.local import sample
from opd.lm.train import distill
from opd.losses import reverse_kl
from opd.tasks import get_task
from opd.tasks.models import MODEL_SIZES, num_params
from opd.cache import cache_root
from opd.lm.recipes.supervised import get_teacher, warm_start_student


@dataclass(frozen=True)
class Table31Args:
    """The Table 3.1 benchmark; the defaults are the full run whose numbers are in RESULTS.md."""

    quick: bool = False
    """Plumbing check in a few minutes: overrides the step counts, seeds and evaluation sizes with `QUICK`, runs in
    `out_dir`-quick and writes table31_quick.* (never over a real run's files)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One warm start and one run of each method per seed."""
    student_size: str = "student"
    """The student of the method comparison (a key of `opd.tasks.models.MODEL_SIZES`; "student" = "m", 125k
    parameters, against the teacher's 856k)."""
    steps: int = 300
    """Updates for SFT on teacher samples, both on-policy distillation estimators and GKD."""
    rl_steps: int = 900
    """Updates for RL. An RL step has no teacher in it, so it costs about a third of an on-policy distillation
    step's FLOPs here; 900 RL steps spend about as much compute as 300 distillation steps."""
    batch_size: int = 32
    """Sequences per update, for every method (RL: batch_size / group_size prompts, group_size samples of each)."""
    group_size: int = 8
    """RL's completions per prompt."""
    lr: float = 3e-4
    """Student learning rate of the four teacher-based methods (AdamW, 10 warm-up steps, then constant)."""
    rl_lr: float = 1e-5
    """RL's learning rate. Tuned on seed 0: at 3e-5 and above the policy collapses to 0 % accuracy within 50 steps
    (Adam turns the sparse, mostly-noise gradient into full-size steps), 1e-5 is the largest rate that does not."""
    max_new_tokens: int = 48
    """Longest completion (the longest worked solution is 45 characters plus end-of-sequence)."""
    warm_start_steps: int | None = None
    """Cap on the SFT steps on ground truth that give every student its starting point; None: the task's default
    (`opd.lm.recipes.supervised.warm_start_student`, which stops once the student solves 20 % of training problems: just past
    the point where it finds each column's digits, so it has headroom, and RL gets rewards)."""
    timing_steps: int = 20
    """Updates per method in the back-to-back timing that gives the seconds per update."""
    evals: int = 6
    """Held-out evaluations per run, evenly spaced (plus the warm start)."""
    eval_examples: int = 200
    """Held-out problems per evaluation."""
    target_fraction: float = 0.9
    """The target accuracy for `flops_to_target` is this fraction of the teacher's accuracy."""
    capacity_sizes: tuple[str, ...] = ("xs", "s", "m", "l")
    """Student sizes for the capacity sweep (keys of `opd.tasks.models.MODEL_SIZES`)."""
    capacity_seeds: tuple[int, ...] = (0,)
    """Seeds for the capacity sweep."""
    bias_seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (warm starts of the method comparison) distilled from the biased teacher."""
    bias_steps: int = 150
    """Fine-tuning steps (batch 64) that plant the error in a copy of the teacher."""
    bias_eval_examples: int = 200
    """Held-out problems affected by the planted error (and as many unaffected) for the agreement measurement."""
    parts: tuple[str, ...] = ("methods", "capacity", "bias")
    """Which parts to run; leave one out to skip it."""
    teacher: str | None = None
    """A teacher directory; by default the task's teacher (`opd.lm.recipes.supervised.get_teacher`: committed, cached or
    trained on first use)."""
    out_dir: str = "runs/table31"
    """Run directories: teacher/, seed-*/, capacity/, bias/."""
    results_dir: str = "benchmarks/results"
    """Where table31.json, table31.md and the plots go."""
    threads: int = 1
    """torch CPU threads per process."""
    workers: int = 2
    """Runs in parallel, one process each (the runs are independent; 2 for a 2-core machine)."""
    progress: bool = True
    """Progress bars."""


QUICK = dict(seeds=(0, 1), steps=3, rl_steps=4, batch_size=8, group_size=4, warm_start_steps=3, evals=2,
             timing_steps=3, eval_examples=16, capacity_seeds=(0,), bias_seeds=(0,), bias_steps=2, bias_eval_examples=8)
"""What `--quick` overrides."""

METHODS = {
    "sft": dict(label="SFT on teacher samples", source="teacher", loss="sft"),
    "rl": dict(label="RL (GRPO, 0/1 answer reward, no teacher)"),
    "opd_reverse_kl": dict(label="on-policy distillation, full-vocab reverse KL", source="student", loss="reverse_kl"),
    "opd_sampled": dict(label="on-policy distillation, sampled-token estimator", source="student", loss="sampled"),
    "gkd": dict(label="GKD (λ = 0.5, JSD β = 0.5)", source="mixture", lmbda=0.5, loss="jsd", beta=0.5),
}
"""Method key -> its label and the `DistillConfig` choices that make it (RL has its own loop)."""


def table31(args: Table31Args) -> dict:
    """Run the parts `args.parts` names, write the results files; returns the results."""
    command = _command(args)
    if args.quick:  # its runs go next to the real ones, never over them
        args = dataclasses.replace(args, **QUICK, out_dir=args.out_dir.rstrip("/") + "-quick")
    unknown = set(args.parts) - {"methods", "capacity", "bias"}
    if unknown or not args.parts:
        raise ValueError(f"parts must be some of methods, capacity, bias; got {args.parts}")
    if args.batch_size % args.group_size:
        raise ValueError(f"batch_size {args.batch_size} must be a multiple of group_size {args.group_size}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out_dir)
    teacher_dir, tokenizer = _teacher_dir(args, out)
    test = get_task("arithmetic").examples(args.eval_examples, seed=0, split="test")  # what distill/rl evaluate on
    teacher = load_model(teacher_dir)
    results = {"teacher_accuracy": _accuracy(teacher, tokenizer, test, args), "teacher_params": num_params(teacher),
               "student_size": args.student_size, "eval_examples": args.eval_examples,
               "flops_formula": report.FLOPS_FORMULA}
    results["target_accuracy"] = args.target_fraction * results["teacher_accuracy"]
    results["target_definition"] = f"{args.target_fraction:g} × the teacher's held-out accuracy"

    # Plan every warm start and run first, so that the independent ones can share the cores.
    students = set()
    if "methods" in args.parts:
        students |= {(args.student_size, seed) for seed in args.seeds}
    if "bias" in args.parts:
        students |= {(args.student_size, seed) for seed in args.bias_seeds}
    if "capacity" in args.parts:
        students |= {(_same(args, size), seed) for size in args.capacity_sizes for seed in args.capacity_seeds}
    biased_dir = cache_root() / "arithmetic-teacher-carry10" if args.teacher is None and not args.quick \
        else out / "bias" / "teacher"
    jobs = [(warm_start, (args, tokenizer, size, seed, _warm_dir(out, size, seed))) for size, seed in sorted(students)]
    if "bias" in args.parts:
        jobs.append((_plant, (args, teacher_dir, tokenizer, biased_dir)))
    _parallel(jobs, args)
    runs = {}
    if "methods" in args.parts:
        runs |= {_run_dir(out, args.student_size, seed, key): (args.student_size, seed, key, teacher_dir)
                 for seed in args.seeds for key in METHODS}
    if "capacity" in args.parts:
        runs |= {_run_dir(out, _same(args, size), seed, "opd_reverse_kl"): (_same(args, size), seed, "opd_reverse_kl",
                                                                             teacher_dir)
                 for size in args.capacity_sizes for seed in args.capacity_seeds}
    if "bias" in args.parts:
        for seed in args.bias_seeds:
            control = _run_dir(out, args.student_size, seed, "opd_reverse_kl")  # the same student, clean teacher
            runs[control] = (args.student_size, seed, "opd_reverse_kl", teacher_dir)
            for key in ("opd_reverse_kl", "sft"):
                runs[out / "bias" / f"seed-{seed}" / key] = (args.student_size, seed, key, str(biased_dir))
    configs = [method_config(args, key, _warm_dir(out, size, seed), teach, seed, run_dir)
               for run_dir, (size, seed, key, teach) in runs.items()]
    # longest first, so that two workers finish together
    configs.sort(key=lambda cfg: -cfg.steps * (0.5 if isinstance(cfg, RLConfig) else 1.0))
    todo = [cfg for cfg in configs if not _finished(cfg)]
    results.update(runs_total=len(configs), runs_reused=len(configs) - len(todo))
    _parallel([(_run, (cfg,)) for cfg in todo], args)

    if "methods" in args.parts:
        results.update(summarise_methods(args, tokenizer, test, out, results["target_accuracy"], teacher_dir))
    if "capacity" in args.parts:
        results["capacity"] = measure_capacity(args, teacher, tokenizer, test, out)
    if "bias" in args.parts:
        results["bias"] = measure_bias(args, teacher_dir, biased_dir, tokenizer, out)
    results["wall_seconds_total"] = round(time.perf_counter() - t0, 1)
    results["args"] = dataclasses.asdict(args)
    results["command"] = command
    report.write_all(results, Path(args.results_dir))
    return results


def measure_timing(args, out: Path, teacher_dir: str) -> dict[str, float]:
    """Wall seconds per update of each method, run back to back in this process from the first seed's warm start
    (the benchmark's runs share the machine with each other, so their own step times depend on what ran beside them).
    The first two updates (allocation, caches) are left out."""
    seconds = {}
    for key in METHODS:
        cfg = method_config(args, key, _warm_dir(out, args.student_size, args.seeds[0]), teacher_dir, args.seeds[0],
                            out / "timing" / key)
        cfg = dataclasses.replace(cfg, steps=args.timing_steps, eval_every=0, eval_examples=1,
                                  save_every=args.timing_steps, progress=False)
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
        (rl if isinstance(cfg, RLConfig) else distill)(cfg)
        lines = [json.loads(line) for line in (out / "timing" / key / "metrics.jsonl").read_text().splitlines()]
        timed = lines[2:] or lines
        seconds[key] = sum(m["step_s"] for m in timed) / len(timed)
    return seconds


def summarise_methods(args, tokenizer, test, out, target, teacher_dir) -> dict:
    """The top-level start accuracy and the per-method summaries over seeds."""
    start_acc, curves = [], {key: [] for key in METHODS}
    for seed in args.seeds:
        start_acc.append(_accuracy(load_model(str(_warm_dir(out, args.student_size, seed))), tokenizer, test, args))
        for key in METHODS:
            curves[key].append(report.read_curve(_run_dir(out, args.student_size, seed, key), start_acc[-1]))
    methods = {key: {"label": METHODS[key]["label"], **report.summarise_method(curves[key], target)} for key in METHODS}
    level = report.add_rl_level(methods)
    for key, seconds in measure_timing(args, out, teacher_dir).items():
        methods[key]["seconds_per_update"] = seconds
    return {"student_start_accuracy": sum(start_acc) / len(start_acc), "student_start_accuracy_seeds": start_acc,
            "rl_accuracy_level": level,
            "student_params": num_params(load_model(str(_warm_dir(out, args.student_size, args.seeds[0])))),
            "seeds": list(args.seeds), "methods": methods}


def method_config(args, key: str, student: Path, teacher: str, seed: int, out_dir: Path):
    """The run config of method `key` from `student` (with `teacher`) for this benchmark's settings."""
    common = dict(student=str(student), batch_size=args.batch_size,
                  sampling=SamplingArgs(max_new_tokens=args.max_new_tokens), eval_examples=args.eval_examples,
                  seed=seed, out_dir=str(out_dir), progress=args.progress and args.workers == 1)
    if key == "rl":
        common["batch_size"] = args.batch_size // args.group_size
        return RLConfig(**common, steps=args.rl_steps, group_size=args.group_size, optim=OptimArgs(lr=args.rl_lr),
                        eval_every=max(1, args.rl_steps // args.evals), save_every=args.rl_steps)
    choice = {k: v for k, v in METHODS[key].items() if k != "label"}
    return DistillConfig(**common, **choice, teacher=str(teacher), steps=args.steps, optim=OptimArgs(lr=args.lr),
                         eval_every=max(1, args.steps // args.evals), save_every=args.steps)


def measure_capacity(args, teacher, tokenizer, test, out) -> dict:
    """Accuracy and per-token reverse KL of each student size before and after on-policy distillation."""
    prompts = encode_prompts(tokenizer, [e.prompt for e in test], tokenizer.model_max_length - args.max_new_tokens)
    rows = []
    for size in args.capacity_sizes:
        row = {"size": size, "start_accuracy_seeds": [], "final_accuracy_seeds": [], "reverse_kl_before_seeds": [],
               "reverse_kl_after_seeds": []}
        for seed in args.capacity_seeds:
            run_dir = _run_dir(out, _same(args, size), seed, "opd_reverse_kl")
            before = load_model(str(_warm_dir(out, _same(args, size), seed)))
            after = load_model(str(run_dir / "checkpoint"))
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


def _plant(args, teacher_dir: str, tokenizer, biased_dir: Path) -> None:
    task = get_task("arithmetic")
    base_id = hashlib.sha256((Path(teacher_dir) / "model.safetensors").read_bytes()).hexdigest()[:16]
    train = task.examples(args.bias_steps * 64, seed=100, split="train")
    bias.plant_bias(load_model(teacher_dir), tokenizer, train, args.bias_steps, 64, 1e-3, seed=0, out_dir=biased_dir,
                    base_id=base_id, progress=args.progress and args.workers == 1)


def measure_bias(args, teacher_dir: str, biased_dir: Path, tokenizer, out) -> dict:
    """Whose answers the teachers and the students give on the problems the planted error affects."""
    task = get_task("arithmetic")
    pool = task.examples(20 * args.bias_eval_examples, seed=1, split="test")
    pairs = bias.affected(pool)[: args.bias_eval_examples]
    unaffected = [e for e in pool if bias.biased_version(e).answer == e.answer][: args.bias_eval_examples]

    def measure(model_dir) -> dict:
        model = load_model(str(model_dir))
        return {**bias.answer_agreement(model, tokenizer, pairs, args.max_new_tokens),
                "unaffected_accuracy": accuracy(model, tokenizer, task, unaffected, max_new_tokens=args.max_new_tokens)}

    students = {"warm start": [], "OPD (reverse KL) from the biased teacher": [],
                "SFT on the biased teacher's samples": [], "OPD (reverse KL) from the clean teacher": []}
    for seed in args.bias_seeds:
        students["warm start"].append(measure(_warm_dir(out, args.student_size, seed)))
        students["OPD (reverse KL) from the biased teacher"].append(
            measure(out / "bias" / f"seed-{seed}" / "opd_reverse_kl" / "checkpoint"))
        students["SFT on the biased teacher's samples"].append(
            measure(out / "bias" / f"seed-{seed}" / "sft" / "checkpoint"))
        students["OPD (reverse KL) from the clean teacher"].append(
            measure(_run_dir(out, args.student_size, seed, "opd_reverse_kl") / "checkpoint"))
    return {"rule": bias.RULE, "affected_share": len(bias.affected(pool)) / len(pool), "teacher_dir": str(biased_dir),
            "plant": json.loads((biased_dir / "info.json").read_text()).get("bias"),
            "clean_teacher": measure(teacher_dir), "biased_teacher": measure(biased_dir),
            "seeds": list(args.bias_seeds),
            "students": {name: report.mean_of_dicts(rows) | {"seeds": rows} for name, rows in students.items()}}


def warm_start(args, tokenizer, size: str, seed: int, path: Path) -> None:
    """A warm-started student saved at `path` (kept if one with the same settings is there)."""
    settings = {"size": size, "seed": seed, "steps": args.warm_start_steps, "threads": args.threads}
    marker = path / "warm_start.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return
    steps = {} if args.warm_start_steps is None else {"steps": args.warm_start_steps}
    # --quick students are not worth a place in the shared cache of warm starts
    student = warm_start_student(tokenizer, size, seed, **steps, use_cache=not args.quick,
                                 progress=args.progress and args.workers == 1)
    student.save_pretrained(path)
    tokenizer.save_pretrained(path)
    marker.write_text(json.dumps(settings) + "\n")


def _same(args, size: str) -> str:
    """The comparison's student size for a ladder size naming the same model ("m" is "student"): one run, not two."""
    return args.student_size if MODEL_SIZES[size] == MODEL_SIZES[args.student_size] else size


def _warm_dir(out: Path, size: str, seed: int) -> Path:
    return out / "warm-start" / f"{size}-seed-{seed}"


def _run_dir(out: Path, size: str, seed: int, key: str) -> Path:
    return out / "runs" / f"{size}-seed-{seed}" / key


def _finished(cfg) -> bool:
    return report.finished(Path(cfg.out_dir), json.loads(json.dumps(to_dict(cfg))), cfg.steps)


def _run(cfg) -> None:
    """Run `cfg` (a DistillConfig or an RLConfig) from scratch, unless its directory holds this exact finished run."""
    if _finished(cfg):
        return
    shutil.rmtree(cfg.out_dir, ignore_errors=True)  # a half-finished run would append to its old metrics
    (rl if isinstance(cfg, RLConfig) else distill)(cfg)


def _parallel(jobs: list, args) -> None:
    run_parallel(jobs, args.workers, args.threads, args.progress, desc="table31 jobs")


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
    return command_line("table31", args)


def _accuracy(model, tokenizer, examples, args) -> float:
    return accuracy(model, tokenizer, get_task("arithmetic"), examples, max_new_tokens=args.max_new_tokens)


def table31_main(args: Table31Args) -> None:
    """CLI: run the benchmark, print the markdown section it wrote and, after a full run into the repository's
    results, rebuild RESULTS.md (`benchmarks.report`, which appends the hand-written table31_notes.md)."""
    table31(args)
    results_dir = Path(args.results_dir)
    print((results_dir / report.output_names(args.quick)["md"]).read_text())
    from benchmarks import report as results_md

    if not args.quick and results_dir.resolve() == results_md.RESULTS.resolve():
        results_md.write_results()


if __name__ == "__main__":
    import tyro

    table31_main(tyro.cli(Table31Args))
