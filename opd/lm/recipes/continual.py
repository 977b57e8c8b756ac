"""Learning tasks one after another, with or without on-policy distillation from the earlier model on earlier prompts.

    teacher = task_teacher(("reverse", "shift", "sort"))            # knows every task; trained once, cached
    student = init_student(("reverse", "shift", "sort"), "runs/continual/start")
    result = run_sequence(ContinualConfig(teacher=str(teacher), student=str(student)))
    result["stages"][-1]["accuracy"]                                 # {"reverse": ..., "shift": ..., "sort": ...}

Stage k learns task k by on-policy distillation from `teacher` (the student samples, per-token reverse KL); the
first stage may learn from the reference completions instead (`first_source`), as there is nothing to forget yet. With
`keep_old`, a share of the stage's prompts are the earlier tasks' prompts, and the data file's `teacher` column routes
those to the model the stage starts from (the previous stage's checkpoint), frozen. Each stage is one `distill` run,
the one this command makes (its prompts are written to the stage's run directory as prompts.jsonl):

    opd train --student PREV --data prompts.jsonl --teachers new=TEACHER,old=PREV --teacher-column teacher

Without `keep_old` every prompt is the new task's. Both ways a stage takes the same number of updates of the same
batch size; the routed stage spends part of each batch on the old tasks, which is the price of keeping them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch

from opd.cache import cache_root
from opd.config import DistillConfig, OptimArgs, SamplingArgs
from opd.lm.recipes.supervised import save_teacher, train_supervised
from opd.tasks import get_task
from opd.tasks.models import make_model, num_params
from opd.tasks.tokenizer import build_tokenizer

NEW, OLD = "new", "old"
"""The teacher names a stage's data routes to: the task teacher, and the model the stage starts from."""


ROUTE_COLUMN = "teacher"
"""The data column that names each row's teacher (--teacher-column)."""


TEACHER_VERSION = 1
"""Part of the task teacher's cache key: bump it when the tasks or the training change."""


