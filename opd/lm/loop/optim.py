"""The update: AdamW, the learning-rate schedule, and one optimizer step with its clip and its non-finite check."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from opd.checkpoint import find_checkpoint
from opd.config import OptimArgs
from opd.lm.loop.process import TrainingError


def adamw(model, optim: OptimArgs) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters as `optim` says. Fused (one kernel per parameter, the same update) where torch
    has that kernel: the default multi-tensor path allocates temporaries as large as all parameters together (~100 MB
    at the SmolLM2 pair's 16M-parameter student, at the step's memory peak)."""
    params = [p for p in model.parameters() if p.requires_grad]  # a LoRA student trains its adapters only
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=fused)


def lr_factor(step: int, optim: OptimArgs, steps: int) -> float:
    """The learning rate of update `step` (0-based) as a fraction of `optim.lr`: linear warm-up over warmup_steps
    (the first update uses 1/warmup_steps), then constant, or a linear or half-cosine decay that reaches 0 after the
    last update."""
    warmup = max(1, optim.warmup_steps)
    if step < warmup or optim.schedule == "constant":
        return min(1.0, (step + 1) / warmup)
    progress = (step - warmup) / max(1, steps - warmup)
    if optim.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def resume_schedule(opt: torch.optim.Optimizer, sched, factor: Callable[[int], float], start: int) -> None:
    """Continue `sched` at update `start` with this run's schedule, not the one saved with the optimizer state (so a
    resumed run may change the learning rate or the schedule)."""
    sched.last_epoch = start
    for group, base in zip(opt.param_groups, sched.base_lrs):
        group["lr"], group["initial_lr"] = base * factor(start), base


def update(model, opt: torch.optim.Optimizer, sched, optim: OptimArgs, step: int, out_dir: str | Path,
           clip: Callable = torch.nn.utils.clip_grad_norm_) -> dict:
    """One update from the gradients in `model`: clip (`clip`, e.g. the accelerator's, which knows about sharded
    models), step, advance the schedule, zero the gradients. Returns {'grad_norm' (when clipping), 'lr' (this
    update's)}. Raises TrainingError, naming the last good checkpoint, when the update made a weight non-finite."""
    m = {}
    if optim.grad_clip > 0:
        m["grad_norm"] = clip(model.parameters(), optim.grad_clip).item()
    m["lr"] = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise TrainingError(
            f"the update at step {step} made the student's weights non-finite; stopped without saving. Last "
            f"good checkpoint: {find_checkpoint(Path(out_dir) / 'checkpoint') or 'none'}; lower optim.lr, then run "
            f"again with --resume"
        )
    return m
