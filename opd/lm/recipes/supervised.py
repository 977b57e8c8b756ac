"""Supervised training on a task's worked examples: the cached task teacher, and warm-started students.

It lives on the LM side (not in `opd.tasks`) because it trains models and measures them with `opd.lm.eval.accuracy`;
`opd.tasks` holds only the task data, tokenizer and model configs it builds on.

`get_teacher()` returns the teacher committed under `opd/assets/`, else the one cached under
`$OPD_CACHE` (default `~/.cache/opd`), else trains one (minutes on 2 CPU cores) and caches it.
`opd teacher` (`train_teacher_main`) trains one explicitly.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_cosine_schedule_with_warmup,
)

from opd.args import TeacherArgs  # noqa: F401 (re-exported)
from opd.cache import cache_root
from opd.lm.eval import accuracy
from opd.tasks import get_task
from opd.tasks.base import Example
from opd.tasks.models import encode_examples, make_model, num_params
from opd.tasks.tokenizer import build_tokenizer

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"


WARM_START_VERSION = 1
"""Part of the warm-start cache key: bump it when the task, the model sizes or the training loop change."""


def sft_loss(model: PreTrainedModel, input_ids_BL, attention_mask_BL, completion_mask_BL) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens (targets in T = L-1 coordinates)."""
    logits_BTV = model(input_ids=input_ids_BL, attention_mask=attention_mask_BL).logits[:, :-1]
    targets_BT = input_ids_BL[:, 1:]
    mask_BT = completion_mask_BL[:, 1:]
    nll_BT = F.cross_entropy(logits_BTV.transpose(1, 2), targets_BT, reduction="none")
    return (nll_BT * mask_BT).sum() / mask_BT.sum()


@torch.no_grad()
def exact_match_rate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example]) -> float:
    """Share of `examples` whose every completion token (and the eos) is the model's argmax under teacher forcing.

    Such an example is exactly what greedy decoding would write, so this is a one-forward-pass lower
    bound on greedy accuracy (greedy can also reach a right answer through wrong steps, rarely).
    """
    input_ids_BL, attention_mask_BL, completion_mask_BL = encode_examples(tokenizer, examples)
    was_training = model.training
    model.eval()
    logits_BTV = model(input_ids=input_ids_BL, attention_mask=attention_mask_BL).logits[:, :-1]
    model.train(was_training)
    wrong_BT = (logits_BTV.argmax(-1) != input_ids_BL[:, 1:]) & completion_mask_BL[:, 1:]
    return (~wrong_BT.any(-1)).float().mean().item()


def train_supervised(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    warmup_steps: int | None = None,
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    progress: bool = True,
    desc: str = "sft",
    should_stop: Callable[[int], bool] | None = None,
) -> list[float]:
    """Fine-tune `model` in place on `examples` (completion tokens only); AdamW, warmup then cosine decay.

    Batches walk through shuffled passes over `examples`, in an order fixed by `seed`. Returns the loss
    of every step and leaves the model in eval mode. `warmup_steps` defaults to 5% of `steps`.
    `should_stop(steps_done)`, if given, is called after every step; training ends early once it returns True.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    if not examples:
        raise ValueError("train_supervised needs at least one example")
    warmup_steps = max(1, steps // 20) if warmup_steps is None else warmup_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for _ in bar:
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        loss = sft_loss(model, *encode_examples(tokenizer, batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if should_stop is not None and should_stop(len(losses)):
            # The bar stops short of its total: say it was meant to.
            bar.set_postfix(loss=f"{losses[-1]:.4f}", stopped=f"target reached at step {len(losses)}")
            break
    bar.close()
    model.eval()
    return losses


def train_teacher(args: TeacherArgs, progress: bool = True) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase, dict]:
    """Train a teacher as `args` says and measure it; returns (model, tokenizer, info) without saving.

    Uses the current torch thread count (`train_teacher_main` sets `args.threads`).
    """
    task = get_task(args.task)
    tokenizer = build_tokenizer(task)
    model = make_model(args.size, tokenizer, seed=args.seed)
    start = time.perf_counter()
    examples = task.examples(args.steps * args.batch_size, seed=args.seed, split="train")
    losses = train_supervised(
        model, tokenizer, examples, args.steps, args.batch_size, args.lr, args.seed, progress=progress, desc="teacher"
    )
    train_s = time.perf_counter() - start
    held_out = task.examples(args.eval_examples, seed=args.seed, split="test")
    acc = accuracy(model, tokenizer, task, held_out, progress=progress)
    info = dict(
        task=args.task,
        size=args.size,
        num_params=num_params(model),
        test_accuracy=acc,
        eval_examples=args.eval_examples,
        eval_seed=args.seed,
        final_loss=sum(losses[-20:]) / len(losses[-20:]),
        train_wall_s=round(train_s, 1),
        threads=torch.get_num_threads(),
        args=asdict(args),
        command=args.command(),
        config=model.config.to_dict(),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__),
    )
    return model, tokenizer, info


def save_teacher(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, info: dict, out_dir: Path) -> None:
    """Write safetensors weights, the tokenizer and `info.json` to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")


