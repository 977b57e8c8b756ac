"""`opd bench continual`: continual learning by on-policy self-distillation (MISSION rows 10 and 19).

Personalisation (row 10), on SmolLM2-135M-Instruct:
  stage 0  the base chat model;
  stage 1  fine-tuned on a made-up company's internal documents (`company_docs.py`) mixed with some chat
           data (the base model's own replies to general prompts), full weights or LoRA: `opd train --source data
           --loss sft`;
  stage 2  on-policy self-distillation: the stage-1 model samples replies to general chat prompts and learns the
           per-token reverse KL to the stage-0 model (`opd train --student STAGE1 --teacher BASE`); against SFT on
           the base model's own samples of the same prompts (`--source teacher --loss sft`), at equal updates.
Each stage is scored on knowledge (held-out questions about the documents, `--checker contains`) and instruction
following (held-out IFEval-style prompts, `--checker ifeval`).

Forgetting (row 19) on the small task models lives in `forgetting.py`.

    opd bench continual                 # full: 3 seeds
    opd bench continual --quick         # seconds: a tiny random model, checks the pipeline
    opd bench continual --sections personalisation --merge

Writes benchmarks/results/continual.json and continual.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import tyro

from benchmarks.common.instruction_prompts import instruction_rows, tiny_pair
from benchmarks.common.results import RESULTS
from benchmarks.common.stats import sd
from benchmarks.continual.company_docs import Corpus
from opd.config import DistillConfig, LoraArgs, OptimArgs, SamplingArgs
from opd.lm.hf.model import context_length
from opd.lm.data.checkers import get_checker
from opd.lm.data.prompts import as_rows, encode, load_rows
from opd.lm.eval import checked_accuracy, greedy_completions
from opd.lm.hf.model import load_model, load_tokenizer
from opd.lm.train import distill

SECTIONS = ("personalisation", "forgetting")
STAGE2 = {"self_distillation": dict(source="student", loss="reverse_kl"),
          "sft_on_base_samples": dict(source="teacher", loss="sft")}
"""Stage 2's two methods: on-policy self-distillation, and SFT on the stage-0 model's own samples."""


@dataclass(frozen=True)
class ContinualArgs:
    """What `opd bench continual` runs (defaults: the full benchmark)."""

    quick: bool = False
    """A tiny random model and a handful of steps: checks the pipeline, the numbers mean nothing."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One run per seed and variant."""
    sections: tuple[str, ...] = SECTIONS
    """Which parts to run: personalisation, forgetting."""
    merge: bool = False
    """Keep the other sections of an existing continual.json and replace only the ones run now."""
    projects: int = 12
    """Fictional projects in the documents (4 facts each: the knowledge test has 4 × this many questions)."""
    chat_rows: int = 24
    """General chat rows (the base model's own greedy replies) mixed into stage 1's documents."""
    finetune_steps: int = 60
    """Stage 1 updates."""
    finetune_lr: float = 3e-4
    """Stage 1 peak learning rate, full weights."""
    lora_r: int = 16
    """LoRA rank (all linear layers but the head), stages 1 and 2 of the LoRA variant."""
    lora_lr: float = 1e-3
    """Stage 1 peak learning rate, LoRA."""
    distill_steps: int = 20
    """Stage 2 updates (both methods)."""
    distill_lr: float = 3e-4
    """Stage 2 peak learning rate, full weights (LoRA: `lora_lr`); the stage-1 rate by default."""
    batch_size: int = 8
    """Rows per update, both stages."""
    max_new_tokens: int = 64
    """Longest reply in stage 2 and in the instruction-following test."""
    if_prompts: int = 64
    """Held-out instruction-following prompts (topics never seen in stage 1 or 2)."""
    variants: tuple[str, ...] = ("full", "lora")
    """Stage 1 (and 2) trained with full weights and/or LoRA."""
    lora_seeds: tuple[int, ...] = (0,)
    """Seeds of the LoRA variant, which runs stage 1 and self-distillation only (SFT on base-model samples is
    compared on full weights): the CPU budget of the full benchmark."""
    threads: int = 2
    """Torch threads."""
    work_dir: str = "runs/bench-continual"
    """Where models, data files and runs go."""
    other_load: str = "nothing else"
    """What else ran on the machine meanwhile (recorded: the wall times depend on it)."""
    out_dir: str = str(RESULTS)
    """Where continual.json and continual.md go (continual_quick.* with --quick)."""


