"""One benchmark entry, in a process of its own so that its peak RSS is its own:

    python -m benchmarks.perf.worker SPEC.json OUT.json

SPEC names the system (`opd`, `opd_overlap`, `opd_sampler_overlap`, `trl_distillation`, `trl_gkd`; a `_compile`
suffix on the first two samples with `--sampling.compile`), the pair's model
directories and the shared settings (divergence, batch, completion length, steps, learning rate, threads). Every
system trains the same student from the same weights on the same prompts, fully on-policy at temperature 1, AdamW at
a constant learning rate with gradient clipping 1.0, fp32. OUT gets, per step, the wall time, the completion tokens
and the FLOPs (`opd.flops`, the same formula for everyone), the peak RSS of training, and the held-out per-token
reverse KL to the teacher after training, measured by one function for all systems (`opd.lm.eval`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.common.measure import max_rss_mb, worker_main
from benchmarks.common.trl_args import StepTimer, trl_beta, trl_training_args


def _costs(student, teacher):
    from opd import flops

    return flops.model_cost(student), flops.model_cost(teacher)


def step_flops(costs, prompt_lens: list[int], completion_lens: list[int]) -> float:
    """FLOPs of one on-policy step over rows of these prompt and completion lengths (real tokens only)."""
    from opd import flops

    L = max(p + c for p, c in zip(prompt_lens, completion_lens)) + 1
    attn_BL = torch.zeros((len(prompt_lens), L), dtype=torch.long)
    mask_BT = torch.zeros((len(prompt_lens), L - 1), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        attn_BL[i, : p + c] = 1
        mask_BT[i, p - 1 : p - 1 + c] = 1
    return flops.step_flops(*costs, attn_BL, mask_BT, "student", scored=True)["flops"]


def prompt_order(spec: dict, n_train: int) -> list[int]:
    """The train-split indices opd's loop draws, step by step (its generator, seeded as in `opd.lm.train.distill`),
    so the TRL trainers see the same prompts."""
    rng = torch.Generator().manual_seed(spec["seed"])
    draws = [torch.randint(n_train, (spec["batch_size"],), generator=rng).tolist() for _ in range(spec["steps"])]
    return [i for step in draws for i in step]


def train_prompts(spec: dict):
    from opd.tasks import get_task

    return get_task("arithmetic").examples(spec["train_examples"], seed=0, split="train")


def run_opd(spec: dict, scratch: Path, **server_rollouts) -> dict:
    """`opd.lm.train.distill`, unchanged, as `opd train` runs it (its default chunk size, the fused divergence where
    it applies, no taken-token pass of the teacher); per-step numbers from its metrics.jsonl. `server_rollouts`:
    DistillConfig's `sampler`, `overlap`, `sync_every`, as `opd train --sampler URL --overlap` sets them."""
    from opd.config import DistillConfig, OptimArgs, SamplingArgs
    from opd.lm.hf.model import load_model
    from opd.lm.train import distill

    cfg = DistillConfig(
        student=spec["student"], teacher=spec["teacher"], task="arithmetic", source="student", loss=spec["loss"],
        beta=spec["beta"], steps=spec["steps"], batch_size=spec["batch_size"],
        threads=torch.get_num_threads(),  # what the entry set: never lowered by what else runs at that moment
        sampling=SamplingArgs(max_new_tokens=spec["max_new_tokens"], temperature=1.0, top_p=1.0,
                              compile=spec["system"].endswith("_compile")),
        optim=OptimArgs(lr=spec["lr"], warmup_steps=0, weight_decay=0.0, grad_clip=1.0),
        train_examples=spec["train_examples"], eval_examples=1, eval_every=0, save_every=10**9,
        seed=spec["seed"], out_dir=str(scratch / "run"), progress=False, **server_rollouts,
    )
    if Path(cfg.out_dir).exists():
        raise ValueError(f"{cfg.out_dir} exists; an entry needs a fresh run directory (metrics.jsonl is appended to)")
    distill(cfg)
    peak = max_rss_mb()
    rows = [json.loads(line) for line in (scratch / "run" / "metrics.jsonl").read_text().splitlines()]
    student = load_model(str(scratch / "run" / "checkpoint"))
    return {"peak_rss_mb": peak, "step_s": [r["step_s"] for r in rows],
            "completion_tokens": [r["completion_tokens"] for r in rows], "flops": [r["flops"] for r in rows],
            "student": student}