def load_teacher(path: str | os.PathLike) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase, dict]:
    """(model in fp32 eval mode, tokenizer, info) from a directory written by `save_teacher`."""
    path = Path(path)
    if not (path / "info.json").is_file():
        raise ValueError(f"{path} holds no saved teacher (no info.json); train one with `opd teacher`")
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, json.loads((path / "info.json").read_text())


def get_teacher(
    cache_dir: str | os.PathLike | None = None, retrain: bool = False, progress: bool = True, task: str = "arithmetic"
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase, dict]:
    """The teacher for `task`: the committed one, else the cached one, else a newly trained and cached one.

    `retrain=True` skips both and trains (with `TeacherArgs` defaults) into the cache, replacing what was there.
    """
    for path in ([] if retrain else [ASSETS_DIR / f"{task}-teacher", cache_root(cache_dir) / f"{task}-teacher"]):
        if (path / "info.json").is_file():
            return load_teacher(path)
    args = TeacherArgs(task=task, out_dir=str(cache_root(cache_dir) / f"{task}-teacher"))
    model, tokenizer, info = train_teacher(args, progress=progress)
    save_teacher(model, tokenizer, info, Path(args.out_dir))
    return model, tokenizer, info


def stop_at_exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    probe: list[Example],
    target: float | None,
    every: int,
) -> Callable[[int], bool]:
    """A `should_stop` for `train_supervised`: True at the first multiple of `every` steps where `model` writes at
    least `target` of `probe` exactly (`exact_match_rate`); never when `target` is None."""

    def reached(steps_done: int) -> bool:
        return target is not None and steps_done % every == 0 and exact_match_rate(model, tokenizer, probe) >= target

    return reached


def warm_start_student(
    tokenizer: PreTrainedTokenizerBase,
    size: str = "student",
    seed: int = 0,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 1e-2,
    target_accuracy: float | None = 0.2,
    check_every: int = 10,
    task: str = "arithmetic",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> LlamaForCausalLM:
    """A student of `size` given a little SFT on ground-truth examples: a starting point with headroom.

    Trains for `steps` steps (warmup, cosine decay), but stops at the first multiple of `check_every`
    steps where the student writes at least `target_accuracy` of 200 training-split problems exactly
    (`exact_match_rate`; None: never stop early). Students learn this task suddenly, once they find
    each column's digits, at a step that varies a lot with the seed (~400-750 for the default student);
    stopping on accuracy puts every seed just past that point, where it still improves fast, instead
    of some seeds before it, where they stay stuck. The learning rate is not annealed when it stops, so
    further training at a lower rate alone raises the student's accuracy.

    Deterministic given the arguments (up to the torch thread count); the data use seed `seed + 1`, so
    they differ from the teacher's training draws at the same seed. The result is cached under
    `<cache root>/students/` (see `cache_root`) keyed by every argument, as it takes a minute or two.
    """
    key = f"{task}-{size}-seed{seed}-steps{steps}-batch{batch_size}-lr{lr:g}-target{target_accuracy}-every{check_every}"
    path = cache_root(cache_dir) / "students" / f"{key}-v{WARM_START_VERSION}"
    if use_cache and (path / "config.json").is_file():
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    problems = get_task(task)
    student = make_model(size, tokenizer, seed=seed)
    examples = problems.examples(steps * batch_size, seed=seed + 1, split="train")
    probe = problems.examples(200, seed=seed + 2, split="train")

    losses = train_supervised(
        student, tokenizer, examples, steps, batch_size, lr, seed, progress=progress, desc="warm start",
        should_stop=stop_at_exact_match(student, tokenizer, probe, target_accuracy, check_every),
    )
    if use_cache:
        student.save_pretrained(path)
        tokenizer.save_pretrained(path)
        (path / "warm_start.json").write_text(json.dumps({"steps_done": len(losses), "final_loss": losses[-1]}) + "\n")
    return student


def train_teacher_main(args: TeacherArgs) -> None:
    """CLI: train a teacher, print its held-out accuracy and save it (the `opd teacher` command)."""
    out_dir = Path(args.out_dir) if args.out_dir else cache_root() / f"{args.task}-teacher"
    torch.set_num_threads(args.threads)
    model, tokenizer, info = train_teacher(args)
    save_teacher(model, tokenizer, info, out_dir)
    print(
        f"teacher: {info['num_params']:,} params, held-out accuracy {info['test_accuracy']:.3f} "
        f"on {info['eval_examples']} problems, trained in {info['train_wall_s']:.0f} s -> {out_dir}"
    )