def quick_args(args: ContinualArgs) -> ContinualArgs:
    """The --quick settings: one seed, a tiny model, a few steps."""
    return replace(args, seeds=args.seeds[:1], lora_seeds=args.lora_seeds[:1], projects=2, chat_rows=4, finetune_steps=2, distill_steps=2,
                   batch_size=2, max_new_tokens=8, if_prompts=4, threads=1, lora_r=2,
                   work_dir=args.work_dir + "-quick")  # fmt: skip


class Scorer:
    """Knowledge and instruction-following accuracy of a model directory, greedy."""

    def __init__(self, tokenizer, corpus: Corpus, if_rows: list[dict], work: Path, max_new_tokens: int, room: int):
        self.tokenizer, self.max_new_tokens, self.cache = tokenizer, max_new_tokens, work / "scores"
        self.sets = {"knowledge": encode(tokenizer, load_rows(write_once(work / "knowledge.jsonl",
                                                                         corpus.question_rows())), room, "knowledge"),
                     "instruction_following": encode(tokenizer, load_rows(write_once(work / "if_test.jsonl",
                                                                                     if_rows)), room, "if")}
        self.checks = {"knowledge": get_checker("contains"), "instruction_following": get_checker("ifeval")}

    def __call__(self, model_dir: str) -> dict:
        # Scores are kept per model directory, so that a rerun (or runs of single seeds in parallel processes,
        # gathered by a last run over all seeds) scores each model once.
        key = hashlib.sha256(f"{Path(model_dir).resolve()}|{len(self.sets['knowledge'])}|"
                             f"{len(self.sets['instruction_following'])}|{self.max_new_tokens}".encode()).hexdigest()
        cached = self.cache / f"{key[:16]}.json"
        written = max((f.stat().st_mtime for f in Path(model_dir).glob("*.safetensors")), default=0.0)
        if cached.exists() and cached.stat().st_mtime > written:  # scored after these weights were written
            return json.loads(cached.read_text())
        model = load_model(model_dir).eval()
        # Answers to the knowledge questions are one short sentence; 32 new tokens hold any of them.
        lengths = {"knowledge": min(32, self.max_new_tokens), "instruction_following": self.max_new_tokens}
        scores = {name: checked_accuracy(model, self.tokenizer, prompts, self.checks[name], lengths[name], 16)
                  for name, prompts in self.sets.items()}
        write_once(cached, scores)
        return scores


