"""One point of `opd bench scale` (or `opd bench gpu`), in a process of its own so that its peak memory is its own:

    python -m benchmarks.scale.worker SPEC.json OUT.json

The train step runs on a fixed batch: a short real prompt followed by `length` random token ids of the vocabulary,
every completion position graded, so a 4k-token step can be timed without sampling 4k tokens first (sampling is timed
on its own, `opd_sampling`). Systems:
- `opd`: exactly what `opd.lm.train.distill` does per step, `accumulate` then `update`, with the local teacher (its
  hidden states, the full-vocabulary divergence of `opd.fused`);
- `opd_topk` / `opd_hidden`: the same step with the teacher behind an `opd serve` started here (the teacher's top-k
  log-probs and a tail bucket, `RemoteTeacher`; its hidden states and head, `HiddenStateTeacher`); memory counts both
  processes;
- `opd_gc` / `opd_budget`: `opd` with gradient checkpointing / token-budget micro-batches (`LEVERS`);
- `trl_distillation`: TRL's `DistillationTrainer.train()` with its generation replaced by the same fixed completion,
  so its loss, backward and optimizer step run as in training;
- `opd_sampling`: `opd.lm.hf.decode.sample_completions` with no end-of-sequence token, so every row runs `length`
  tokens (a KV cache of the full length).

Every system trains with the reverse KL at temperature 1 (TRL: β = 1), AdamW at a constant learning rate, gradient
norm clipped to 1, no weight decay, in the weights' dtype. OUT gets per-step wall times, the teacher's share of each,
each step's memory rise, the process's peak memory and the FLOPs of one step (`opd.flops`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from benchmarks.common.measure import current_rss_mb, max_rss_mb, reset_peak_rss, worker_main

STEP_SYSTEMS = ("opd", "opd_topk", "opd_hidden", "opd_gc", "opd_budget", "trl_distillation")
"""The systems that time a train step."""
SYSTEMS = (*STEP_SYSTEMS, "opd_sampling")
LEVERS = {"opd_gc": "gradient_checkpointing", "opd_budget": "max_tokens_per_microbatch"}
"""Lever arm -> the `DistillConfig` field it sets (`load_student` takes `gradient_checkpointing=` too)."""
PAYLOADS = {"opd_topk": "topk", "opd_hidden": "hidden"}
"""Systems whose teacher is an `opd serve` -> `DistillConfig.teacher_payload`."""


def importable(name: str) -> bool:
    """Whether `import name` can work here (False also where something blocked it in sys.modules)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def stand_in_for_datasets() -> None:
    """Let `opd.lm.train` import where the `datasets` package is not installed (a bare GPU machine, `opd bench gpu`):
    its imports reach `opd.lm.data.prompts`, which imports datasets at the top, though a train step never uses it. A
    module that names the missing package on first use stands in; where datasets is installed nothing changes."""
    if sys.modules.get("datasets") is not None or importable("datasets"):
        return

    class Missing(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            raise ImportError(f"datasets.{name}: the datasets package is not installed (pip install datasets)")

    sys.modules["datasets"] = Missing("datasets")


def lever_missing(system: str) -> str | None:
    """Why lever arm `system` cannot run with this opd (None: it can, or it is no lever arm)."""
    if system not in LEVERS:
        return None
    from opd.config import DistillConfig
    from opd.lm.hf.lora import load_student

    field = LEVERS[system]
    if field not in {f.name for f in dataclasses.fields(DistillConfig)}:
        return f"lever not available: DistillConfig has no {field}"
    if system == "opd_gc" and "gradient_checkpointing" not in inspect.signature(load_student).parameters:
        return "lever not available: load_student takes no gradient_checkpointing"
    return None


class Memory:
    """Peak memory of this process, overall and within each step (the step's rise over what it started with): RSS on
    a CPU (VmHWM, reset at each step's start), allocated CUDA memory on a GPU."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.peak_rss = self.gpu_peak = self.start = 0.0

    def step_start(self) -> None:
        self.peak_rss = max(self.peak_rss, max_rss_mb())
        if self.cuda:
            torch.cuda.synchronize()
            self.gpu_peak = max(self.gpu_peak, torch.cuda.max_memory_allocated() / 2**20)  # loading included
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2**20
        else:
            reset_peak_rss()
            self.start = current_rss_mb()

    def step_end(self) -> float:
        """How far the step rose above its start, MB."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            self.gpu_peak = max(self.gpu_peak, peak)
            return peak - self.start
        return max_rss_mb() - self.start

    def summary(self) -> dict:
        out = {"peak_rss_mb": max(self.peak_rss, max_rss_mb())}
        if self.cuda:
            out["peak_gpu_mb"] = max(self.gpu_peak, torch.cuda.max_memory_allocated() / 2**20)
        return out


def synchroniser(device: str) -> Callable[[], None]:
    """What waits for queued device work before a clock is read (nothing on a CPU)."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def timed(fn: Callable, seconds: list[float], sync: Callable[[], None], when: Callable[..., bool] = lambda *a: True):
    """`fn`, appending the wall time of each call for which `when(*args)` holds to `seconds`."""
    def wrapper(*args, **kwargs):
        if not when(*args):
            return fn(*args, **kwargs)
        sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        seconds.append(time.perf_counter() - t0)
        return out
    return wrapper


def fixed_rows(spec: dict, tokenizer) -> tuple[list[int], list[list[int]]]:
    """The prompt's token ids (plain text, as TRL tokenizes a non-chat prompt) and `batch_size` completions of
    `length` random ids drawn from the model's vocabulary (special tokens excluded: no row ends early)."""
    from transformers import AutoConfig

    prompt_ids = tokenizer(text=spec["prompt"])["input_ids"]
    config = AutoConfig.from_pretrained(spec["student"])
    vocab = getattr(config, "get_text_config", lambda: config)().vocab_size
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[i for i in tokenizer.all_special_ids if i < vocab]] = False
    allowed_ids = allowed.nonzero()[:, 0]
    rng = torch.Generator().manual_seed(spec["seed"])
    draws_BC = torch.randint(len(allowed_ids), (spec["batch_size"], spec["length"]), generator=rng)
    return prompt_ids, allowed_ids[draws_BC].tolist()