@dataclass(frozen=True)
class ContinualConfig:
    """A sequence of tasks learned stage by stage, each stage one `distill` run from the previous stage's model."""

    teacher: str
    """The task teacher: a model directory that knows every task of the sequence (e.g. `task_teacher`)."""
    student: str
    """The model the first stage run (`first_stage`) starts from: a directory (e.g. `init_student`, or an earlier
    stage's checkpoint)."""
    tasks: tuple[str, ...] = ("reverse", "shift", "sort")
    """Built-in task names (`opd.tasks`), learned in this order; they must share a tokenizer's characters."""
    keep_old: bool = True
    """Also distil the earlier tasks' prompts from the model the stage starts from (frozen). False: the stage sees
    the new task's prompts only."""
    old_fraction: float = 0.5
    """With `keep_old`, the share of a stage's prompts that are the earlier tasks' (split evenly among them)."""
    first_stage: int = 0
    """Index of the task to start at; the tasks before it count as learned by `student` (their prompts are old)."""
    first_source: Literal["student", "data"] = "student"
    """How stage 0 learns its task, with nothing to forget yet. student: on-policy distillation from `teacher`, as
    every later stage; data: SFT on the task's reference completions (source=data, loss=sft), which a randomly
    initialised model learns from far faster than from its own random samples."""
    first_lr: float | None = None
    """Stage 0's peak learning rate (None: `lr`); SFT from a random model takes a larger one than distillation."""
    steps: int = 200
    """Student updates per stage."""
    batch_size: int = 32
    """Prompts per update."""
    lr: float = 1e-3
    """Peak learning rate (AdamW, a short warm-up, then constant) of every stage; each stage starts a new optimiser."""
    loss: str = "reverse_kl"
    """The divergence (--loss) every row of a stage is trained with, the new task's and the old tasks' alike."""
    max_new_tokens: int = 8
    """Longest completion, in training and evaluation (the digit tasks answer in at most 6 characters)."""
    train_examples: int = 2000
    """Prompts in each stage's data file (new and old together)."""
    eval_examples: int = 200
    """Held-out problems per task, scored after every stage."""
    seed: int = 0
    """Seeds the prompt draws, the prompt order and the sampling of every stage (stage k runs with seed + k)."""
    out_dir: str = "runs/continual"
    """One run directory per stage (`stage{k}-{task}`: prompts.jsonl, config.json, metrics.jsonl, checkpoint/),
    and continual.json."""
    threads: int | None = 1
    """torch CPU threads of each stage (None: `distill`'s choice)."""
    progress: bool = False
    """Show each stage's progress bar."""

    def __post_init__(self) -> None:
        if len(self.tasks) < 1:
            raise ValueError("tasks must name at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks {self.tasks} name a task twice; each stage learns a new task")
        for name in self.tasks:
            get_task(name)  # an unknown name fails here, before any stage runs
        if not 0 <= self.first_stage < len(self.tasks):
            raise ValueError(f"first_stage must index tasks (0..{len(self.tasks) - 1}), got {self.first_stage}")
        if not 0.0 < self.old_fraction < 1.0:
            raise ValueError(f"old_fraction must lie strictly between 0 and 1, got {self.old_fraction}")
        for name, value in (("steps", self.steps), ("batch_size", self.batch_size), ("max_new_tokens",
                            self.max_new_tokens), ("train_examples", self.train_examples),
                            ("eval_examples", self.eval_examples)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


def shared_tokenizer(tasks: tuple[str, ...]):
    """One character-level tokenizer for every task of the sequence (the union of their alphabets), so one model and
    its checkpoints can be distilled from one another across stages."""
    alphabet = "".join(sorted(set("".join(get_task(name).alphabet for name in tasks))))
    return build_tokenizer(SimpleNamespace(alphabet=alphabet))


def init_student(tasks: tuple[str, ...], path: str | os.PathLike, size: str = "student", seed: int = 0) -> Path:
    """Save a freshly initialised model of `size` (`opd.tasks.models.MODEL_SIZES`) with the tasks' shared tokenizer to
    `path`, for the first stage to start from; returns `path`."""
    tokenizer = shared_tokenizer(tasks)
    model = make_model(size, tokenizer, seed=seed)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def task_rows(name: str, n: int, split: str, seed: int) -> list[dict]:
    """`n` problems of task `name` as data rows: prompt, completion (the reference), answer, task."""
    return [dict(prompt=e.prompt, completion=e.completion, answer=e.answer, task=name)
            for e in get_task(name).examples(n, seed=seed, split=split)]


def task_teacher(tasks: tuple[str, ...], size: str = "teacher", steps: int = 1200, batch_size: int = 64,
                 lr: float = 3e-3, seed: int = 0, eval_examples: int = 200, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> Path:
    """A teacher that knows every task of `tasks`: SFT on their reference completions, in equal shares; cached.

    The directory (under `cache_root`, keyed by every argument) holds the model, the shared tokenizer and info.json
    with its held-out accuracy on each task. Training it takes a few minutes on one CPU core; later calls return it.
    """
    key = f"continual-teacher-{'-'.join(tasks)}-{size}-steps{steps}-batch{batch_size}-lr{lr:g}-seed{seed}"
    path = cache_root(cache_dir) / f"{key}-v{TEACHER_VERSION}"
    if (path / "info.json").is_file():
        return path
    tokenizer = shared_tokenizer(tasks)
    model = make_model(size, tokenizer, seed=seed)
    examples = [e for name in tasks for e in get_task(name).examples(steps * batch_size // len(tasks) + 1, seed=seed,
                                                                     split="train")]
    losses = train_supervised(model, tokenizer, examples, steps, batch_size, lr, seed, progress=progress,
                              desc="continual teacher")
    accuracy = evaluate(model, tokenizer, tasks, eval_examples)
    info = dict(tasks=list(tasks), size=size, num_params=num_params(model), test_accuracy=accuracy,
                eval_examples=eval_examples, final_loss=sum(losses[-20:]) / len(losses[-20:]),
                args=dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed))
    save_teacher(model, tokenizer, info, path)
    return path


def stage_rows(cfg: ContinualConfig, stage: int) -> list[dict]:
    """Stage `stage`'s training prompts, each with its `teacher` route: the new task's (route `new`) and, with
    `keep_old`, the earlier tasks' (route `old`), `old_fraction` of them split evenly, then shuffled by the seed."""
    earlier = cfg.tasks[:stage] if cfg.keep_old else ()
    n_old = round(cfg.old_fraction * cfg.train_examples) if earlier else 0
    rows = [dict(r, **{ROUTE_COLUMN: NEW})
            for r in task_rows(cfg.tasks[stage], cfg.train_examples - n_old, "train", cfg.seed)]
    for i, name in enumerate(earlier):
        share = n_old // len(earlier) + (i < n_old % len(earlier))
        # The prompts that task was learned on (the same draw), now answered by the model that learned them.
        rows += [dict(r, **{ROUTE_COLUMN: OLD}) for r in task_rows(name, share, "train", cfg.seed)]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + stage)).tolist()
    return [rows[i] for i in order]


