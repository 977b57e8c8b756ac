"""The LM loop: act, grade, diverge, update — one visible loop for every way of choosing who acts.

    for step in range(steps):
        batch  = actor.rollouts(plans.next(step))   # student | teacher | data | mixture(λ)  (opd.lm.actors)
        signal = teacher.score(batch)                # one forward pass over prompt + completion
        loss   = divergence(student(batch), signal)  over completion tokens
        update(student, loss)

source=student with loss=reverse_kl is on-policy distillation; source=mixture is GKD; source=teacher is
sequence-level KD (with loss=sft: SFT on teacher samples); source=data with loss=sft is plain SFT.
"""

from __future__ import annotations

import functools
import json
import math
import signal as signal_module
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from opd import flops, losses
from opd.chunked import chunked_divergence, chunked_taken_logp
from opd.fused import fused_divergence
from opd.checkpoint import find_checkpoint, load_trainer_state, save_checkpoint, verify_checkpoint
from opd.config import LOSSES, DistillConfig, OptimArgs, config_changes, save_config, to_dict, unused_flags
from opd.lm.actors import Plans
from opd.lm.build import check_same_vocabulary, context_length, make_actor, make_teacher, prompt_sets
from opd.lm.model import final_hidden, lm_head, load_tokenizer, unwrap
from opd.lm.rollout import Batch, scatter_targets
from opd.lm.runs import drop_logged_after, flat_config, free_cores, library_bars
from opd.lm.server_rollouts import ratio_metrics, rollout_seed
from opd.lm.teacher import TeacherSignal, TeacherUnreachable
from opd.lm.teachers import SUMMED, RoutedSignal, batch_routes, grade, per_teacher_means
from opd.lm.xtok import CrossTokenizerSignal

Callback = Callable[[int, Any, dict], Any]
"""`callback(step, student, metrics)` after every update; return True to stop the run (a checkpoint is saved)."""
__all__ = ["distill", "student_loss", "make_teacher", "check_same_vocabulary", "TrainingError", "LOSSES"]


class TrainingError(RuntimeError):
    """A run stopped for a reason the user must act on; the message says what happened and what to do."""