def run_opd_overlap(spec: dict, scratch: Path) -> dict:
    """`distill --overlap` without a server: a second process samples step k+1 from a shared-memory copy of the
    student while step k trains (`opd.lm.rollouts.process`), with half of the entry's threads. Memory is both
    processes': the trainer's peak plus the sampler's, read just before the sampler stops."""
    from opd.lm.rollouts import process as process_rollouts

    peaks = []
    close = process_rollouts.ProcessRollouts.close

    def close_measured(self):  # instrumentation only: the sampler's peak RSS before it exits
        if self._proc.is_alive():
            peaks.append(max_rss_mb(self._proc.pid))
        close(self)

    process_rollouts.ProcessRollouts.close = close_measured
    try:
        raw = run_opd(spec, scratch, overlap=True, sync_every=1)
    finally:
        process_rollouts.ProcessRollouts.close = close
    if not peaks:
        raise RuntimeError("the sampler process was gone before its memory could be read")
    return dict(raw, peak_rss_mb=raw["peak_rss_mb"] + peaks[0], trainer_peak_rss_mb=raw["peak_rss_mb"],
                sampler_peak_rss_mb=peaks[0])


@contextlib.contextmanager
def served(model_dir: str, threads: int, log: Path, weights_root: Path | None = None) -> Iterator[tuple[str, int]]:
    """`opd serve model_dir` (CPU, `threads` torch threads) on a free 127.0.0.1 port, in a process of its own
    (`benchmarks.common.processes.Server`); yields its URL and process id once /health answers, and stops it on the
    way out whatever happened (Ctrl-C as a user would, SIGKILL if it is not gone after 15 s)."""
    from benchmarks.common.processes import Server, free_port

    # absolute: the server runs in the log's folder
    server = Server(str(Path(model_dir).resolve()), free_port(), log, threads=threads,
                    weights_root=str(weights_root.resolve()) if weights_root else None)
    try:
        yield server.start().url, server.proc.pid
    finally:
        server.stop()


