"""The LM loop: act, grade, diverge, update — one visible loop for every way of choosing who acts.

    for step in range(steps):
        batch  = actor.rollouts(plans.next(step))   # student | teacher | data | mixture(λ)  (opd.lm.rollouts.actors)
        signal = teacher.score(batch)                # one forward pass over prompt + completion
        loss   = divergence(student(batch), signal)  over completion tokens
        update(student, loss)

source=student with loss=reverse_kl is on-policy distillation; source=mixture is GKD; source=teacher is
sequence-level KD (with loss=sft: SFT on teacher samples); source=data with loss=sft is plain SFT.
"""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from opd import flops, losses
from opd.checkpoint import find_checkpoint
from opd.chunked import chunked_divergence, chunked_taken_logp
from opd.config import LOSSES, DistillConfig
from opd.fused import fused_divergence
from opd.lm.batch import Batch, TeacherSignal, scatter_targets
from opd.lm.diagnostics import completion_stats, topk_agreement
from opd.lm.eval import checked_accuracy
from opd.lm.hf.lora import load_student
from opd.lm.hf.model import check_same_vocabulary, final_hidden, library_bars, lm_head, load_tokenizer, unwrap
from opd.lm.loop.build import make_actor, make_teacher, prompt_room, prompt_sets, tool_use
from opd.lm.loop.fsdp import is_sharded, unsharded
from opd.lm.loop.optim import adamw, lr_factor, update
from opd.lm.loop.process import TrainingError, all_finite, any_process, start_process
from opd.lm.loop.run_dir import RunDir
from opd.lm.rollouts.actors import Plans
from opd.lm.rollouts.server import ratio_metrics, rollout_seed
from opd.lm.teachers.ema import checkpointed, follow_student
from opd.lm.teachers.routed import SUMMED, RoutedSignal, batch_routes, grade, per_teacher_means
from opd.lm.xtok.teacher import CrossTokenizerSignal

Callback = Callable[[int, Any, dict], Any]
"""`callback(step, student, metrics)` after every update; return True to stop the run (a checkpoint is saved)."""
__all__ = ["distill", "student_loss", "accumulate", "micro_batches", "make_teacher", "check_same_vocabulary",
           "TrainingError", "LOSSES", "adamw", "lr_factor"]
"""What train.py is imported for; TrainingError, adamw and lr_factor live in `opd.lm.loop` and stay importable here."""


