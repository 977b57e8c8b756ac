"""The sparse-reward RL baseline: no teacher, only the task's answer checker (GRPO-style group-normalised advantages).

    for step in range(steps):
        batch  = sample(student, each prompt group_size times)      # act: on-policy, like on-policy distillation
        reward = task.is_correct(completion) -> 1 or 0               # grade: one bit per completion, at the end
        adv    = (reward - mean of its group) / std of its group     # per prompt (GRPO); every token gets it
        loss   = policy_gradient_loss(log π(taken token), adv)       # averaged over all completion tokens
        update(student, loss)

It is the "on-policy RL" column of the seed's Table 3.1: the same on-policy data as on-policy distillation, but one
sparse reward per sequence instead of a teacher's grade on every token. Run directory as `opd.lm.train.distill`:
config.json, metrics.jsonl (with FLOPs, see `opd.flops`), checkpoint/.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from opd import flops
from opd.checkpoint import find_checkpoint, load_trainer_state, save_checkpoint
from opd.chunked import chunked_taken_logp
from opd.config import OptimArgs, SamplingArgs, save_config
from opd.lm.batch import Batch
from opd.lm.data.checkers import get_checker, score
from opd.lm.eval import checked_accuracy
from opd.lm.hf.model import final_hidden, lm_head, load_model, load_tokenizer
from opd.lm.loop.build import prompt_room, prompt_sets
from opd.lm.loop.optim import adamw, update
from opd.lm.loop.process import InterruptFlag, TrainingError
from opd.lm.rollouts.local import sample
from opd.losses import policy_gradient_loss


@dataclass(frozen=True)
class RLConfig:
    """One run of the RL baseline: the student samples groups of completions and learns from a 0/1 answer reward."""

    student: str
    """The student: a Hugging Face hub id or local directory."""
    task: str = "arithmetic"
    """A registered task name (see `opd.tasks`): prompts, and the checker that gives the reward."""
    data: str | None = None
    """Your training prompts instead of the task's (formats: `opd.lm.data.prompts`); rows need what --checker reads."""
    data_split: str = "train"
    """Split of --data to read."""
    data_fields: str = ""
    """Map your column names to opd's, e.g. prompt=question,answer=final."""
    eval_data: str | None = None
    """Held-out prompts, scored by --checker."""
    eval_split: str = "test"
    """Split of --eval-data to read."""
    checker: str | None = None
    """The reward and the held-out score (`opd.lm.data.checkers`); default: the task's own checker."""
    steps: int = 200
    """Student updates."""
    batch_size: int = 8
    """Prompts per update; each is sampled `group_size` times: an update sees batch_size × group_size completions."""
    group_size: int = 4
    """Completions per prompt; the advantage compares each with the others of its group."""
    scale_by_std: bool = True
    """Divide the group-centred reward by the group's standard deviation (GRPO). False keeps the mean baseline only
    (Dr. GRPO), which does not up-weight prompts that are almost always solved or almost never."""
    sampling: SamplingArgs = field(default_factory=SamplingArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train_examples: int = 5000
    """Size of the task's training split that prompts are drawn from."""
    eval_examples: int = 200
    """Held-out problems for accuracy evaluation."""
    eval_every: int = 50
    """Evaluate held-out accuracy every this many steps and after the last one (0: never)."""
    save_every: int = 100
    """Write a checkpoint every this many steps (and at the end)."""
    chunk_size: int | None = None
    """Positions per chunk when evaluating the LM head (None: `opd.chunked.auto_chunk_size`)."""
    seed: int = 0
    """Seeds prompt order and sampling."""
    out_dir: str = "runs/rl"
    """Run directory: config.json, metrics.jsonl, checkpoint/."""
    resume: bool = False
    """Continue from out_dir/checkpoint if it exists."""
    progress: bool = True
    """Show a progress bar."""


def group_advantages(rewards_PG: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages [P, G]: each reward minus its group's mean, divided by the group's (Bessel-corrected) standard
    deviation + eps when `scale_by_std`. A group whose rewards are all equal gets 0: it says nothing about which
    completion was better."""
    if rewards_PG.dim() != 2 or rewards_PG.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, group] with a group of at least 2, got {tuple(rewards_PG.shape)}")
    centred_PG = rewards_PG - rewards_PG.mean(1, keepdim=True)
    if not scale_by_std:
        return centred_PG
    return centred_PG / (rewards_PG.std(1, keepdim=True) + eps)


def rl_loss(
    student, batch: Batch, advantages_B: torch.Tensor, chunk_size: int | None = None
) -> tuple[torch.Tensor, dict]:
    """Policy-gradient loss averaged over the batch's completion tokens, each weighted by its sequence's advantage.

    The samples come from the current student, so the importance weight is 1 (its value) and the gradient is
    −A·∇log π(token).
    """
    mask_BT = batch.mask_BT.bool()
    hidden_ND = final_hidden(student, batch.input_ids_BL, batch.attention_mask_BL)[:, :-1][mask_BT]
    logp_N = chunked_taken_logp(hidden_ND, lm_head(student), batch.targets_BT[mask_BT], chunk_size=chunk_size)
    advantages_N = advantages_B[:, None].expand(mask_BT.shape)[mask_BT]
    per_token_N = policy_gradient_loss(logp_N, logp_N.detach(), advantages_N)
    loss = per_token_N.mean() if per_token_N.numel() else hidden_ND.sum() * 0.0
    return loss, {"loss": loss.item(), "completion_tokens": int(mask_BT.sum()), "student_logp": logp_N.mean().item()}


def rl(cfg: RLConfig) -> dict:
    """Run the RL baseline the config describes; returns the final metrics. Writes config, metrics and checkpoints."""
    if cfg.group_size < 2:
        raise ValueError(
            f"group_size must be at least 2 (advantages compare completions of one prompt), got {cfg.group_size}"
        )
    out = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.student)
    ckpt = find_checkpoint(out / "checkpoint") if cfg.resume else None
    train, held_out, _ = prompt_sets(cfg, tokenizer, prompt_room(cfg))
    spec = cfg.checker or (None if cfg.data else f"task:{cfg.task}")
    if spec is None:
        raise ValueError("the RL baseline's reward comes from a checker: pass --checker with --data")
    reward_of = get_checker(spec)
    student = load_model(str(ckpt) if ckpt else cfg.student)
    prompt_ids = train.prompt_ids
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    opt = adamw(student, cfg.optim)
    warmup = max(1, cfg.optim.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))  # warm-up, then constant
    rng = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if ckpt:
        start = load_trainer_state(ckpt, opt)["step"]
        rng.set_state(torch.load(ckpt / "loop_rng.pt"))
        sched.last_epoch = start
    save_config(cfg, out)
    cost = flops.model_cost(student)
    total_flops = flops.logged_total(out / "metrics.jsonl", start)
    metrics_file = (out / "metrics.jsonl").open("a")
    interrupted = InterruptFlag()
    student.train()
    last = {}
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress, desc="rl")
    try:
        for step in bar:
            t0 = time.perf_counter()
            idx = torch.randint(len(train), (cfg.batch_size,), generator=rng).tolist()
            idx_G = [i for i in idx for _ in range(cfg.group_size)]  # each prompt group_size times, side by side
            # Act: the student samples; grade: the task's checker, one bit per completion.
            s = cfg.sampling
            batch = sample(student, [prompt_ids[i] for i in idx_G], pad, eos, s.max_new_tokens, s.temperature, s.top_p,
                           s.compile)
            texts = tokenizer.batch_decode(batch.completion_ids(), skip_special_tokens=True)
            rewards_PG = torch.tensor(score(reward_of, [train.rows[i] for i in idx_G], texts))
            rewards_PG = rewards_PG.view(cfg.batch_size, cfg.group_size)
            advantages_PG = group_advantages(rewards_PG, cfg.scale_by_std)
            t_act = time.perf_counter()
            loss, m = rl_loss(student, batch, advantages_PG.flatten(), cfg.chunk_size)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss is {loss.item()} at step {step}; stopped without saving. Last good checkpoint: "
                    f"{find_checkpoint(out / 'checkpoint') or 'none'}; lower optim.lr, then run again with --resume"
                )
            loss.backward()
            m.update(update(student, opt, sched, cfg.optim, step, out))  # grad_norm, lr; stops on non-finite weights
            m.update(flops.step_flops(cost, None, batch.attention_mask_BL, batch.mask_BT, "student", scored=False))
            total_flops = m["total_flops"] = total_flops + m["flops"]
            m.update(
                step=step + 1, reward=rewards_PG.mean().item(),
                groups_with_signal=(rewards_PG.std(1) > 0).float().mean().item(),  # the rest have zero advantage
                act_s=t_act - t0, step_s=time.perf_counter() - t0,
            )
            if held_out is not None and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                m["accuracy"] = checked_accuracy(student, tokenizer, held_out, reward_of, cfg.sampling.max_new_tokens)
            metrics_file.write(json.dumps(m) + "\n")
            metrics_file.flush()
            bar.set_postfix(reward=f"{m['reward']:.2f}", **({"acc": f"{m['accuracy']:.2f}"} if "accuracy" in m else {}))
            last = m
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or interrupted.flag:
                save_checkpoint(out / "checkpoint", student, tokenizer, step + 1, opt,
                                extra_files={"loop_rng.pt": rng.get_state()})
            if interrupted.flag:
                raise KeyboardInterrupt(f"interrupted; saved a checkpoint at step {step + 1} in {out / 'checkpoint'}")
    finally:
        metrics_file.close()
        interrupted.restore()
    return last