def write_once(path: Path, content) -> str:
    """Write rows (a list: JSONL) or a dict (JSON) to `path` through a rename, so that processes sharing the work
    directory never read a half-written file; an existing file with the same content is left alone."""
    text = "".join(json.dumps(r) + "\n" for r in content) if isinstance(content, list) else json.dumps(content)
    if not (path.exists() and path.read_text() == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return str(path)


def chat_mix(base_dir: str, tokenizer, rows: list[dict], max_new_tokens: int, room: int) -> list[dict]:
    """The base model's own greedy replies to general prompts, as chat SFT rows (stage 1's "some chat data")."""
    model = load_model(base_dir).eval()
    # messages and prompt only: the IFEval columns (`kwargs`) vary in shape from row to row
    prompts = encode(tokenizer, as_rows([{"messages": r["messages"], "prompt": r["prompt"]} for r in rows]), room,
                     "chat mix")
    replies = []
    for start in range(0, len(rows), 16):
        replies += greedy_completions(model, tokenizer, prompts.prompt_ids[start:start + 16], max_new_tokens)
    return [{"messages": r["messages"], "completion": reply.strip()} for r, reply in zip(rows, replies)]


def train_stage(args: ContinualArgs, variant: str, out: Path, seed: int, **fields) -> str:
    """One `opd train` run; returns the directory of its final model (a merged plain model for LoRA)."""
    lora = LoraArgs(r=args.lora_r) if variant == "lora" else LoraArgs()
    cfg = DistillConfig(sampling=SamplingArgs(max_new_tokens=args.max_new_tokens), lora=lora, eval_every=0,
                        batch_size=args.batch_size, seed=seed, out_dir=str(out), progress=not args.quick,
                        save_every=fields["steps"], **fields)  # fmt: skip
    if not (out / "checkpoint").exists():
        distill(cfg)
    if variant != "lora":
        return str(out / "checkpoint")
    merged = out / "merged"
    if not merged.exists():
        from opd.args import MergeArgs
        from opd.lm.hf.lora import merge_main

        merge_main(MergeArgs(run_dir=str(out), out_dir=str(merged)))
    return str(merged)


def train_seconds(run_dir: Path) -> float:
    """Seconds the run's updates took, from its metrics.jsonl (so a run reused from an earlier process keeps its
    own time; the scoring is not included)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sum(r.get("step_s", 0.0) for r in rows)


@dataclass
class Setup:
    """What every stage of the personalisation runs shares: the base model, the scorer, the data files."""

    work: Path
    corpus: Corpus
    general: list[dict]
    """General chat rows (IFEval-style prompts); stage 2's prompts are all but the last `chat_rows`."""
    base_dir: str
    tokenizer: object
    score: Scorer
    stage1_file: str
    stage2_file: str


def setup(args: ContinualArgs) -> Setup:
    """The base model (SmolLM2-135M-Instruct, or a tiny random pair with --quick), its scorer, stage 1's documents
    mixed with the base model's own chat replies, and stage 2's general prompts, written once under the work dir."""
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = Corpus.build(args.projects)
    general = instruction_rows(2000, seed=0, split="train")
    if args.quick:
        texts = [{"prompt": r["messages"][0]["content"] + " " + r["completion"]} for r in corpus.finetune_rows()]
        base_dir, _ = tiny_pair(general[:32] + texts, work / "tiny")
    else:
        from opd.lm.hf.pretrained import smollm2_dir

        base_dir = str(smollm2_dir())
    tokenizer = load_tokenizer(base_dir)
    tokenizer.padding_side = "left"
    room = context_length(base_dir) - args.max_new_tokens
    score = Scorer(tokenizer, corpus, instruction_rows(args.if_prompts, seed=0, split="test"), work,
                   args.max_new_tokens, room)
    mix_file = work / "chat_mix.jsonl"
    if not mix_file.exists():
        write_once(mix_file, chat_mix(base_dir, tokenizer, general[-args.chat_rows:], args.max_new_tokens, room))
    stage1_rows = corpus.finetune_rows() + [json.loads(line) for line in mix_file.read_text().splitlines()]
    return Setup(work, corpus, general, base_dir, tokenizer, score, write_once(work / "stage1.jsonl", stage1_rows),
                 write_once(work / "stage2.jsonl", general[:-args.chat_rows]))


def stage1(args: ContinualArgs, s: Setup, variant: str, seed: int) -> str:
    """Stage 1 of one seed (the model fine-tuned on the documents), trained once per work dir."""
    lr = args.lora_lr if variant == "lora" else args.finetune_lr
    return train_stage(args, variant, s.work / variant / f"seed-{seed}" / "stage1", seed, student=s.base_dir,
                       data=s.stage1_file, source="data", loss="sft", steps=args.finetune_steps,
                       optim=OptimArgs(lr=lr, warmup_steps=3, schedule="cosine"))


def personalisation(args: ContinualArgs) -> dict:
    """Stages 0-2 for every variant and seed; returns the json section."""
    s = setup(args)
    base_dir, score, corpus, stage2_file = s.base_dir, s.score, s.corpus, s.stage2_file
    out = {"base": score(base_dir), "runs": {}, "model": "tiny random (quick)" if args.quick else
           "SmolLM2-135M-Instruct", "stage1_rows": {"documents": len(corpus.document_rows()),
           "qa": len(corpus.train_qa_rows()), "chat": args.chat_rows}}  # fmt: skip
    print("base", out["base"], flush=True)
    for variant in args.variants:
        lr2 = args.lora_lr if variant == "lora" else args.distill_lr
        for seed in args.lora_seeds if variant == "lora" else args.seeds:
            run_dir = s.work / variant / f"seed-{seed}"
            first = stage1(args, s, variant, seed)
            run = {"after_finetune": score(first), "train_seconds": {"stage1": train_seconds(run_dir / "stage1")}}
            print(variant, seed, "after_finetune", run["after_finetune"], flush=True)
            for method, choice in STAGE2.items():
                if variant == "lora" and method != "self_distillation":
                    continue
                final = train_stage(args, variant, run_dir / method, seed, student=first, teacher=base_dir,
                               data=stage2_file, steps=args.distill_steps,
                               optim=OptimArgs(lr=lr2, warmup_steps=2, schedule="cosine"), **choice)  # fmt: skip
                run[f"after_{method}"] = score(final)
                print(variant, seed, f"after_{method}", run[f"after_{method}"], flush=True)
                run["train_seconds"][method] = train_seconds(run_dir / method)
            out["runs"].setdefault(variant, []).append(run)
            print(variant, seed, run, flush=True)
    return out


def _mean(runs: list[dict], stage: str, metric: str) -> float:
    return statistics.mean(r[stage][metric] for r in runs)


def stages(section: dict, variant: str = "full") -> dict:
    """The issue's three-row view: base, after fine-tune, after self-distillation (means over seeds)."""
    runs = section["runs"][variant]
    metrics = ("knowledge", "instruction_following")
    return {"base": section["base"],
            "after_finetune": {m: _mean(runs, "after_finetune", m) for m in metrics},
            "after_self_distillation": {m: _mean(runs, "after_self_distillation", m) for m in metrics},
            "after_sft_on_base_samples": {m: _mean(runs, "after_sft_on_base_samples", m) for m in metrics}}


def _cell(runs: list[dict], stage: str, metric: str) -> str:
    values = [r[stage][metric] for r in runs]
    return f"{statistics.mean(values):.3f} ± {sd(values):.3f}"


def personalisation_markdown(section: dict, args: ContinualArgs) -> str:
    base = section["base"]
    lines = [f"### Personalisation: new knowledge, then self-distillation ({section['model']})", "",
             f"Stage 1: {args.finetune_steps} updates of {args.batch_size} rows (lr {args.finetune_lr} full, "
             f"{args.lora_lr} LoRA r={args.lora_r}) on {section['stage1_rows']['documents']} documents + "
             f"{section['stage1_rows']['qa']} training QA pairs about {args.projects} fictional projects + "
             f"{section['stage1_rows']['chat']} chat rows (the base model's own replies). Stage 2: "
             f"{args.distill_steps} updates of {args.batch_size} general prompts (lr {args.distill_lr} full, "
             f"{args.lora_lr} LoRA), replies up to {args.max_new_tokens} tokens, teacher = the base model. "
             f"Knowledge: {4 * args.projects} held-out questions (other wording than training), `--checker contains`; "
             f"instruction following: {args.if_prompts} held-out IFEval-style prompts, `--checker ifeval`, greedy. "
             f"Mean ± sd over seeds {list(args.seeds)} (LoRA: {list(args.lora_seeds)}).", "",
             "| stage | variant | knowledge | instruction following |", "|---|---|---|---|",
             f"| base model | | {base['knowledge']:.3f} | {base['instruction_following']:.3f} |"]
    for variant, runs in section["runs"].items():
        for stage, name in (("after_finetune", "after fine-tune"),
                            ("after_self_distillation", "after on-policy self-distillation"),
                            ("after_sft_on_base_samples", "after SFT on base-model samples")):
            if stage in runs[0]:
                lines.append(f"| {name} | {variant} ({len(runs)} seed{'s' * (len(runs) > 1)}) | "
                             f"{_cell(runs, stage, 'knowledge')} | {_cell(runs, stage, 'instruction_following')} |")
    full = section["runs"].get("full", [])
    if full:
        minutes = {k: statistics.mean(r["train_seconds"][k] for r in full) / 60 for k in full[0]["train_seconds"]}
        lines += ["", "Training time per full-weight seed (updates only, one torch thread): "
                  + ", ".join(f"{k.replace('_', ' ')} {v:.1f} min" for k, v in minutes.items()) + "."]
    return "\n".join(lines) + "\n"


def continual_main(args: ContinualArgs) -> dict:
    """Run the sections asked for; write continual.json / continual.md under benchmarks/results."""
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown --sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    run_args = quick_args(args) if args.quick else args
    name = "continual_quick" if args.quick else "continual"
    results = Path(args.out_dir)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    data = json.loads(path.read_text()) if args.merge and path.exists() else {}
    t0 = time.perf_counter()
    if "personalisation" in args.sections:
        data["personalisation"] = personalisation(run_args)
        data["personalisation"]["markdown"] = personalisation_markdown(data["personalisation"], run_args)
        data["stages"] = stages(data["personalisation"])
    if "forgetting" in args.sections:
        from benchmarks.continual.forgetting import run as forgetting

        section, markdown = forgetting(args.quick, run_args.seeds, results)
        heading = "### Forgetting over a task sequence (small task models)"
        plot = "" if args.quick else "\n![forgetting](benchmarks/results/continual_forgetting.png)\n"
        data["forgetting"] = {**section, "markdown": f"{heading}\n\n{markdown}{plot}"}
    data["meta"] = {"args": asdict(run_args), "date": time.strftime("%Y-%m-%d"), "other_load": args.other_load,
                    "machine": f"{platform.machine()} CPU, {run_args.threads} torch thread{'s' * (run_args.threads > 1)}",
                    "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    path.write_text(json.dumps(data, indent=1) + "\n")
    parts = ["## Continual learning: personalisation and forgetting", "",
             f"`opd bench continual{' --quick' if args.quick else ''}`, {data['meta']['date']}, "
             f"{data['meta']['machine']}; also running: {args.other_load}.", ""]
    parts += [data[s]["markdown"] for s in SECTIONS if s in data]
    (results / f"{name}.md").write_text("\n".join(parts))
    return data


if __name__ == "__main__":
    continual_main(tyro.cli(ContinualArgs))