def student_loss(student, batch: Batch, signal: TeacherSignal | RoutedSignal | None,
                 cfg: DistillConfig) -> tuple[torch.Tensor, dict]:
    """Mean per-token loss over the batch's completion tokens, and the metrics to log (per teacher too, for a batch
    graded by several: `opd.lm.teachers.routed`)."""
    mask_BT = batch.mask_BT.bool()
    hidden_ND = final_hidden(student, batch.input_ids_BL, batch.attention_mask_BL)[:, :-1][mask_BT]
    head = lm_head(student)
    targets_N = batch.targets_BT[mask_BT]
    metrics = {}
    if cfg.loss in ("sft", "sampled"):
        logp_N = chunked_taken_logp(hidden_ND, head, targets_N, chunk_size=cfg.chunk_size)
        if cfg.loss == "sft":
            per_token = -logp_N
        else:
            if signal.taken_logp_BT is None:
                raise ValueError("loss=sampled needs the teacher's log-probs of the taken tokens; this teacher's "
                                 "signal has none (a LocalTeacher built with with_taken_logp=False)")
            student_BT = scatter_targets(logp_N, mask_BT)
            sampling_BT = batch.sampling_logp_BT if batch.sampling_logp_BT is not None else student_BT.detach()
            per_token = losses.sampled_reverse_kl_pg_loss(
                student_BT, sampling_BT, signal.taken_logp_BT, mask_BT.float(), discount=cfg.discount,
                ratio_clip=cfg.ratio_clip,  # truncated IS for samples from a sampler server (else the ratio is 1)
            )[mask_BT]
            metrics["sampled_reverse_kl"] = (sampling_BT - signal.taken_logp_BT)[mask_BT].mean().item()
        if signal is not None and signal.taken_logp_BT is not None:
            metrics["teacher_logp"] = signal.taken_logp_BT[mask_BT].mean().item()
    elif isinstance(signal, CrossTokenizerSignal):  # a teacher with its own tokenizer: span by span (opd.lm.xtok)
        per_token = signal.per_token(divergence_from_config(cfg), hidden_ND, head, targets_N, cfg.chunk_size)
    else:
        per_token = teacher_divergence(divergence_from_config(cfg), hidden_ND, head, signal, mask_BT, cfg.chunk_size)
    if isinstance(signal, TeacherSignal) and not is_sharded(student):  # FSDP: the head's extra call would need all
        metrics.update(topk_agreement(hidden_ND, head, signal, mask_BT))  # the processes; plain students only
    if batch.sampling_logp_BT is not None:
        # Samples from a sampler server whose weights may lag: how far (the divergences are not reweighted; why in
        # opd.lm.rollouts.server).
        with torch.no_grad():
            taken_N = logp_N if cfg.loss in ("sft", "sampled") else chunked_taken_logp(
                hidden_ND, head, targets_N, chunk_size=cfg.chunk_size)
        metrics.update(ratio_metrics(taken_N, batch.sampling_logp_BT[mask_BT], cfg.ratio_clip))
    loss = per_token.mean() if per_token.numel() else hidden_ND.sum() * 0.0
    metrics["loss"] = loss.item()
    metrics["completion_tokens"] = int(mask_BT.sum())
    if isinstance(signal, RoutedSignal):
        metrics.update(signal.metrics(per_token.detach(), mask_BT))
    return loss, metrics


