"""The runs of `opd bench opd_wins`: their configs, and the jobs that train them (each in a worker process).

Every run starts from the quickstart's warm-started student and is a plain `opd.lm.train.distill` run; a *branch* run
continues another run's final checkpoint (weights, optimiser state, step count) with other settings, by copying that
checkpoint into its own directory and resuming. Every run also scores a validation set (training-split problems that
are not among the training prompts) at each evaluation, through a callback: the learning-rate and temperature sweep
chooses on those numbers only, never on the test split.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from benchmarks.table31 import report as curves
from opd.config import DistillConfig, OptimArgs, SamplingArgs, to_dict
from opd.lm.eval import accuracy
from opd.lm.train import distill
from opd.tasks import get_task
from opd.tasks.base import Example

METHODS = {
    "opd": dict(label="on-policy distillation (reverse KL)", source="student", loss="reverse_kl"),
    "sft": dict(label="SFT on teacher samples", source="teacher", loss="sft"),
}
"""Method key -> its label and the `DistillConfig` choices that make it (the quickstart's two methods)."""

VALIDATION_SEED = 7
"""Seed of the validation draw (training split, minus the training prompts, which are drawn with seed 0)."""


@dataclass(frozen=True)
class Run:
    """One training run of the benchmark."""

    cfg: DistillConfig
    """What `distill` runs (out_dir says where)."""
    branch_from: str | None = None
    """A finished run directory whose final checkpoint this run continues (cfg.resume is then True)."""
    start_step: int = 0
    """The step of that checkpoint (0 for a run from the warm start)."""
    val_examples: int = 200
    """Validation problems scored at every evaluation (logged as `val_accuracy`)."""


def method_config(args, method: str, *, student: Path, teacher: Path, seed: int, out_dir: Path, steps: int,
                  lr: float | None = None, temperature: float = 1.0, task: str = "arithmetic",
                  max_new_tokens: int | None = None) -> DistillConfig:
    """The config of `method` for this benchmark's settings (the quickstart's, with evaluations along the way)."""
    choice = {k: v for k, v in METHODS[method].items() if k != "label"}
    if method == "sft":  # see OpdWinsArgs.sft_source
        choice["source"] = args.sft_source
    return DistillConfig(
        student=str(student), teacher=str(teacher), task=task, steps=steps, batch_size=args.batch_size,
        sampling=SamplingArgs(max_new_tokens=max_new_tokens or args.max_new_tokens, temperature=temperature),
        optim=OptimArgs(lr=args.lr if lr is None else lr), eval_every=args.eval_every,
        eval_examples=args.eval_examples, save_every=steps, seed=seed, out_dir=str(out_dir), progress=False,
        threads=args.threads, **choice)


def sweep_points(args) -> list[tuple[str, float, float]]:
    """(method, learning rate, temperature) of every sweep point; SFT's samples come from the teacher at 1."""
    points = [(method, lr, 1.0) for method in METHODS for lr in args.sweep_lrs]
    return points + [("opd", args.lr, t) for t in args.sweep_temperatures if t != 1.0]


def point_name(method: str, lr: float, temperature: float) -> str:
    """The run directory's name of `method` at learning rate `lr` and sampling `temperature` (the sweep's runs and
    the tuned regime's)."""
    return f"{method}-lr{lr:g}-t{temperature:g}"


def validation_examples(n: int, train_examples: int, task: str = "arithmetic") -> list[Example]:
    """`n` training-split problems of `task` that are not among the first `train_examples` training prompts `distill`
    draws from (`opd.lm.data.prompts.task_rows`: seed 0), so that tuning on them never looks at the test split."""
    task = get_task(task)
    used = {e.prompt for e in task.examples(train_examples, seed=0, split="train")}
    pool = task.examples(4 * n + 100, seed=VALIDATION_SEED, split="train")
    kept = [e for e in pool if e.prompt not in used][:n]
    if len(kept) < n:
        raise ValueError(f"only {len(kept)} validation problems outside the training prompts; ask for fewer")
    return kept


IGNORED = ("progress", "resume", "steps", "save_every")
"""Config fields that do not make two runs differ up to their common step (`resume` is set by `train` itself; with
a constant learning rate, the step count only says where a run stops)."""


def _same_run(out: Path, cfg: DistillConfig) -> tuple[bool, int | None]:
    """Whether `out` holds a run of `cfg`'s settings (up to `IGNORED`), and the last step it finished (None if none)."""
    if not ((out / "config.json").is_file() and (out / "metrics.jsonl").is_file() and (out / "checkpoint").is_dir()):
        return False, None
    saved = json.loads((out / "config.json").read_text())
    wanted = json.loads(json.dumps(to_dict(cfg)))
    same = {k: v for k, v in saved.items() if k not in IGNORED} == {k: v for k, v in wanted.items() if k not in IGNORED}
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return same, json.loads(lines[-1])["step"] if lines else None


def finished(run: Run) -> bool:
    """Whether the run's directory holds this run, finished at its step count or extended past it (the curve has
    every evaluation up to there)."""
    same, last = _same_run(Path(run.cfg.out_dir), run.cfg)
    return same and last is not None and last >= run.cfg.steps


def train(run: Run) -> None:
    """Train `run`, unless its directory already holds it finished. A finished run of the same settings but fewer
    steps is extended (resumed from its checkpoint: with a constant learning rate that is the same run as a longer
    one); anything else there is removed and the run starts afresh (from its branch point, if it has one)."""
    if finished(run):
        return
    out = Path(run.cfg.out_dir)
    same, last = _same_run(out, run.cfg)
    extend = same and last is not None and last < run.cfg.steps
    if not extend:
        shutil.rmtree(out, ignore_errors=True)  # a half-finished run would append to its old metrics
        if run.branch_from is not None:
            source = Path(run.branch_from) / "checkpoint"
            step = json.loads((source / "trainer_state.json").read_text())["step"] if source.is_dir() else None
            if step != run.start_step:
                raise ValueError(f"{run.cfg.out_dir} continues {run.branch_from} from step {run.start_step}, but its "
                                 f"checkpoint is at step {step}; rerun that run with --steps {run.start_step}")
            shutil.copytree(source, out / "checkpoint")
    resume = extend or run.branch_from is not None  # continue the checkpoint in out_dir
    distill(dataclasses.replace(run.cfg, resume=resume), callbacks=[_validation_callback(run)])


def _validation_callback(run: Run):
    from opd.lm.hf.model import load_tokenizer

    task = get_task(run.cfg.task)
    val = validation_examples(run.val_examples, run.cfg.train_examples, run.cfg.task)
    tokenizer = load_tokenizer(run.cfg.student)
    every, last = run.cfg.eval_every, run.cfg.steps

    def score(step: int, student, metrics: dict) -> None:
        if every and (step % every == 0 or step == last):
            metrics["val_accuracy"] = accuracy(student, tokenizer, task, val,
                                               max_new_tokens=run.cfg.sampling.max_new_tokens)

    return score


def read_run(run_dir: Path, start_accuracy: float, start_val: float | None = None, start_step: int = 0) -> dict:
    """A run's curve (`table31.report.read_curve`: step, FLOPs, wall time, test accuracy) plus its validation curve;
    its first point is (`start_step`, the given accuracies): the warm start, or a branch's starting checkpoint."""
    curve = curves.read_curve(run_dir, start_accuracy)
    curve["step"][0] = start_step
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    curve["val_accuracy"] = [start_val] + [m.get("val_accuracy") for m in lines if "accuracy" in m]
    curve["seconds_per_update"] = curve["wall_seconds_total"] / max(1, len(lines))
    return curve


def accuracy_at(curve: dict, step: int, key: str = "accuracy") -> float:
    """The evaluation of `curve` at `step` (an error naming the steps there are, if it was not evaluated there)."""
    if step not in curve["step"]:
        raise ValueError(f"no evaluation at step {step} (evaluated at {curve['step']}); make it a multiple of "
                         f"eval_every")
    return curve[key][curve["step"].index(step)]


def probe_teachers(teachers: dict[str, Path], student_dir: Path, n: int, max_new_tokens: int) -> dict:
    """For each teacher: clean greedy accuracy, how often it still ends with the right answer when it continues
    from (a) the warm-started student's own wrong greedy prefixes, cut just after their first wrong character, and
    (b) true prefixes with one digit of a step made wrong; and how often its temperature-1 samples are exactly the
    true solution (what SFT on its samples learns from). All on `n` test problems."""
    import random

    from opd.lm.hf.model import load_model, load_tokenizer
    from opd.lm.recipes.recovery import continuation_accuracy, corrupt, error_prefixes, sample_match_rate

    task = get_task("arithmetic")
    problems = task.examples(n, seed=0, split="test")
    tokenizer = load_tokenizer(str(student_dir))
    student_errors = error_prefixes(load_model(str(student_dir)), tokenizer, problems, max_new_tokens)
    rng = random.Random("probe")
    corrupted = [corrupt(e, rng) for e in problems]
    out = {"problems": n, "student_error_prefixes": len(student_errors),
           "student_error_examples": [e.prompt for e in student_errors[:3]]}
    for name, path in teachers.items():
        model = load_model(str(path))
        out[name] = {
            "clean_accuracy": accuracy(model, tokenizer, task, problems, max_new_tokens=max_new_tokens),
            "recovers_from_student_errors": continuation_accuracy(model, tokenizer, student_errors, max_new_tokens),
            "recovers_from_corrupted_digit": continuation_accuracy(model, tokenizer, corrupted, max_new_tokens),
            "sample_is_true_solution": sample_match_rate(model, tokenizer, problems, max_new_tokens),
        }
    return out