def step_flops(student, teacher, prompt_len: int, completions: list[list[int]]) -> float:
    """FLOPs of one train step (teacher scoring + student forward and backward, `opd.flops`) over these rows."""
    from opd import flops
    from opd.lm.batch import layout

    b = layout([[0] * prompt_len] * len(completions), completions, 0)
    return flops.step_flops(flops.model_cost(student), flops.model_cost(teacher), b.attention_mask_BL, b.mask_BT,
                            "data", scored=True)["flops"]


def meta_model(model_dir: str):
    """The model of `model_dir` on the meta device (its shapes, no weights): the FLOPs of a teacher in a server."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


@contextlib.contextmanager
def teacher_for(spec: dict, scratch: Path) -> Iterator[tuple[str, int | None]]:
    """(the --teacher to train with, the pid of its `opd serve` or None): the local directory, or an `opd serve` of
    it started here for the systems in `PAYLOADS`."""
    if spec["system"] not in PAYLOADS:
        yield spec["teacher"], None
        return
    from benchmarks.perf.worker import served

    with served(spec["teacher"], spec["threads"], scratch / "serve.log") as (url, pid):
        yield url, pid


def run_opd(spec: dict, scratch: Path, memory: Memory) -> dict:
    """`accumulate` + `update` of `opd.lm.train`, set up as `distill` sets them up, on the fixed batch."""
    from functools import partial

    stand_in_for_datasets()
    from opd.config import DistillConfig, OptimArgs, SamplingArgs
    from opd.lm.batch import layout
    from opd.lm.hf.lora import load_student
    from opd.lm.hf.model import load_tokenizer, unwrap
    from opd.lm.loop.build import make_teacher
    from opd.lm.loop.optim import adamw, lr_factor, update
    from opd.lm.loop.process import start_process
    from opd.lm.train import accumulate

    system, total = spec["system"], spec["warmup"] + spec["steps"]
    if why := lever_missing(system):
        raise RuntimeError(why)
    tokenizer = load_tokenizer(spec["student"])
    prompt_ids, completions = fixed_rows(spec, tokenizer)
    levers = {}
    if system == "opd_gc":
        levers = {"gradient_checkpointing": True}
    elif system == "opd_budget":  # one row per micro-batch
        levers = {"max_tokens_per_microbatch": len(prompt_ids) + spec["length"]}
    if "dtype" in {f.name for f in dataclasses.fields(DistillConfig)}:
        levers["dtype"] = spec["dtype"]
    sync = synchroniser(spec["device"])
    with teacher_for(spec, scratch) as (teacher_spec, server_pid):
        cfg = DistillConfig(
            student=spec["student"], teacher=teacher_spec, loss="reverse_kl", steps=total,
            batch_size=spec["batch_size"], threads=spec["threads"], seed=spec["seed"],
            sampling=SamplingArgs(max_new_tokens=spec["length"]), teacher_dtype=spec["dtype"],
            optim=OptimArgs(lr=spec["lr"], warmup_steps=0, weight_decay=0.0, grad_clip=1.0),
            teacher_payload=PAYLOADS.get(system, "topk"), top_k=spec["top_k"], remote_timeout=600.0,
            out_dir=str(scratch / "run"), progress=False, **levers)
        proc = start_process(cfg)
        student = load_student(cfg.student, cfg.lora, None, proc.device, dtype=spec["dtype"],
                               **({"gradient_checkpointing": True} if system == "opd_gc" else {}))
        teacher = make_teacher(cfg, student, tokenizer, proc.device)
        batch = layout([prompt_ids] * len(completions), completions, tokenizer.pad_token_id).to(proc.device)
        flops = step_flops(unwrap(student), getattr(teacher, "model", None) or meta_model(spec["teacher"]),
                           len(prompt_ids), completions)
        opt = adamw(student, cfg.optim)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, optim=cfg.optim, steps=cfg.steps))
        # as distill: `Process.prepare` where this opd has it (DDP or FSDP2), accelerate's own before that
        student, opt = getattr(proc, "prepare", proc.accelerator.prepare)(student, opt)
        student.train()
        calls, teacher_s, step_s, rise, losses = [], [], [], [], []
        teacher.score = timed(teacher.score, calls, sync)  # once per micro-batch
        loaded_rss = current_rss_mb()
        for step in range(total):
            memory.step_start()
            t0, first_call = time.perf_counter(), len(calls)
            m = accumulate(student, teacher, batch, cfg, proc.accelerator, step)
            m.update(update(student, opt, sched, cfg.optim, step, cfg.out_dir, clip=proc.accelerator.clip_grad_norm_))
            sync()
            step_s.append(time.perf_counter() - t0)
            teacher_s.append(sum(calls[first_call:]))
            rise.append(memory.step_end())
            losses.append(m["loss"])
        server_peak = max_rss_mb(server_pid) if server_pid else None
        if hasattr(teacher, "close"):
            teacher.close()
    grad_mb = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad) / 2**20
    return {"step_s": step_s, "teacher_s": teacher_s, "step_rise_mb": rise, "loaded_rss_mb": loaded_rss,
            "grad_mb": grad_mb, "server_peak_rss_mb": server_peak, "flops": flops, "prompt_tokens": len(prompt_ids),
            "completion_tokens": sum(map(len, completions)), "losses": losses,
            "micro_batches": m.get("micro_batches")}


def run_trl(spec: dict, scratch: Path, memory: Memory) -> dict:
    """TRL's `DistillationTrainer.train()`, its generation replaced by the fixed completions (`_generate_single_turn`
    returns them for whatever prompts it is given), so that the rest of its step (padding, both models' hidden states,
    its chunked divergence, backward, clip, AdamW step) runs as in training."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from benchmarks.common.trl_args import StepTimer, trl_beta, trl_training_args
    from opd.lm.hf.model import load_model, load_tokenizer

    total, device, sync = spec["warmup"] + spec["steps"], spec["device"], synchroniser(spec["device"])
    torch.manual_seed(spec["seed"])
    tokenizer = load_tokenizer(spec["student"])
    student = load_model(spec["student"], dtype=spec["dtype"], device=device)
    teacher = load_model(spec["teacher"], dtype=spec["dtype"], device=device)
    prompt_ids, completions = fixed_rows(spec, tokenizer)
    flops = step_flops(student, teacher, len(prompt_ids), completions)
    args = DistillationConfig(
        **trl_training_args(scratch / "trl", spec["batch_size"], total, spec["lr"], spec["seed"],
                            use_cpu=torch.device(device).type == "cpu"),
        beta=trl_beta("reverse_kl", 0.5), temperature=1.0, top_p=1.0, top_k=0, max_completion_length=spec["length"],
        shuffle_dataset=False)
    rows = Dataset.from_dict({"prompt": [spec["prompt"]] * (spec["batch_size"] * total)})
    timer, calls, teacher_s, rise = StepTimer(sync), [], [], []

    class StepMarks(TrainerCallback):  # each step's memory rise and teacher time; called outside the timer's span
        def on_step_begin(self, *a, **k):
            memory.step_start()
            self.first_call = len(calls)

        def on_step_end(self, *a, **k):
            rise.append(memory.step_end())
            teacher_s.append(sum(calls[self.first_call:]))

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                                  train_dataset=rows, callbacks=[StepMarks(), timer])
    seen_prompts = []

    def fixed_completions(prompt_ids_in, *args, **kwargs):
        seen_prompts.extend(len(p) for p in prompt_ids_in)
        return [list(c) for c in completions]

    losses = []

    def compute_loss(*args, **kwargs):  # the step's mean per-token loss, as opd's `accumulate` reports it
        loss = compute(*args, **kwargs)
        losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
        return loss

    compute, trainer.compute_loss = trainer.compute_loss, compute_loss
    trainer._generate_single_turn = fixed_completions
    # the teacher's trunk is the call made without gradients (TRL runs it under torch.no_grad())
    trainer._get_last_hidden_state = timed(trainer._get_last_hidden_state, calls, sync,
                                           when=lambda *a: not torch.is_grad_enabled())
    loaded_rss = current_rss_mb()
    trainer.train()
    if set(seen_prompts) != {len(prompt_ids)}:
        raise RuntimeError(f"TRL tokenized the prompt to {sorted(set(seen_prompts))} tokens, opd to {len(prompt_ids)}")
    grad_mb = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad) / 2**20
    return {"step_s": timer.step_s, "teacher_s": teacher_s, "step_rise_mb": rise, "loaded_rss_mb": loaded_rss,
            "grad_mb": grad_mb, "flops": flops, "prompt_tokens": len(prompt_ids),
            "completion_tokens": sum(map(len, completions)), "losses": losses}


