"""Configs: small frozen dataclasses, one docstring per field, parsed by tyro and written to every run directory.

A method's config is composed of the `*Args` pieces below, so `--sampling.temperature 0.7` means the same thing to
every command that samples.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from opd.config_checks import (check_cross_tokenizer, check_ema, check_speculative, check_teachers, check_tools,
                               teacher_specs)

LOSSES = ("sampled", "sft", "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
"""What --loss accepts: the two losses that need no teacher distribution, then `opd.losses.DIVERGENCES` (named here
rather than imported, so that parsing flags imports no torch; it must list `opd.losses.DIVERGENCES`, a test checks)."""

LossName = Annotated[str, tyro.conf.arg(metavar="{" + ",".join(LOSSES) + "}")]
"""A loss name: a plain `str` checked in `DistillConfig.__post_init__` (one line naming the choices, not tyro's
multi-line parse error), shown in --help with its choices."""

TRACKERS = ("tensorboard", "trackio", "wandb")
"""What --report-to accepts: accelerate's trackers that opd sets up (`opd.lm.loop.process.trackers`)."""

TrackerNames = Annotated[tuple[str, ...], tyro.conf.arg(metavar="{" + ",".join(TRACKERS) + "} [...]")]
"""Tracker names: plain `str`s checked in `DistillConfig.__post_init__`, as `LossName` is."""


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
    """The student's optimiser: AdamW, linear warm-up, then a constant, linear or cosine schedule."""

    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 10
    """Steps of linear warm-up to `lr` (the first update uses lr / warmup_steps)."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """After warm-up: stay at `lr`, or decay linearly / along a half cosine to 0 at the last step."""
    grad_accum: int = 1
    """Split each update's batch into this many micro-batches, scored and back-propagated one after another (less
    memory, the same update: each micro-batch's loss is weighted by its share of the batch's completion tokens).
    Must divide the number of rows (batch_size × samples_per_prompt)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this value (0 disables)."""


@dataclass(frozen=True)
class LoraArgs:
    """A LoRA student (through `peft`): only low-rank adapters on the chosen linear layers are trained."""

    r: int = 0
    """Adapter rank; 0 trains every weight of the student (no LoRA)."""
    alpha: float = 16.0
    """LoRA's scaling numerator: the adapter's update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    target_modules: tuple[str, ...] = ("all-linear",)
    """Names (or name suffixes) of the linear layers that get adapters, e.g. q_proj v_proj; all-linear: every linear
    layer but the output head."""


