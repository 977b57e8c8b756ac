"""The LM loop: act, grade, diverge, update — one visible loop for every way of choosing who acts.

    for step in range(steps):
        batch  = act(source)                    # student | teacher | data | mixture(λ)
        signal = teacher.score(batch)           # one forward pass over prompt + completion
        loss   = divergence(student(batch), signal) over completion tokens
        update(student, loss)

source=student with loss=reverse_kl is on-policy distillation; source=mixture is GKD; source=teacher is
sequence-level KD (with loss=sft: SFT on teacher samples); source=data with loss=sft is plain SFT.
"""

from __future__ import annotations

import json
import signal as signal_module
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from opd import flops, losses
from opd.chunked import chunked_divergence, chunked_taken_logp
from opd.fused import fused_divergence
from opd.checkpoint import find_checkpoint, load_trainer_state, save_checkpoint
from opd.config import DistillConfig, OptimArgs, save_config
from opd.lm.model import final_hidden, lm_head, load_model, load_tokenizer, unwrap
from opd.lm.process_rollouts import ProcessRollouts
from opd.lm.rollout import Batch, build_batch, encode_prompts, layout, sample, scatter_targets
from opd.lm.server_rollouts import RolloutsAhead, ServerRollouts, ratio_metrics, rollout_seed
from opd.lm.teacher import LocalTeacher, Teacher, TeacherSignal, TeacherUnreachable, score_batch
from opd.tasks import get_task

LOSSES = ("sampled", "sft", *losses.DIVERGENCES)


class TrainingError(RuntimeError):
    """A run stopped for a reason the user must act on; the message says what happened and what to do."""


def make_teacher(cfg: DistillConfig, student, tokenizer, device="cpu") -> Teacher | None:
    """The teacher the config names: a local HF model (vocabularies checked) or an OpenAI-compatible server."""
    if cfg.teacher is None:
        if cfg.loss != "sft" or cfg.source not in ("data",):
            raise ValueError(f"source={cfg.source} with loss={cfg.loss} needs a teacher; pass --teacher")
        return None
    if cfg.teacher.startswith(("http://", "https://")):
        from opd.lm.remote import RemoteTeacher

        return RemoteTeacher(cfg.teacher, model=None, top_k=cfg.top_k, timeout=cfg.remote_timeout,
                             max_retries=cfg.remote_max_retries)
    model = load_model(cfg.teacher, dtype=cfg.teacher_dtype, device=device)
    check_same_vocabulary(student, model, tokenizer, load_tokenizer(cfg.teacher))
    # only the sampled loss reads the teacher's log-prob of the taken token; the divergences use the hidden states
    return LocalTeacher(model, chunk_size=cfg.chunk_size, with_taken_logp=cfg.loss not in losses.DIVERGENCES)


def check_same_vocabulary(student, teacher, student_tok=None, teacher_tok=None) -> None:
    """Logit-level distillation compares distributions over the same token ids: refuse models that do not share them."""
    vs = student.get_output_embeddings().weight.shape[0]
    vt = teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise ValueError(
            f"teacher vocabulary size {vt} != student vocabulary size {vs}; distil between models that share a "
            f"tokenizer (cross-tokenizer alignment is not available yet)"
        )
    if student_tok is not None and teacher_tok is not None and student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ValueError(
            "teacher and student tokenizers map tokens to different ids; distil between models that share a tokenizer"
        )


def student_loss(student, batch: Batch, signal: TeacherSignal | None, cfg: DistillConfig) -> tuple[torch.Tensor, dict]:
    """Mean per-token loss over the batch's completion tokens, and the metrics to log."""
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
    else:
        divergence = divergence_from_config(cfg)
        if signal.hidden_BTD is not None:  # a local teacher: the written-out gradient where it applies (opd.fused)
            per_token = fused_divergence(divergence, hidden_ND, head, teacher_hidden_ND=signal.hidden_BTD[mask_BT],
                                         teacher_head=signal.head, chunk_size=cfg.chunk_size)
        else:
            per_token = chunked_divergence(divergence, hidden_ND, head, chunk_size=cfg.chunk_size,
                                           teacher_ids_NK=signal.topk_ids_BTK[mask_BT],
                                           teacher_logp_NK=signal.topk_logp_BTK[mask_BT])
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
    return loss, metrics


