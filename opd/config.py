"""Configs: small frozen dataclasses, one docstring per field, parsed by tyro and written to every run directory.

A method's config is composed of the `*Args` pieces below, so `--sampling.temperature 0.7` means the same thing to
every command that samples.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class SamplingArgs:
    """How completions are sampled (by the student, the teacher, or a server)."""

    max_new_tokens: int = 64
    """Longest completion; a completion cut here has no end-of-sequence token."""
    temperature: float = 1.0
    """Sampling temperature. 1.0 samples the policy being trained, which is what the on-policy gradients assume."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 keeps the whole distribution."""
    compile: bool = False
    """Decode through a `torch.compile`d step over a static KV cache (local sampling only: in-process and the
    `--overlap` sampler process). Each new (batch size, cache length) compiles once, 10-20 s on a CPU; faster after
    that where per-token overhead dominates (small models). Same distribution, different draws for a seed."""


@dataclass(frozen=True)
class OptimArgs:
    """The student's optimiser (AdamW with linear warm-up, then constant)."""

    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 10
    """Steps of linear warm-up from 0 to `lr`."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this value (0 disables)."""


@dataclass(frozen=True)
class DistillConfig:
    """One run of the LM loop: who acts, what the teacher gives, which divergence, how the student updates."""

    student: str
    """The student: a Hugging Face hub id or local directory (e.g. Qwen/Qwen3-0.6B, or runs/x/checkpoint)."""
    teacher: str | None = None
    """The teacher: hub id, local directory, or http(s)://host:port/v1 for an OpenAI-compatible server
    (vLLM or `opd serve`). Not needed for source=data with loss=sft."""
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of a local teacher's weights and forward pass. bfloat16 halves its memory and, on CPUs with bf16
    instructions and on GPUs, speeds up scoring, at the price of a slightly different teacher (SmolLM2-135M: its
    log-probs moved by 0.05 nats on average, 0.64 at most; `benchmarks/results/perf_levers.md`). The losses run in
    float32 either way."""
    task: str = "arithmetic"
    """Where prompts (and reference completions) come from: a registered task name (see `opd.tasks`)."""
    source: Literal["student", "teacher", "data", "mixture"] = "student"
    """Who acts. student: on-policy distillation; teacher: the teacher generates and the student learns on those
    samples (sequence-level KD / SFT on teacher samples); data: the task's reference completions; mixture: GKD,
    each batch is on-policy with probability `lmbda`, else reference completions."""
    lmbda: float = 0.5
    """GKD's λ: fraction of batches sampled by the student when source=mixture."""
    loss: str = "reverse_kl"
    """reverse_kl | forward_kl | jsd | skew_forward_kl | skew_reverse_kl | tvd (full vocabulary, or the teacher's
    top-k plus a tail bucket for a remote teacher), sampled (per-token reverse-KL estimate used as a negative
    advantage, policy-gradient form) or sft (cross-entropy to the batch's tokens, no teacher signal)."""
    beta: float = 0.5
    """JSD's β (weight of the teacher in the mixture m); only for loss=jsd."""
    alpha: float = 0.1
    """Skew KL's α; only for the skew losses."""
    discount: float = 0.0
    """loss=sampled only: the advantage of token t adds discount^k times the per-token reward k tokens later."""
    steps: int = 200
    """Student updates."""
    batch_size: int = 32
    """Prompts per update (one completion each)."""
    sampling: SamplingArgs = field(default_factory=SamplingArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train_examples: int = 5000
    """Size of the task's training split that prompts are drawn from."""
    eval_examples: int = 200
    """Held-out problems for accuracy evaluation."""
    eval_every: int = 50
    """Evaluate held-out accuracy every this many steps (0: only at the end)."""
    save_every: int = 100
    """Write a checkpoint every this many steps (and at the end)."""
    chunk_size: int | None = None
    """Positions per chunk when evaluating LM heads and full-vocabulary losses. None: about 3M logits per chunk
    (`opd.chunked.auto_chunk_size`: 64 positions at a 49k vocabulary, all of them at a small one)."""
    top_k: int = 20
    """Top-k log-probs requested from a remote teacher."""
    sampler: str | None = None
    """http(s)://host:port/v1 of a completions server that samples the student's completions (source=student, and the
    student's batches of source=mixture): `opd serve STUDENT_DIR`, or any server that also answers opd's
    `POST /opd/update_weights`, since it gets the student's weights every `sync_every` updates (as safetensors under
    out_dir/sampler_weights, which it must be able to read). None: the student samples in-process."""
    sync_every: int = 1
    """With --sampler or --overlap: push the student's weights to the sampler every this many updates (and when a run
    starts or resumes). 1 keeps the samples on-policy; larger values sample from weights up to sync_every - 1 updates old."""
    overlap: bool = False
    """Sample step k+1's student batch while step k is scored and updated, so sampling leaves the critical path. With
    --sampler, the server samples it (requested once step k's weights are pushed); without, a second process on this
    machine does, from a shared-memory copy of the student that gets the weights every `sync_every` updates, with
    half of the torch threads (opd.lm.process_rollouts; CPU only). The cost: every student batch after a run's first
    step comes from weights one update staler (1 to sync_every updates old, not 0 to sync_every - 1; `sampler_kl`
    shows it), and a resumed run continues correctly (same prompts and seeds) but not bit-for-bit: its first step
    samples from the current weights, not the previous ones."""
    ratio_clip: float = 2.0
    """Truncation c of the importance ratio π_student/π_sampler at each sampled token, min(ratio, c), for loss=sampled
    (truncated importance sampling, TIS, Yao et al. 2025; a small cap such as 2 keeps tokens the sampler under-weights
    from blowing up the gradient). Matters only with --sampler or --overlap; in-process samples have ratio 1. The
    full-vocabulary losses are not reweighted (why: opd.lm.server_rollouts)."""
    remote_timeout: float = 60.0
    """Seconds to wait for one answer from a teacher or sampler server before retrying."""
    remote_max_retries: int = 5
    """Retries (with doubling back-off from 0.5 s) before a silent teacher or sampler server stops the run with a
    checkpoint."""
    seed: int = 0
    """Seeds prompt order, sampling and the mixture's coin flips."""
    out_dir: str = "runs/distill"
    """Run directory: config.json, metrics.jsonl, checkpoint/."""
    resume: bool = False
    """Continue from out_dir/checkpoint if it exists."""
    progress: bool = True
    """Show a progress bar."""


def to_dict(cfg) -> dict:
    """A config as plain JSON-able data."""
    return dataclasses.asdict(cfg)


def save_config(cfg, out_dir: str | Path) -> None:
    """Write the resolved config to out_dir/config.json (the record of what ran)."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