def student_loss(student, batch: Batch, signal: TeacherSignal | RoutedSignal | None,
                 cfg: DistillConfig) -> tuple[torch.Tensor, dict]:
    """Mean per-token loss over the batch's completion tokens, and the metrics to log (per teacher too, for a batch
    graded by several: `opd.lm.teachers`)."""
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
    if batch.sampling_logp_BT is not None:
        # Samples from a sampler server whose weights may lag: how far (the divergences are not reweighted; why in
        # opd.lm.server_rollouts).
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
    replace --data / --eval-data. checker: a spec (`opd.lm.checkers`) or your own `(row, completion) -> float`.
    callbacks: `callback(step, student, metrics)` after every update, on every process; keys it adds to `metrics`
    are logged, and returning True stops the run with a checkpoint (early stopping).

    Runs unchanged under `accelerate launch` (DDP on CPU or GPUs, FSDP): each process samples its own prompts,
    gradients are averaged across processes, and the main process logs, evaluates and saves.
    """
    if cfg.loss in losses.DIVERGENCES:
        divergence_from_config(cfg)  # bad β/α fail now, not at the first step
    # Without a GPU, cpu=True lets accelerate pick gloo when launched with several processes.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                              log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=cfg.out_dir)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if cfg.overlap and cfg.sampler is None and (accelerator.device.type != "cpu" or accelerator.distributed_type in (
            DistributedType.FSDP, DistributedType.DEEPSPEED)):
        raise ValueError("--overlap without --sampler samples in a local CPU process from a whole copy of the student; "
                         "on GPUs or with a sharded (FSDP/DeepSpeed) student pass --sampler URL of a server")
    for note in unused_flags(cfg) if main else ():
        print(f"opd: warning: {note}", file=sys.stderr)
    out = Path(cfg.out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif torch.get_num_threads() > 1 and (free := free_cores()) < torch.get_num_threads():
        # Other jobs hold some cores: threads waiting on each other for a busy core make every step far slower.
        print(f"opd: note: other jobs are running on this CPU; using {free} torch thread(s) instead of "
              f"{torch.get_num_threads()} (--threads N to choose)", file=sys.stderr)
        torch.set_num_threads(free)
    torch.manual_seed(cfg.seed + rank)
    # The data first: a bad file or flag fails here, before any weights load.
    tokenizer = load_tokenizer(cfg.student)
    max_prompt = context_length(cfg.student) - cfg.sampling.max_new_tokens
    train, held_out, check = prompt_sets(cfg, tokenizer, max_prompt, prompts, eval_prompts, checker)
    ckpt = find_checkpoint(out / "checkpoint") if cfg.resume else None
    if ckpt:
        verify_checkpoint(ckpt)
    from opd.lm.lora import load_student

    student = load_student(cfg.student, cfg.lora, ckpt, accelerator.device)
    teacher = make_teacher(cfg, student, tokenizer, accelerator.device, resumed=ckpt is not None, prompts=train)

    opt = adamw(student, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.optim, cfg.steps))
    rng = torch.Generator().manual_seed(cfg.seed + 100_003 * rank)  # prompt order and mixture coins, per process
    start = 0
    if ckpt:
        start = load_trainer_state(ckpt, opt)["step"]
        loop_rngs = torch.load(ckpt / "loop_rng.pt")
        if len(loop_rngs) != world:
            raise ValueError(f"{ckpt} was written by {len(loop_rngs)} processes; resume it with as many, not {world}")
        rng.set_state(loop_rngs[rank][0])
        torch.set_rng_state(loop_rngs[rank][1])
        sched.last_epoch = start
        for group, base in zip(opt.param_groups, sched.base_lrs):  # this config's schedule, not the saved one's
            group["lr"], group["initial_lr"] = base * lr_factor(start, cfg.optim, cfg.steps), base
    student, opt = accelerator.prepare(student, opt)
    rows_per_step = cfg.batch_size * cfg.samples_per_prompt
    plans = Plans(len(train), cfg.batch_size, cfg.samples_per_prompt, lambda g: actor.choose(g),
                  lambda step: rollout_seed(cfg.seed, step, rank, world, rows_per_step), rng)
    actor = make_actor(cfg, student, teacher, train, tokenizer, accelerator, out, plans)
    metrics_file, interrupted, last = None, _InterruptFlag(), {}

    def checkpoint(step: int, rng_states) -> None:
        # Every process's RNGs go into the one checkpoint, so a resumed multi-process run is bit-for-bit too.
        rng_states = gather_object([rng_states])
        if main:
            save_checkpoint(out / "checkpoint", unwrap(student), tokenizer, step, opt,
                            extra_files={"loop_rng.pt": rng_states})
        accelerator.wait_for_everyone()

    try:
        if main and cfg.resume and not ckpt:
            print(f"opd: warning: --resume found no checkpoint in {out / 'checkpoint'}; starting from step 0",
                  file=sys.stderr)
        if main and ckpt and (out / "config.json").exists():
            changed = config_changes(json.loads((out / "config.json").read_text()), cfg)
            if changed:  # all of them take effect from this step on (the learning rate too: set above)
                print(f"opd: warning: resuming at step {start} with changed settings: {'; '.join(changed)}",
                      file=sys.stderr)
        if main:
            save_config(cfg, out)
        if cfg.report_to != "none":
            accelerator.init_trackers("tensorboard" if cfg.report_to == "tensorboard" else out.name,
                                      config=flat_config(to_dict(cfg)))
        if main and ckpt:
            drop_logged_after(out / "metrics.jsonl", start)  # steps logged after the checkpoint are redone now
        metrics_file = (out / "metrics.jsonl").open("a") if main else None
        student.train()
        costs = flops.model_cost(unwrap(student)), flops.model_cost(getattr(teacher, "model", None))
        total_flops = flops.logged_total(out / "metrics.jsonl", start)
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (cfg.progress and main),
                   desc=f"distill {cfg.source} {cfg.loss} seed {cfg.seed}")
        for step in bar:
            t0 = time.perf_counter()
            draw = plans.next(step)  # which prompts, and who acts on them
            try:
                if step == start or step % cfg.sync_every == 0:
                    # At `start` too: a fresh or resumed run must not sample from whatever a sampler held before.
                    actor.sync(student, step)
                batch = actor.rollouts(draw).to(accelerator.device)
                t_act = time.perf_counter()
                # What the teacher gives, and the loss's gradient, micro-batch by micro-batch.
                m = accumulate(student, teacher, batch, cfg, accelerator, step, batch_routes(train, draw.rows))
            except TeacherUnreachable as e:
                if world > 1:  # the other processes cannot join a save from here; the last periodic one stands
                    raise TrainingError(f"{e} Last checkpoint: {find_checkpoint(out / 'checkpoint') or 'none'}") from None
                # Save the state this step started from, so --resume redoes exactly this step.
                checkpoint(step, draw.rng_state)
                raise TrainingError(
                    f"{e} Saved a checkpoint at step {step} in {out / 'checkpoint'}; run again with --resume"
                ) from None
            if cfg.optim.grad_clip > 0:
                m["grad_norm"] = accelerator.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip).item()
            m["lr"] = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if not all(torch.isfinite(p).all() for p in student.parameters()):
                raise TrainingError(
                    f"the update at step {step} made the student's weights non-finite; stopped without saving. Last "
                    f"good checkpoint: {find_checkpoint(out / 'checkpoint') or 'none'}; lower optim.lr, then run "
                    f"again with --resume"
                )
            m.update(step=step + 1, source=draw.source, act_s=t_act - t0, step_s=time.perf_counter() - t0)
            if batch.sampled_by is not None:
                m["sampler_weights_version"] = batch.sampled_by
            if batch.teacher_prefix is not None:
                m["sampler_teacher_rows"] = batch.teacher_prefix.rows()
            m.update(flops.step_flops(*costs, batch.attention_mask_BL, batch.mask_BT, draw.source,
                                      scored=cfg.loss != "sft"))
            if hasattr(actor, "step_metrics"):  # the actor's own account (SKD: acceptance, both models' sampling FLOPs)
                m.update(actor.step_metrics())
                m["flops"] = sum(m[k] for k in flops.FLOP_KINDS if m[k] is not None)
            total_flops = m["total_flops"] = total_flops + m["flops"] * world
            if main and held_out is not None and cfg.eval_every and (
                    (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                from opd.lm.eval import checked_accuracy

                m["accuracy"] = checked_accuracy(unwrap(student), tokenizer, held_out, check,
                                                 cfg.sampling.max_new_tokens)
            stop = any([bool(cb(step + 1, unwrap(student), m)) for cb in callbacks])
            if main:
                metrics_file.write(json.dumps(m) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{m['loss']:.3f}", **({"acc": f"{m['accuracy']:.2f}"} if "accuracy" in m else {}))
            if cfg.report_to != "none":
                accelerator.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=step + 1)
            last = m
            interrupt = _any_process(accelerator, interrupted.flag)
            stop = _any_process(accelerator, stop) or interrupt
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stop:
                checkpoint(step + 1, plans.state())  # the RNGs as step+1 starts, also when it was drawn ahead
            if interrupt:
                raise KeyboardInterrupt(f"interrupted; saved a checkpoint at step {step + 1} in {out / 'checkpoint'}")
            if stop:
                break
    finally:
        actor.close()
        if hasattr(teacher, "close"):  # a remote teacher's connection pool
            teacher.close()
        if metrics_file is not None:
            metrics_file.close()
        if cfg.report_to != "none":
            accelerator.end_training()
        interrupted.restore()
    return last


def accumulate(student, teacher, batch: Batch, cfg: DistillConfig, accelerator, step: int,
               routes: list[str] | None = None) -> dict:
    """Grade the batch and back-propagate its loss in `cfg.optim.grad_accum` micro-batches; returns the metrics.
    `routes`: each row's teacher, with several (--teachers).

    Each micro-batch's mean per-token loss is weighted by its share of the batch's completion tokens, so the summed
    gradient is the one a single pass over the whole batch gives (up to float rounding); gradients are synchronised
    across processes on the last micro-batch only.
    """
    k = cfg.optim.grad_accum
    rows = batch.input_ids_BL.shape[0] // k
    total_tokens = max(1, int(batch.mask_BT.sum()))
    merged: dict = {}
    for j in range(k):
        micro = batch if k == 1 else batch.select(j * rows, (j + 1) * rows)
        micro_routes = None if routes is None else routes[j * rows:(j + 1) * rows]
        signal = grade(teacher, micro, micro_routes, score=cfg.loss != "sft")
        loss, m = student_loss(student, micro, signal, cfg)
        if not _all_finite(accelerator, loss):
            raise TrainingError(
                f"loss is {loss.item()} at step {step}; stopped without saving. Last good checkpoint: "
                f"{find_checkpoint(Path(cfg.out_dir) / 'checkpoint') or 'none'}; lower optim.lr or check the data, "
                f"then run again with --resume"
            )
        weight = m["completion_tokens"] / total_tokens
        with accelerator.no_sync(student) if j < k - 1 else nullcontext():
            accelerator.backward(loss * weight)
        for key, value in m.items():
            summed = key == "completion_tokens" or key.startswith(SUMMED)
            merged[key] = merged.get(key, 0) + (value if summed else value * weight)
    return per_teacher_means(merged)


def _all_finite(accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (all must stop together, or the others hang in all-reduce)."""
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    return bool(accelerator.reduce(ok, "min").item()) if accelerator.num_processes > 1 else bool(ok.item())


def _any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "max").item())


class _InterruptFlag:
    """Ctrl-C sets a flag instead of killing the step half-way; the loop saves a checkpoint, then stops."""

    def __init__(self):
        self.flag = False
        try:
            self._old = signal_module.signal(signal_module.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signal handling alone
            self._old = None

    def _handle(self, signum, frame):
        if self.flag:  # a second Ctrl-C means stop now
            raise KeyboardInterrupt
        self.flag = True

    def restore(self):
        if self._old is not None:
            signal_module.signal(signal_module.SIGINT, self._old)