def stage_dir(cfg: ContinualConfig, stage: int) -> Path:
    """Stage `stage`'s run directory."""
    return Path(cfg.out_dir) / f"stage{stage}-{cfg.tasks[stage]}"


def stage_config(cfg: ContinualConfig, stage: int, student: str, data: str) -> DistillConfig:
    """The `distill` run of stage `stage`, from `student` on the prompts in `data` (routed by their `teacher`
    column): the task teacher as `new` and, when the stage keeps old tasks, `student` itself as `old`."""
    teachers = f"{NEW}={cfg.teacher}"
    if cfg.keep_old and stage > 0:
        teachers += f",{OLD}={student}"
    sft = stage == 0 and cfg.first_source == "data"
    return DistillConfig(
        student=student, teachers=teachers, teacher_column=ROUTE_COLUMN, data=data,
        source="data" if sft else "student", loss="sft" if sft else cfg.loss,
        steps=cfg.steps, batch_size=cfg.batch_size, train_examples=cfg.train_examples, eval_every=0,
        save_every=cfg.steps, sampling=SamplingArgs(max_new_tokens=cfg.max_new_tokens),
        optim=OptimArgs(lr=cfg.first_lr if stage == 0 and cfg.first_lr else cfg.lr), seed=cfg.seed + stage,
        out_dir=str(stage_dir(cfg, stage)), threads=cfg.threads, progress=cfg.progress,
    )


def run_stage(cfg: ContinualConfig, stage: int, student: str) -> Path:
    """Write stage `stage`'s prompts and run it from `student`; returns its checkpoint directory."""
    from opd.lm.train import distill

    out = stage_dir(cfg, stage)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in stage_rows(cfg, stage)))
    distill(stage_config(cfg, stage, student, str(data)))
    return out / "checkpoint"


def evaluate(model, tokenizer, tasks: tuple[str, ...], n: int, max_new_tokens: int = 8) -> dict[str, float]:
    """Greedy held-out accuracy of `model` on each task (its first `n` test problems, drawn with seed 0), by the
    task's own checker."""
    from opd.lm.data.checkers import get_checker
    from opd.lm.data.prompts import as_rows, encode
    from opd.lm.eval import checked_accuracy

    out = {}
    for name in tasks:
        held_out = encode(tokenizer, as_rows(task_rows(name, n, "test", seed=0)), max_prompt_len=1 << 30)
        out[name] = checked_accuracy(model, tokenizer, held_out, get_checker(f"task:{name}"), max_new_tokens)
    return out


def evaluate_dir(path: str | os.PathLike, tasks: tuple[str, ...], n: int, max_new_tokens: int = 8) -> dict[str, float]:
    """`evaluate` on the model saved at `path` (a stage's checkpoint)."""
    from opd.lm.hf.model import load_model, load_tokenizer

    return evaluate(load_model(str(path)).eval(), load_tokenizer(str(path)), tasks, n, max_new_tokens)


def run_sequence(cfg: ContinualConfig) -> dict:
    """Run the stages from `first_stage` on, each from the previous one's checkpoint, scoring every task after each;
    writes and returns {"config", "stages": [{"stage", "task", "student", "checkpoint", "accuracy": {task: acc}}]}."""
    from opd.config import to_dict

    result = {"config": json.loads(json.dumps(to_dict(cfg))), "stages": []}
    student = cfg.student
    for stage in range(cfg.first_stage, len(cfg.tasks)):
        checkpoint = run_stage(cfg, stage, student)
        result["stages"].append(dict(stage=stage, task=cfg.tasks[stage], student=student, checkpoint=str(checkpoint),
                                     accuracy=evaluate_dir(checkpoint, cfg.tasks, cfg.eval_examples,
                                                           cfg.max_new_tokens)))
        student = str(checkpoint)  # the next stage starts here, and keeps the old tasks with it as their teacher
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "continual.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def arm(cfg: ContinualConfig, keep_old: bool, out_dir: str) -> ContinualConfig:
    """`cfg` as one arm of a comparison: with or without the old tasks, in its own directory."""
    return replace(cfg, keep_old=keep_old, out_dir=out_dir)