def run_sampling(spec: dict, scratch: Path, memory: Memory) -> dict:
    """`sample_completions` from the student, `length` tokens per row (no end-of-sequence token), timed after a short
    warm-up sample; the FLOPs are one forward pass over prompt + completion (`opd.flops`)."""
    from opd import flops
    from opd.lm.batch import layout
    from opd.lm.hf.decode import sample_completions
    from opd.lm.hf.model import load_model, load_tokenizer

    sync = synchroniser(spec["device"])
    tokenizer = load_tokenizer(spec["student"])
    student = load_model(spec["student"], dtype=spec["dtype"], device=spec["device"])
    prompt_ids, _completions = fixed_rows(spec, tokenizer)
    prompts = [prompt_ids] * spec["batch_size"]
    torch.manual_seed(spec["seed"])
    sample_completions(student, prompts, tokenizer.pad_token_id, None, min(8, spec["length"]))
    seconds, rise = [], []
    for _ in range(spec["steps"]):
        memory.step_start()
        sync()
        t0 = time.perf_counter()
        out = sample_completions(student, prompts, tokenizer.pad_token_id, None, spec["length"])
        sync()
        seconds.append(time.perf_counter() - t0)
        rise.append(memory.step_end())
    b = layout(prompts, out, tokenizer.pad_token_id)
    sample_flops = flops.step_flops(flops.model_cost(student), None, b.attention_mask_BL, b.mask_BT, "student",
                                    scored=False)["flops_sample"]
    return {"sampling_s": seconds, "step_rise_mb": rise, "flops": sample_flops, "prompt_tokens": len(prompt_ids),
            "completion_tokens": sum(map(len, out))}


def run(spec: dict, scratch: Path) -> dict:
    """The point `spec` describes; returns its raw numbers."""
    if spec["system"] not in SYSTEMS:
        raise ValueError(f"unknown system {spec['system']!r}; choose one of {SYSTEMS}")
    torch.set_num_threads(spec["threads"])
    scratch.mkdir(parents=True, exist_ok=True)
    memory = Memory(spec["device"])
    runner = {"trl_distillation": run_trl, "opd_sampling": run_sampling}.get(spec["system"], run_opd)
    raw = runner(spec, scratch, memory)
    raw.update(memory.summary())
    if raw.get("server_peak_rss_mb"):  # the teacher's server is part of what the system needs
        raw["trainer_peak_rss_mb"] = raw["peak_rss_mb"]
        raw["peak_rss_mb"] += raw["server_peak_rss_mb"]
    return raw


def main(argv: list[str]) -> None:
    worker_main(run, argv, exit_at_once=True)


if __name__ == "__main__":
    main(sys.argv[1:])