def adamw(model, optim: OptimArgs) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters as `optim` says. Fused (one kernel per parameter, the same update) where torch
    has that kernel: the default multi-tensor path allocates temporaries as large as all parameters together (~100 MB
    at the SmolLM2 pair's 16M-parameter student, at the step's memory peak)."""
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=fused)


def divergence_from_config(cfg: DistillConfig):
    """The per-token divergence `cfg.loss` names, with the parameter it takes (β for JSD, α for skew KL)."""
    params = {"jsd": {"beta": cfg.beta}, "skew_forward_kl": {"alpha": cfg.alpha}, "skew_reverse_kl": {"alpha": cfg.alpha}}
    return losses.get_divergence(cfg.loss, **params.get(cfg.loss, {}))


def distill(cfg: DistillConfig) -> dict:
    """Run the LM loop the config describes; returns the final metrics. Writes config, metrics and checkpoints.

    Runs unchanged under `accelerate launch` (DDP on CPU or GPUs, FSDP): each process samples its own prompts,
    gradients are averaged across processes, and the main process logs, evaluates and saves.
    """
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; choose one of {', '.join(LOSSES)}")
    if cfg.loss in losses.DIVERGENCES:
        divergence_from_config(cfg)  # bad β/α fail now, not at the first step
    if cfg.source == "mixture" and not 0.0 <= cfg.lmbda <= 1.0:
        raise ValueError(f"lmbda must be in [0, 1], got {cfg.lmbda}")
    if cfg.sampler is not None and cfg.source not in ("student", "mixture"):
        raise ValueError(f"--sampler samples the student's completions; source={cfg.source} has none: drop --sampler")
    if cfg.sampler is not None and not cfg.sampler.startswith(("http://", "https://")):
        raise ValueError(f"--sampler {cfg.sampler!r} is not a URL; pass http(s)://host:port/v1 of an `opd serve`")
    if cfg.sync_every < 1 or not cfg.ratio_clip > 0:
        raise ValueError(f"need sync_every >= 1 and ratio_clip > 0, got {cfg.sync_every} and {cfg.ratio_clip}")
    if cfg.overlap and cfg.source not in ("student", "mixture"):
        raise ValueError(f"--overlap samples the student's next batch during the update; source={cfg.source} has "
                         f"no student batches: drop --overlap")
    # Without a GPU, cpu=True lets accelerate pick gloo when launched with several processes.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if cfg.overlap and cfg.sampler is None and (accelerator.device.type != "cpu" or accelerator.distributed_type in (
            DistributedType.FSDP, DistributedType.DEEPSPEED)):
        raise ValueError("--overlap without --sampler samples in a local CPU process from a whole copy of the student; "
                         "on GPUs or with a sharded (FSDP/DeepSpeed) student pass --sampler URL of a server")
    out = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed + rank)
    tokenizer = load_tokenizer(cfg.student)
    ckpt = find_checkpoint(out / "checkpoint") if cfg.resume else None
    student = load_model(str(ckpt) if ckpt else cfg.student, device=accelerator.device)
    teacher = make_teacher(cfg, student, tokenizer, accelerator.device)
    task = get_task(cfg.task)
    train = task.examples(cfg.train_examples, seed=0, split="train")
    test = task.examples(cfg.eval_examples, seed=0, split="test")
    max_prompt = _context_length(student) - cfg.sampling.max_new_tokens
    prompt_ids = encode_prompts(tokenizer, [e.prompt for e in train], max_prompt)
    reference_ids = [tokenizer(e.completion, add_special_tokens=False)["input_ids"] for e in train]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    opt = adamw(student, cfg.optim)
    warmup = max(1, cfg.optim.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
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
    student, opt = accelerator.prepare(student, opt)
    if main:
        save_config(cfg, out)
    metrics_file = (out / "metrics.jsonl").open("a") if main else None
    interrupted = _InterruptFlag()

    def checkpoint(step: int, rng_states=None) -> None:
        # Every process's RNGs go into the one checkpoint, so a resumed multi-process run is bit-for-bit too.
        rng_states = gather_object([rng_states or (rng.get_state(), torch.get_rng_state())])
        if main:
            save_checkpoint(out / "checkpoint", unwrap(student), tokenizer, step, opt,
                            extra_files={"loop_rng.pt": rng_states})
        accelerator.wait_for_everyone()

    teacher_sampler = None
    if cfg.source == "teacher" and teacher is not None and not isinstance(teacher, LocalTeacher):
        from opd.lm.remote import RemoteSampler

        teacher_sampler = RemoteSampler(cfg.teacher, timeout=cfg.remote_timeout, max_retries=cfg.remote_max_retries)
    def draw():
        """The next step's prompts and actor, and the loop RNGs' state before drawing them (that step's start)."""
        state = rng.get_state(), torch.get_rng_state()
        idx = torch.randint(len(train), (cfg.batch_size,), generator=rng).tolist()
        source = cfg.source
        if source == "mixture":
            source = "student" if torch.rand((), generator=rng).item() < cfg.lmbda else "data"
        return state, idx, source

    student.train()
    costs = flops.model_cost(unwrap(student)), flops.model_cost(getattr(teacher, "model", None))
    total_flops = flops.logged_total(out / "metrics.jsonl", start)
    last, upcoming = {}, None
    student_sampler = None
    if cfg.sampler:
        student_sampler = ServerRollouts(cfg.sampler, out, cfg.remote_timeout, cfg.remote_max_retries)
    elif cfg.overlap:  # no server: a second process on this machine samples (opd.lm.process_rollouts)
        # with a local teacher, the sampler process grades part of each batch too
        student_sampler = ProcessRollouts(student, eos, teacher=teacher if isinstance(teacher, LocalTeacher)
                                          and cfg.loss != "sft" else None)
    ahead = RolloutsAhead(student_sampler) if cfg.overlap else None
    try:
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (cfg.progress and main),
                   desc="distill")
        for step in bar:
            t0 = time.perf_counter()
            # Which prompts, and who acts (with overlap, drawn during the last step: the same draws in the same order).
            rng_at_step_start, idx, source = upcoming or draw()
            prompts, upcoming, sampled_by = [prompt_ids[i] for i in idx], None, None
            try:
                prefetched = ahead.take(step) if ahead is not None else None  # requested during the last step
                if student_sampler is not None and (step == start or step % cfg.sync_every == 0):
                    # At `start` too: a fresh or resumed run must not sample from whatever the server held before.
                    # After `take`: the server never swaps weights under a request in flight.
                    student_sampler.push(student, accelerator, step)
                s = cfg.sampling
                # Servers sample seeded per step and process, so a resumed run draws the same samples.
                seed = rollout_seed(cfg.seed, step, rank, world, cfg.batch_size)
                if source == "data":
                    batch = build_batch(prompts, [reference_ids[i] for i in idx], pad, eos)
                elif source == "teacher" and teacher_sampler is not None:
                    completions, _ = teacher_sampler.sample(prompts, s.max_new_tokens, s.temperature, s.top_p,
                                                            seed=seed)
                    batch = layout(prompts, completions, pad)
                elif source == "student" and student_sampler is not None:  # the batch carries the sampler's log-probs
                    batch, sampled_by = prefetched or (student_sampler.rollouts(prompts, pad, s, seed),
                                                       student_sampler.version)
                else:
                    actor = unwrap(student) if source == "student" else teacher.model
                    batch = sample(actor, prompts, pad, eos, s.max_new_tokens, s.temperature, s.top_p, s.compile)
                if ahead is not None and step + 1 < cfg.steps:
                    # Overlap: the server samples step+1 from the weights it holds now while this step trains on.
                    upcoming = draw()
                    if upcoming[2] == "student":
                        ahead.request(step + 1, [prompt_ids[i] for i in upcoming[1]], pad, s,
                                      rollout_seed(cfg.seed, step + 1, rank, world, cfg.batch_size))
                batch = batch.to(accelerator.device)
                t_act = time.perf_counter()
                # What the teacher gives: one forward pass over prompt + completion.
                signal = None if cfg.loss == "sft" else score_batch(teacher, batch)
            except TeacherUnreachable as e:
                if world > 1:  # the other processes cannot join a save from here; the last periodic one stands
                    raise TrainingError(f"{e} Last checkpoint: {find_checkpoint(out / 'checkpoint') or 'none'}") from None
                # Save the state this step started from, so --resume redoes exactly this step.
                checkpoint(step, rng_at_step_start)
                raise TrainingError(
                    f"{e} Saved a checkpoint at step {step} in {out / 'checkpoint'}; run again with --resume"
                ) from None
            loss, m = student_loss(student, batch, signal, cfg)
            if not _all_finite(accelerator, loss):
                raise TrainingError(
                    f"loss is {loss.item()} at step {step}; stopped without saving. Last good checkpoint: "
                    f"{find_checkpoint(out / 'checkpoint') or 'none'}; lower optim.lr or check the data, then run "
                    f"again with --resume"
                )
            accelerator.backward(loss)
            if cfg.optim.grad_clip > 0:
                m["grad_norm"] = accelerator.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip).item()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if not all(torch.isfinite(p).all() for p in student.parameters()):
                raise TrainingError(
                    f"the update at step {step} made the student's weights non-finite; stopped without saving. Last "
                    f"good checkpoint: {find_checkpoint(out / 'checkpoint') or 'none'}; lower optim.lr, then run "
                    f"again with --resume"
                )
            m.update(step=step + 1, source=source, act_s=t_act - t0, step_s=time.perf_counter() - t0)
            if sampled_by is not None:
                m["sampler_weights_version"] = sampled_by
            if batch.teacher_prefix is not None:
                m["sampler_teacher_rows"] = batch.teacher_prefix.rows()
            m.update(flops.step_flops(*costs, batch.attention_mask_BL, batch.mask_BT, source, scored=signal is not None))
            total_flops = m["total_flops"] = total_flops + m["flops"] * world
            if main and (cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                m["accuracy"] = _eval_accuracy(unwrap(student), tokenizer, task, test, cfg)
            if main:
                metrics_file.write(json.dumps(m) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{m['loss']:.3f}", **({"acc": f"{m['accuracy']:.2f}"} if "accuracy" in m else {}))
            last = m
            stop = _any_process(accelerator, interrupted.flag)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stop:
                checkpoint(step + 1, upcoming and upcoming[0])  # the RNGs as step+1 starts, also with overlap
            if stop:
                raise KeyboardInterrupt(f"interrupted; saved a checkpoint at step {step + 1} in {out / 'checkpoint'}")
    finally:
        if ahead is not None:
            ahead.close()
        for client in (student_sampler, teacher_sampler, teacher):  # connection pools and processes, if any
            if hasattr(client, "close"):
                client.close()
        if metrics_file is not None:
            metrics_file.close()
        interrupted.restore()
    return last


def _all_finite(accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (all must stop together, or the others hang in all-reduce)."""
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    return bool(accelerator.reduce(ok, "min").item()) if accelerator.num_processes > 1 else bool(ok.item())


def _any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "max").item())


def _eval_accuracy(student, tokenizer, task, test, cfg) -> float:
    from opd.lm.eval import accuracy

    return accuracy(student, tokenizer, task, test, max_new_tokens=cfg.sampling.max_new_tokens)


def _context_length(model) -> int:
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    return getattr(cfg, "max_position_embeddings", None) or 1 << 30


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