def teacher_divergence(divergence, hidden_ND: torch.Tensor, head, signal: TeacherSignal | RoutedSignal,
                       mask_BT: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Per completion token [N]: the divergence of the student (`hidden_ND`, `head`) from the teacher's signal."""
    if isinstance(signal, RoutedSignal):  # several teachers: each one's rows against its own signal
        return signal.per_token(lambda part, mask_RT, select_N: teacher_divergence(
            divergence, hidden_ND[select_N], head, part, mask_RT, chunk_size), mask_BT)
    if signal.hidden_BTD is not None:  # a local teacher: the written-out gradient where it applies (opd.fused)
        return fused_divergence(divergence, hidden_ND, head, teacher_hidden_ND=signal.hidden_BTD[mask_BT],
                                teacher_head=signal.head, chunk_size=chunk_size)
    return chunked_divergence(divergence, hidden_ND, head, chunk_size=chunk_size,
                              teacher_ids_NK=signal.topk_ids_BTK[mask_BT],
                              teacher_logp_NK=signal.topk_logp_BTK[mask_BT])


def divergence_from_config(cfg: DistillConfig):
    """The per-token divergence `cfg.loss` names, with the parameter it takes (β for JSD, α for skew KL)."""
    params = {"jsd": {"beta": cfg.beta}, "skew_forward_kl": {"alpha": cfg.alpha}, "skew_reverse_kl": {"alpha": cfg.alpha}}
    return losses.get_divergence(cfg.loss, **params.get(cfg.loss, {}))


def _library_bars_follow_progress(fn):
    """With progress=False, the libraries' bars stay quiet too (`library_bars`)."""
    @functools.wraps(fn)
    def run(cfg, *args, **kwargs):
        with library_bars(cfg.progress):
            return fn(cfg, *args, **kwargs)
    return run


@_library_bars_follow_progress
def distill(cfg: DistillConfig, prompts: Any = None, eval_prompts: Any = None, checker: Any = None,
            callbacks: Sequence[Callback] = ()) -> dict:
    """Run the LM loop the config describes; returns the last step's metrics. Writes config, metrics and checkpoints.

    prompts / eval_prompts: a `datasets.Dataset`, a list of dicts or prompt strings, or a path (`opd.lm.data`); they
    replace --data / --eval-data. checker: a spec (`opd.lm.data.checkers`) or your own `(row, completion) -> float`.
    callbacks: `callback(step, student, metrics)` after every update, on every process; keys it adds to `metrics`
    are logged, and returning True stops the run with a checkpoint (early stopping).

    Runs unchanged under `accelerate launch`, with DDP or an FSDP2-sharded student (configs/accelerate; on CPUs too,
    `opd.lm.loop.fsdp`): each process samples its own prompts, gradients are averaged across processes, and the main
    process logs, evaluates and saves (a sharded student gathered, as a plain Hugging Face directory).
    """
    if cfg.loss in losses.DIVERGENCES:
        divergence_from_config(cfg)  # bad β/α fail now, not at the first step
    proc = start_process(cfg)  # accelerator, threads, seed, warnings for ignored flags
    # The data first: a bad file or flag fails here, before any weights load.
    tokenizer = load_tokenizer(cfg.student)
    train, held_out, check = prompt_sets(cfg, tokenizer, prompt_room(cfg), prompts, eval_prompts, checker)
    run = RunDir(cfg, proc)  # finds and verifies the checkpoint --resume starts from
    student = load_student(cfg.student, cfg.lora, run.ckpt, proc.device, cfg.dtype, cfg.gradient_checkpointing)
    teacher = make_teacher(cfg, student, tokenizer, proc.device, resumed=run.ckpt is not None, prompts=train)
    opt = adamw(student, cfg.optim)
    schedule = functools.partial(lr_factor, optim=cfg.optim, steps=cfg.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = torch.Generator().manual_seed(cfg.seed + 100_003 * proc.rank)  # prompt order and mixture coins, per process
    student, opt = proc.prepare(student, opt)  # DDP, or FSDP2 (sharded: the optimizer then holds DTensor shards)
    start = run.restore(student, opt, sched, rng, schedule, kept=checkpointed(teacher))  # an EMA teacher's too
    if start >= cfg.steps:  # --resume of a finished run
        return run.finished(start, closing=(teacher,))
    plans = Plans(len(train), cfg.batch_size, cfg.samples_per_prompt, lambda g: actor.choose(g),
                  lambda step: rollout_seed(cfg.seed, step, proc.rank, proc.world,
                                            cfg.batch_size * cfg.samples_per_prompt), rng)
    actor = make_actor(cfg, student, teacher, train, tokenizer, proc.accelerator, run.out, plans)
    with run.open(start, student, opt, tokenizer, closing=(actor, teacher)):
        student.train()
        costs = flops.model_cost(unwrap(student)), flops.model_cost(getattr(teacher, "model", None))
        total_flops = flops.logged_total(run.out / "metrics.jsonl", start)
        first = score_at_start(run, start, student, tokenizer, held_out, check, cfg)  # logged with the first step
        for step in run.steps(start, desc=f"distill {cfg.source} {cfg.loss} seed {cfg.seed}"):
            t0 = time.perf_counter()
            draw = plans.next(step)  # which prompts, and who acts on them
            with run.saved_if_unreachable(step, draw.rng_state):
                if step == start or step % cfg.sync_every == 0:
                    # At `start` too: a fresh or resumed run must not sample from whatever a sampler held before.
                    actor.sync(student, step)
                with unsharded(student):  # ACT: the batch of completions (FSDP: with whole weights; no-op otherwise)
                    batch = actor.rollouts(draw).to(proc.device)
                batch.teacher_prompt_ids = train.teacher_prompts(draw.rows)  # what the teacher sees instead, if any
                t_act = time.perf_counter()
                # GRADE and DIVERGE: what the teacher gives, and the loss's gradient, micro-batch by micro-batch.
                m = accumulate(student, teacher, batch, cfg, proc.accelerator, step, batch_routes(train, draw.rows))
            # UPDATE: clip, step, schedule; stops on non-finite weights.
            m.update(update(student, opt, sched, cfg.optim, step, run.out, clip=proc.accelerator.clip_grad_norm_))
            follow_student(teacher, student)  # --teacher ema: the teacher moves a step towards the student
            m.update(step=step + 1, source=draw.source, act_s=t_act - t0, step_s=time.perf_counter() - t0,
                     **(first if step == start else {}))
            m.update(step_costs(batch, draw, actor, costs, cfg, tokenizer.eos_token_id))
            total_flops = m["total_flops"] = total_flops + m["flops"] * proc.world
            with run.saved_if_user_code_fails(step, m, plans.state()):  # your checker and callbacks
                evaluated = run.eval_due(step, held_out)
                if evaluated:
                    m["accuracy"] = evaluate(student, tokenizer, held_out, check, cfg)
                stop = any([bool(cb(step + 1, unwrap(student), m)) for cb in callbacks])
                if callbacks and not evaluated and held_out is not None and cfg.eval_every and any_process(
                        proc.accelerator, stop):  # a callback's early stop still ends with the held-out score
                    m["accuracy"] = evaluate(student, tokenizer, held_out, check, cfg)
            if run.log(step, m, stop, plans.state()):
                break
    return run.last


def evaluate(student, tokenizer, held_out, check, cfg: DistillConfig) -> float:
    """Held-out accuracy of the student as it is now (greedy completions, the run's checker)."""
    with unsharded(student):  # FSDP: whole weights on every process while it evaluates
        return checked_accuracy(unwrap(student), tokenizer, held_out, check, cfg.sampling.max_new_tokens,
                                tools=tool_use(cfg, tokenizer))


def score_at_start(run: RunDir, start: int, student, tokenizer, held_out, check, cfg: DistillConfig) -> dict:
    """`accuracy_at_start`: the held-out score before the first update of this process's run, with --eval-on-start on
    a fresh run, and on a resume whose checkpoint's evaluation never finished (your checker raised there)."""
    if held_out is None or not ((cfg.eval_on_start and start == 0) or run.missed_eval(start)):
        return {}
    return {"accuracy_at_start": evaluate(student, tokenizer, held_out, check, cfg)}


def step_costs(batch: Batch, draw, actor, costs, cfg: DistillConfig, eos_id: int | None) -> dict:
    """What a step logs besides its loss: completion lengths (`opd.lm.diagnostics`), the actor's own measures (tool
    calls), which sampler weights made the batch, how many rows a teacher began (SKD), and the FLOPs of sampling,
    teacher scoring and the update (the actor's own account where it has one)."""
    m = completion_stats(batch, cfg.sampling.max_new_tokens, eos_id)
    m.update(batch.rollout_metrics or {})  # multi-turn tool use: turns, calls, failed calls
    if batch.sampled_by is not None:
        m["sampler_weights_version"] = batch.sampled_by
    if batch.teacher_prefix is not None:
        m["sampler_teacher_rows"] = batch.teacher_prefix.rows()
    m.update(flops.step_flops(*costs, batch.attention_mask_BL, batch.mask_BT, draw.source, scored=cfg.loss != "sft"))
    if hasattr(actor, "step_metrics"):  # the actor's own account (SKD: acceptance, both models' sampling FLOPs)
        m.update(actor.step_metrics())
        m["flops"] = sum(m[k] for k in flops.FLOP_KINDS if m[k] is not None)
    return m


def accumulate(student, teacher, batch: Batch, cfg: DistillConfig, accelerator, step: int,
               routes: list[str] | None = None) -> dict:
    """Grade the batch and back-propagate its loss micro-batch by micro-batch (`micro_batches`); returns the metrics.
    `routes`: each row's teacher, with several (--teachers).

    Each micro-batch's mean per-token loss is weighted by its share of the batch's completion tokens, so the summed
    gradient is the one a single pass over the whole batch gives (up to float rounding); gradients are synchronised
    across processes on the last micro-batch only.
    """
    spans = micro_batches(batch, cfg)
    if cfg.max_tokens_per_microbatch is not None and accelerator.num_processes > 1:
        # Every process must run as many micro-batches: each one ends in collectives (the finite check below, FSDP's
        # reduce-scatter), and a process with fewer would leave the others waiting. Splitting only lowers memory.
        most = accelerator.reduce(torch.tensor([len(spans)], device=accelerator.device), "max")
        spans = split_to(spans, int(most.item()))
    total_tokens = max(1, int(batch.mask_BT.sum()))
    merged: dict = {}
    for j, (start, stop) in enumerate(spans):
        micro = batch if len(spans) == 1 and cfg.max_tokens_per_microbatch is None else batch.select(start, stop)
        if cfg.max_tokens_per_microbatch is not None:
            micro = micro.trim()
        micro_routes = None if routes is None else routes[start:stop]
        signal = grade(teacher, micro, micro_routes, score=cfg.loss != "sft")
        loss, m = student_loss(student, micro, signal, cfg)
        if not all_finite(accelerator, loss):
            raise TrainingError(
                f"loss is {loss.item()} at step {step}; stopped without saving. Last good checkpoint: "
                f"{find_checkpoint(Path(cfg.out_dir) / 'checkpoint') or 'none'}; lower optim.lr or check the data, "
                f"then run again with --resume"
            )
        weight = m["completion_tokens"] / total_tokens
        with accelerator.no_sync(student) if j < len(spans) - 1 else nullcontext():
            accelerator.backward(loss * weight)
        for key, value in m.items():
            summed = key == "completion_tokens" or key.startswith(SUMMED)
            merged[key] = merged.get(key, 0) + (value if summed else value * weight)
    if cfg.max_tokens_per_microbatch is not None:
        merged["micro_batches"] = len(spans)
    return per_teacher_means(merged)


def split_to(spans: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """`spans` cut into `n` (the one with the most rows halved, until there are `n`), in order; needs n <= rows."""
    spans = list(spans)
    while len(spans) < n:
        i = max(range(len(spans)), key=lambda j: spans[j][1] - spans[j][0])
        a, b = spans[i]
        if b - a < 2:
            raise ValueError(f"cannot cut {len(spans)} micro-batches of single rows into {n}")
        spans[i:i + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
    return spans


def micro_batches(batch: Batch, cfg: DistillConfig) -> list[tuple[int, int]]:
    """The row ranges [start, stop) an update is split into: --optim.grad-accum equal row counts or, with
    --max-tokens-per-microbatch, runs of consecutive rows whose padded size (rows × the width they span once padding
    columns are dropped, `Batch.trim`) stays within the budget."""
    rows = batch.input_ids_BL.shape[0]
    budget = cfg.max_tokens_per_microbatch
    if budget is None:
        n = rows // cfg.optim.grad_accum
        return [(j * n, (j + 1) * n) for j in range(cfg.optim.grad_accum)]
    spans, start, lo, hi = [], 0, None, None
    for i, real in enumerate(batch.attention_mask_BL.bool().tolist()):
        first, last = real.index(True), len(real) - real[::-1].index(True)
        if last - first > budget:  # prompt_sets refuses such rows before training; this guards other callers
            raise ValueError(f"row {i} of the batch is {last - first} tokens, more than --max-tokens-per-microbatch "
                             f"{budget}; raise the budget or lower --sampling.max-new-tokens")
        wide_lo, wide_hi = (first, last) if lo is None else (min(lo, first), max(hi, last))
        if i > start and (i + 1 - start) * (wide_hi - wide_lo) > budget:
            spans.append((start, i))
            start, wide_lo, wide_hi = i, first, last
        lo, hi = wide_lo, wide_hi
    spans.append((start, rows))
    return spans