def run_opd_sampler_overlap(spec: dict, scratch: Path) -> dict:
    """`distill --sampler URL --overlap`: the library's overlapped server rollouts, against an `opd serve` of the
    student started here. The entry's threads are split as `--overlap` without a server splits them (half to the
    sampler, at least one each). Each step pushes the student's weights to the server (sync_every=1; the push is
    part of the step time) and requests the next step's rollouts before training on this one's. Memory is both
    processes': the trainer's peak plus the server's, read just before the server stops."""
    server_threads = max(1, spec["threads"] // 2)
    torch.set_num_threads(max(1, spec["threads"] - server_threads))
    with served(spec["student"], server_threads, scratch / "serve.log", weights_root=scratch) as (url, server_pid):
        raw = run_opd(spec, scratch, sampler=url, overlap=True, sync_every=1)
        server_peak = max_rss_mb(server_pid)
    return dict(raw, peak_rss_mb=raw["peak_rss_mb"] + server_peak, trainer_peak_rss_mb=raw["peak_rss_mb"],
                server_peak_rss_mb=server_peak)


def _trl_common(spec: dict, scratch: Path) -> dict:
    return dict(trl_training_args(scratch / "trl", spec["batch_size"], spec["steps"], spec["lr"], spec["seed"]),
                beta=trl_beta(spec["loss"], spec["beta"]))


def run_trl_distillation(spec: dict, scratch: Path) -> dict:
    """TRL's `DistillationTrainer` (on-policy; chunked divergence from hidden states)."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from opd.lm.hf.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(spec["student"])
    student, teacher = load_model(spec["student"]), load_model(spec["teacher"])
    costs = _costs(student, teacher)
    train = train_prompts(spec)
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts = [train[i].prompt for i in prompt_order(spec, len(train))]
    rows = [[{"role": "user", "content": p}] for p in prompts] if chat else prompts
    args = DistillationConfig(**_trl_common(spec, scratch), temperature=1.0, top_p=1.0, top_k=0,
                              max_completion_length=spec["max_new_tokens"], shuffle_dataset=False)
    timer = StepTimer()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                                  train_dataset=Dataset.from_dict({"prompt": rows}), callbacks=[timer])
    lengths = []
    generate = trainer._generate_single_turn

    def counted(prompt_ids, *a, **k):  # instrumentation only: record what was generated
        completion_ids = generate(prompt_ids, *a, **k)
        lengths.append(([len(p) for p in prompt_ids], [len(c) for c in completion_ids]))
        return completion_ids

    trainer._generate_single_turn = counted
    trainer.train()
    peak = max_rss_mb()
    return {"peak_rss_mb": peak, "step_s": timer.step_s, "completion_tokens": [sum(c) for _, c in lengths],
            "flops": [step_flops(costs, p, c) for p, c in lengths], "student": trainer.model, "teacher": teacher}


def run_trl_gkd(spec: dict, scratch: Path) -> dict:
    """TRL's `GKDTrainer` with λ = 1 (every batch sampled by the student): full [B, L, V] logits of both models."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from opd.lm.hf.model import load_model, load_tokenizer
    from opd.lm.batch import encode_prompts

    tokenizer = load_tokenizer(spec["student"])
    student, teacher = load_model(spec["student"]), load_model(spec["teacher"])
    costs = _costs(student, teacher)
    train = train_prompts(spec)
    ids = encode_prompts(tokenizer, [train[i].prompt for i in prompt_order(spec, len(train))], 1 << 30)

    def collate(rows):  # left-padded prompts, as GKD's own chat collator builds them
        P = max(len(r["ids"]) for r in rows)
        prompts = torch.full((len(rows), P), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(prompts)
        for i, r in enumerate(rows):
            prompts[i, P - len(r["ids"]) :] = torch.tensor(r["ids"])
            mask[i, P - len(r["ids"]) :] = 1
        return {"prompts": prompts, "prompt_attention_mask": mask, "input_ids": prompts, "attention_mask": mask}

    args = GKDConfig(**_trl_common(spec, scratch), lmbda=1.0, temperature=1.0,
                     max_new_tokens=spec["max_new_tokens"])
    timer = StepTimer()
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                         data_collator=collate, train_dataset=Dataset.from_dict({"ids": ids}), callbacks=[timer])
    lengths = []
    generate = trainer.generate_on_policy_outputs

    def counted(model, inputs, generation_config):  # instrumentation only
        out = generate(model, inputs, generation_config)
        prompt_lens = inputs["prompt_attention_mask"].sum(1).tolist()
        lengths.append((prompt_lens, (out[2] != -100).sum(1).tolist()))
        return out

    trainer.generate_on_policy_outputs = counted
    trainer.train()
    peak = max_rss_mb()
    return {"peak_rss_mb": peak, "step_s": timer.step_s, "completion_tokens": [sum(c) for _, c in lengths],
            "flops": [step_flops(costs, p, c) for p, c in lengths], "student": trainer.model, "teacher": teacher}


RUNNERS = {"opd": run_opd, "opd_compile": run_opd, "opd_overlap": run_opd_overlap,
           "opd_overlap_compile": run_opd_overlap, "opd_sampler_overlap": run_opd_sampler_overlap,
           "trl_distillation": run_trl_distillation, "trl_gkd": run_trl_gkd}


def run(spec: dict, scratch: Path) -> dict:
    """Train as `spec` says, then measure; returns the entry's raw numbers (no model objects)."""
    if spec["system"] not in RUNNERS:
        raise ValueError(f"unknown system {spec['system']!r}; choose one of {sorted(RUNNERS)}")
    torch.set_num_threads(spec["threads"])
    import transformers  # noqa: F401  (import cost is part of the baseline for every system)

    import_rss = max_rss_mb()
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    raw = RUNNERS[spec["system"]](spec, scratch)
    train_wall = time.perf_counter() - t0
    from opd.lm.eval import heldout_reverse_kl
    from opd.lm.hf.model import load_model, load_tokenizer
    from opd.tasks import get_task

    student = raw.pop("student")
    teacher = raw.pop("teacher", None)
    out = dict(raw, import_rss_mb=import_rss, train_wall_s=train_wall, threads=torch.get_num_threads(),
               loadavg_start=load_before, loadavg_end=os.getloadavg()[0])
    if spec["heldout_prompts"] > 0:
        teacher = teacher or load_model(spec["teacher"])
        tokenizer = load_tokenizer(spec["student"])
        held_out = [e.prompt for e in get_task("arithmetic").examples(spec["heldout_prompts"], seed=0, split="test")]

        def kl(model) -> float:
            return heldout_reverse_kl(model, teacher, tokenizer, held_out, spec["max_new_tokens"],
                                      batch_size=spec["batch_size"], seed=spec["seed"])

        out["heldout_reverse_kl"] = kl(student)
        if spec.get("initial_kl"):
            out["heldout_reverse_kl_start"] = kl(load_model(spec["student"]))
    return out


def main(argv: list[str]) -> None:
    worker_main(run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