@dataclass(frozen=True)
class DistillConfig:
    """One run of the LM loop: who acts, what the teacher gives, which divergence, how the student updates."""

    student: str
    """The student: a Hugging Face hub id or local directory (e.g. Qwen/Qwen3-0.6B, or runs/x/checkpoint)."""
    teacher: str | None = None
    """The teacher: hub id, local directory, http(s)://host:port/v1 for an OpenAI-compatible server (vLLM or
    `opd serve`), `self`: the student's own starting weights, frozen (self-distillation; a full student is copied
    in memory before its first update, a LoRA student's base is used with the adapters off; --resume loads the start
    again from --student), or `ema`: an exponential moving average of the student's weights (--ema-decay; SDFT's
    EMA teacher), saved in every checkpoint. Not needed for source=data with loss=sft. See also --teachers."""
    teachers: str | None = None
    """Several teachers instead of --teacher: NAME=MODEL pairs, e.g. math=runs/math-teacher,code=http://host:8000/v1
    (each MODEL as --teacher takes it). --teacher-column names the data column whose value routes each prompt to
    one of them; metrics are logged per teacher (loss/teacher=NAME). See `opd.lm.teachers.routed`."""
    teacher_column: str | None = None
    """With --teachers: the --data column that names each row's teacher (every value must be one of the names)."""
    ema_decay: float = 0.99
    """--teacher ema: after every update each teacher weight moves to decay × itself + (1 - decay) × the student's
    (the teacher starts as the student's starting weights; 1.0 keeps it there, as --teacher self does)."""
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of a local teacher's weights and forward pass. bfloat16 halves its memory and, on CPUs with bf16
    instructions and on GPUs, speeds up scoring, at the price of a slightly different teacher (SmolLM2-135M: its
    log-probs moved by 0.05 nats on average, 0.64 at most; `benchmarks/results/perf_levers.md`). The losses run in
    float32 either way."""
    allow_tokenizer_mismatch: bool = False
    """Train although a local teacher's tokenizer, sharing the student's vocabulary, has another end-of-sequence token
    or chat template (refused by default: a base student under an instruct teacher learns to end with a token its
    sampler does not stop at)."""
    cross_tokenizer: bool = False
    """Distil from a local --teacher whose tokenizer differs from the student's: each student completion is decoded,
    re-tokenized by the teacher after the prompt row rendered with the teacher's own chat template, and the two
    tokenizations are compared span by span (aligned by text; `opd.lm.xtok.teacher` says which parts are exact). For the
    divergence losses (not sampled or sft) with source student, data or mixture."""
    task: str = "arithmetic"
    """A built-in task (see `opd.tasks`): its prompts, reference completions and answer checker. --data replaces its
    training prompts, --eval-data its held-out ones."""
    data: str | None = None
    """Your training prompts: a .jsonl/.json/.parquet/.csv file, a `Dataset.save_to_disk` directory, or a hub dataset
    name. Rows hold `prompt` (text) or `messages` (a chat, rendered with the student's chat template), optionally
    `completion` (for source=data and GKD) and `answer` (for the checker). See `opd.lm.data.prompts`."""
    data_split: str = "train"
    """Split of --data to read (a hub dataset or a saved DatasetDict; a single file has one split)."""
    data_fields: str = ""
    """Map your column names to opd's, e.g. prompt=question,answer=final (applies to --data and --eval-data)."""
    eval_data: str | None = None
    """Held-out prompts for the accuracy evaluation, in the same formats as --data; scored by --checker."""
    eval_split: str = "test"
    """Split of --eval-data to read."""
    checker: str | None = None
    """How a held-out completion is scored: exact | contains | numeric | regex:PATTERN | ifeval | task:NAME |
    module:function (your `(row, completion) -> float`). Default: the task's own checker, or none (no accuracy) with
    --data."""
    source: Literal["student", "teacher", "data", "mixture", "speculative"] = "student"
    """Who acts. student: on-policy distillation; teacher: the teacher generates and the student learns on those
    samples (sequence-level KD / SFT on teacher samples); data: the task's reference completions; mixture: GKD,
    each batch is on-policy with probability `lmbda`, else reference completions; speculative: SKD, the student
    proposes each token and a local teacher keeps it if it is in the teacher's top --skd-top-k, else samples its own
    (`opd.lm.rollouts.speculative`)."""
    lmbda: float = 0.5
    """GKD's λ: fraction of batches sampled by the student when source=mixture."""
    skd_top_k: int = 25
    """source=speculative: a student proposal is kept when it is among the teacher's this many most likely tokens
    at its position (25 in the SKD paper); at or above the vocabulary size every proposal is kept (on-policy)."""
    loss: LossName = "reverse_kl"
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
    """Prompts per update."""
    samples_per_prompt: int = 1
    """Completions per prompt (tinker's group size): an update sees batch_size × samples_per_prompt sequences."""
    sampling: SamplingArgs = field(default_factory=SamplingArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train_examples: int = 5000
    """Size of the task's training split that prompts are drawn from."""
    eval_examples: int = 200
    """Held-out problems for accuracy evaluation (the first this many rows of --eval-data)."""
    eval_every: int = 50
    """Evaluate held-out accuracy every this many steps and after the last one (0: never); a callback that stops the
    run early gets that last evaluation too."""
    eval_on_start: bool = False
    """Also evaluate before the first update, logged as `accuracy_at_start` with step 1 (a fresh run only)."""
    save_every: int = 100
    """Write a checkpoint every this many steps (and at the end)."""
    chunk_size: int | None = None
    """Positions per chunk when evaluating LM heads and full-vocabulary losses. None: about 3M logits per chunk and
    at least 64 positions (`opd.chunked.auto_chunk_size`: 64 from a 49k vocabulary up, all of them at a small one)."""
    top_k: int = 20
    """Top-k log-probs requested from a remote teacher."""
    teacher_payload: Literal["topk", "hidden"] = "topk"
    """What a remote teacher sends per token. topk: its --top-k log-probs (any vLLM-compatible server; the
    divergences see the rest of the vocabulary as one tail bucket). hidden: its final hidden states, plus its LM head
    once (`opd serve` only, `opd.lm.remote.hidden`): the exact full-vocabulary divergence, as with a local teacher,
    for D numbers per token instead of a vocabulary's worth."""
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
    half of the torch threads (opd.lm.rollouts.process; CPU only). The cost: every student batch after a run's first
    step comes from weights one update staler (1 to sync_every updates old, not 0 to sync_every - 1; `sampler_kl`
    shows it), and a resumed run continues correctly (same prompts and seeds) but not bit-for-bit: its first step
    samples from the current weights, not the previous ones."""
    ratio_clip: float = 2.0
    """Truncation c of the importance ratio π_student/π_sampler at each sampled token, min(ratio, c), for loss=sampled
    (truncated importance sampling, TIS, Yao et al. 2025; a small cap such as 2 keeps tokens the sampler under-weights
    from blowing up the gradient). Matters only with --sampler or --overlap; in-process samples have ratio 1. The
    full-vocabulary losses are not reweighted (why: opd.lm.rollouts.server)."""
    remote_timeout: float = 60.0
    """Seconds to wait for one answer from a teacher or sampler server before retrying."""
    remote_api_key: str | None = None
    """API key sent to teacher and sampler servers (`Authorization: Bearer KEY`; `opd serve --api-key`, vLLM's
    --api-key). Default: the environment variable OPD_API_KEY, which `ps` does not show. Never written to
    config.json."""
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
    threads: int | None = None
    """torch CPU threads of this process. None: torch's default (one per core), lowered to the cores that no other job
    is running on when the run starts, since threads waiting on each other for a busy core make every step several
    times slower (`benchmarks/results/shared_cpu.md`)."""
    report_to: TrackerNames = ()
    """Also log each step's metrics, and the config once, to these trackers (several at once: `--report-to wandb
    tensorboard`) through accelerate's: TensorBoard in out_dir/tensorboard, wandb (project $WANDB_PROJECT or opd, run
    named after out_dir, files in $WANDB_DIR or out_dir, --resume goes on in the same run; WANDB_MODE=offline works
    without an account), trackio (project named after out_dir). None by default; metrics.jsonl is always written."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast the student's forward and backward (accelerate's mixed precision): fp32 weights and optimizer state,
    bf16/fp16 matmuls. The usual choice on GPUs; on CPUs it pays only where the cores have bf16 instructions."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of the student's weights, gradients and optimizer state. bfloat16 halves their memory but AdamW then
    updates bf16 weights directly (small updates round away); prefer --mixed-precision bf16 with float32 weights unless
    memory forces it. Log-softmax and the divergences run in float32 either way. --teacher-dtype sets the teacher's."""
    gradient_checkpointing: bool = False
    """Recompute the student's decoder layers in the backward pass instead of keeping their activations: activation
    memory of one layer instead of all of them, for about one more forward pass of compute. For long completions
    (`benchmarks/results/scale.md`)."""
    tools: str | None = None
    """Multi-turn rollouts with a tool: calc (the built-in calculator: `calc(7+6+0)` -> 13) or module:function, your
    `(turn text) -> answer text, or None when the turn makes no call`. The model's turns are its targets; the tool's
    answers, written as the chat template's tool messages, are context only (`opd.lm.rollouts.tools`)."""
    max_turns: int = 8
    """With --tools: the most turns the model writes in one conversation."""
    max_tokens_per_microbatch: int | None = None
    """Split each update into micro-batches of consecutive sequences holding at most this many (padded) tokens each,
    padding columns dropped per micro-batch, instead of --optim.grad-accum equal row counts: memory bounded by tokens,
    whatever the completion lengths. Must hold the longest prompt plus --sampling.max-new-tokens."""

    def __post_init__(self) -> None:
        # Checked when the flags are parsed, before anything loads: one line naming the flag.
        o, s = self.optim, self.sampling
        for flag, ok, want in (
            ("--steps", self.steps >= 1, ">= 1"), ("--batch-size", self.batch_size >= 1, ">= 1"),
            ("--samples-per-prompt", self.samples_per_prompt >= 1, ">= 1"),
            ("--optim.grad-accum", o.grad_accum >= 1, ">= 1"), ("--optim.lr", o.lr > 0, "> 0"),
            ("--optim.warmup-steps", o.warmup_steps >= 0, ">= 0"),
            ("--optim.weight-decay", o.weight_decay >= 0, ">= 0"),
            ("--optim.grad-clip", o.grad_clip >= 0, ">= 0 (0 disables clipping)"),
            ("--sampling.max-new-tokens", s.max_new_tokens >= 1, ">= 1"),
            ("--sampling.temperature", s.temperature >= 0, ">= 0 (0 is greedy)"),
            ("--sampling.top-p", 0 < s.top_p <= 1, "in (0, 1]"), ("--lmbda", 0 <= self.lmbda <= 1, "in [0, 1]"),
            ("--ema-decay", 0 <= self.ema_decay <= 1, "in [0, 1]"),
            ("--train-examples", self.train_examples >= 1, ">= 1"),
            ("--eval-examples", self.eval_examples >= 1, ">= 1"),
            ("--max-turns", self.max_turns >= 1, ">= 1"),
            ("--eval-every", self.eval_every >= 0, ">= 0 (0: never)"), ("--save-every", self.save_every >= 1, ">= 1"),
            ("--chunk-size", self.chunk_size is None or self.chunk_size >= 1, ">= 1"),
            ("--top-k", self.top_k >= 1, ">= 1"), ("--skd-top-k", self.skd_top_k >= 1, ">= 1"),
            ("--sync-every", self.sync_every >= 1, ">= 1"), ("--ratio-clip", self.ratio_clip > 0, "> 0"),
            ("--remote-timeout", self.remote_timeout > 0, "> 0"),
            ("--remote-max-retries", self.remote_max_retries >= 0, ">= 0"),
            ("--lora.r", self.lora.r >= 0, ">= 0 (0: no LoRA)"), ("--lora.alpha", self.lora.alpha > 0, "> 0"),
            ("--lora.dropout", 0 <= self.lora.dropout < 1, "in [0, 1)"),
            ("--threads", self.threads is None or self.threads >= 1, ">= 1"),
            ("--max-tokens-per-microbatch", self.max_tokens_per_microbatch is None
             or self.max_tokens_per_microbatch > s.max_new_tokens,
             f"> --sampling.max-new-tokens ({s.max_new_tokens}): one sequence, prompt included, must fit"),
        ):
            if not ok:
                raise ValueError(f"{flag} must be {want}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        self._check_trackers()
        rows = self.batch_size * self.samples_per_prompt
        if self.max_tokens_per_microbatch is not None and o.grad_accum != 1:
            raise ValueError("pass either --max-tokens-per-microbatch (micro-batches by tokens) or --optim.grad-accum "
                             "(by rows), not both")
        if rows % o.grad_accum:
            raise ValueError(f"--optim.grad-accum {o.grad_accum} must divide the {rows} sequences of an update "
                             f"(batch_size × samples_per_prompt)")
        check_teachers(self)
        for flag, model in (("--student", self.student), ("--teacher", self.teacher),
                            *((f"--teacher {name}", m) for name, m in teacher_specs(self.teachers).items())):
            if model and Path(model).expanduser().resolve() == Path(self.out_dir).expanduser().resolve():
                raise ValueError(f"--out-dir {self.out_dir} is the {flag[2:]}'s model directory; its config.json would "
                                 f"be overwritten: pick another --out-dir")
        if self.sampler is not None and not self.sampler.startswith(("http://", "https://")):
            raise ValueError(f"--sampler {self.sampler!r} is not a URL; pass http(s)://host:port/v1 of a sampler server")
        check_speculative(self)
        check_cross_tokenizer(self)
        check_ema(self)
        check_tools(self)
        for flag, used in (("--sampler", self.sampler), ("--overlap", self.overlap)):
            if used and self.source not in ("student", "mixture"):
                raise ValueError(f"{flag} samples the student's completions; source={self.source} has none: drop {flag}")

    def _check_trackers(self) -> None:
        # One name was the only form before several trackers, and "none" their absence: configs written then (a run's
        # config.json, Python code) still mean what they meant.
        names = (self.report_to,) if isinstance(self.report_to, str) else tuple(self.report_to)
        object.__setattr__(self, "report_to", () if names == ("none",) else names)
        for name in self.report_to:
            if name not in TRACKERS:
                raise ValueError(f"unknown tracker {name!r} in --report-to; choose from {', '.join(TRACKERS)}")
            if self.report_to.count(name) > 1:
                raise ValueError(f"--report-to names {name} twice; name each tracker once")

def remote_teacher(cfg: DistillConfig) -> bool:
    """Whether a teacher of `cfg` (--teacher, or one of --teachers) is a server URL."""
    models = [cfg.teacher or "", *teacher_specs(cfg.teachers).values()]
    return any(m.startswith(("http://", "https://")) for m in models)


def to_dict(cfg) -> dict:
    """A config as plain JSON-able data; a secret (`remote_api_key`) only as whether it was set."""
    d = dataclasses.asdict(cfg)
    if d.get("remote_api_key") is not None:
        d["remote_api_key"] = "<set>"
    return d


def save_config(cfg, out_dir: str | Path) -> None:
    """Write the resolved config to out_dir/config.json (the record of what ran)."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
