"""`opd bench privileged`, personalisation: continual learning's stage 2 with the documents in the teacher's prompt.

`opd bench continual` fine-tunes SmolLM2-135M-Instruct on a made-up company's documents (stage 1: knowledge up,
instruction following down), then self-distils it from the base model on general prompts (stage 2), which restores
instruction following but loses half the new knowledge. Here stage 2 is SDFT-style: the same base-model teacher, but
stage 2's prompts also hold the training questions about the projects, and for those the teacher reads the project's
wiki page before the question (`teacher_messages`), so it can grade an answer about facts it never learned. Half of
the rows are those questions, half general prompts (the teacher sees these as they are). Against: today's stage 2
(general prompts, no documents) and SFT on the base model's samples, at equal updates, from the same stage-1 models
(`benchmarks/continual/run.py` trains them; both benchmarks share its work directory, so each seed's stage 1 is
trained once). Knowledge and instruction following per arm and seed.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from benchmarks.common.stats import sd
from benchmarks.continual import run as continual
from benchmarks.continual.company_docs import ATTRIBUTES, DOCUMENT_KINDS, TRAIN_QUESTIONS
from opd.config import OptimArgs

ARMS = {
    "with_documents": ("self-distillation, the teacher reads the project's document",
                       dict(source="student", loss="reverse_kl")),
    "self_distillation": ("self-distillation on general prompts, no documents",
                          dict(source="student", loss="reverse_kl")),
    "sft_on_base_samples": ("SFT on the base model's samples", dict(source="teacher", loss="sft")),
}
"""key -> (label, DistillConfig settings); the teacher is the base model in each, and only `with_documents` trains on
the rows with teacher prompts (the others on `opd bench continual`'s stage 2 file)."""
MEASURES = ("knowledge", "instruction_following")


def document_rows(corpus, general: list[dict]) -> list[dict]:
    """Stage 2 with the documents: each training question about a project, with a `teacher_messages` that puts the
    project's wiki page before it, and as many general prompts (teacher prompt = the prompt)."""
    rows = []
    for p in corpus.projects:
        page = DOCUMENT_KINDS["wiki"].format(**p.fields())
        for attribute in ATTRIBUTES:
            question = TRAIN_QUESTIONS[attribute].format(**p.fields())
            rows.append({"messages": [{"role": "user", "content": question}],
                         "teacher_messages": [{"role": "user", "content": f"{page}\n\n{question}"}]})
    rows += [{"messages": r["messages"], "teacher_messages": r["messages"]} for r in general[:len(rows)]]
    return rows


def personalisation(seeds: tuple[int, ...], arms: tuple[str, ...], threads: int, quick: bool,
                    on_seed=lambda section: None) -> dict:
    """Stage 1 (shared with `opd bench continual`) and the chosen stage-2 arms per seed; the json section."""
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown personalisation arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    args = continual.ContinualArgs(seeds=seeds, threads=threads)
    if quick:
        args = continual.quick_args(replace(args, quick=True))
    s = continual.setup(args)
    files = {"with_documents": continual.write_once(s.work / "stage2-with-documents.jsonl",
                                                    document_rows(s.corpus, s.general[:-args.chat_rows]))}
    section = {"model": "tiny random (quick)" if quick else "SmolLM2-135M-Instruct", "base": s.score(s.base_dir),
               "seeds": [], "arms": {key: {m: [] for m in MEASURES} for key in ("after_finetune", *arms)},
               "settings": {"distill_steps": args.distill_steps, "batch_size": args.batch_size,
                            "lr": args.distill_lr, "max_new_tokens": args.max_new_tokens,
                            "questions_with_documents": 4 * args.projects, "general_rows_with_them": 4 * args.projects}}
    section["teacher_with_documents"] = teacher_reads_documents(s)
    for seed in args.seeds:
        first = continual.stage1(args, s, "full", seed)
        scored = {"after_finetune": s.score(first)}
        for key in arms:
            final = continual.train_stage(
                args, "full", s.work / "full" / f"seed-{seed}" / key, seed, student=first, teacher=s.base_dir,
                data=files.get(key, s.stage2_file), steps=args.distill_steps,
                optim=OptimArgs(lr=args.distill_lr, warmup_steps=2, schedule="cosine"), **ARMS[key][1])
            scored[key] = s.score(final)
            print("personalisation", seed, key, scored[key], flush=True)
        for key, numbers in scored.items():
            for m in MEASURES:
                section["arms"][key][m].append(numbers[m])
        section["seeds"].append(seed)
        on_seed(section)
    return section


def teacher_reads_documents(s) -> dict:
    """How well the teacher (the base model) answers the held-out knowledge questions with the project's wiki page
    before each, greedy: whether the document in its prompt makes it a teacher that knows the facts."""
    from opd.lm.data.checkers import get_checker
    from opd.lm.data.prompts import as_rows, encode
    from opd.lm.eval import checked_accuracy
    from opd.lm.hf.model import context_length, load_model

    pages = {p.name: DOCUMENT_KINDS["wiki"].format(**p.fields()) for p in s.corpus.projects}
    rows = []
    for r in s.corpus.question_rows():
        page = next(text for name, text in pages.items() if f"Project {name}" in r["prompt"])
        rows.append({"messages": [{"role": "user", "content": f"{page}\n\n{r['prompt']}"}], "answer": r["answer"]})
    prompts = encode(s.tokenizer, as_rows(rows), context_length(s.base_dir) - 32, "questions with documents")
    model = load_model(s.base_dir).eval()
    return {"knowledge": checked_accuracy(model, s.tokenizer, prompts, get_checker("contains"), 32, 16)}


def from_continual(section: dict, continual_json: Path) -> dict:
    """The arms not run here, taken from `opd bench continual`'s results where its stage-1 models scored exactly as
    these did on every seed (the same models: training is deterministic for a seed); the seeds compared say which."""
    if not continual_json.exists():
        return {}
    runs = json.loads(continual_json.read_text()).get("personalisation", {}).get("runs", {}).get("full", [])
    ours = section["arms"]["after_finetune"]
    taken = {}
    for key in ARMS:
        if key in section["arms"] or not runs or len(runs) < len(section["seeds"]):
            continue
        same = all(runs[i]["after_finetune"][m] == ours[m][i] for i in range(len(section["seeds"])) for m in MEASURES)
        if same and f"after_{key}" in runs[0]:
            taken[key] = {m: [runs[i][f"after_{key}"][m] for i in range(len(section["seeds"]))] for m in MEASURES}
    return taken


def markdown(section: dict) -> str:
    """The personalisation table: knowledge and instruction following per arm (mean ± sd, per seed)."""
    st = section["settings"]
    lines = [f"### Personalisation: stage 2 with the documents in the teacher's prompt ({section['model']})", "",
             f"Stage 2 from the same stage-1 models (`opd bench continual`'s), {st['distill_steps']} updates of "
             f"{st['batch_size']} rows at lr {st['lr']}, replies up to {st['max_new_tokens']} tokens, teacher = the "
             f"base model; with documents: {st['questions_with_documents']} training questions whose teacher prompt "
             f"holds the project's wiki page, and {st['general_rows_with_them']} general prompts. Seeds "
             f"{section['seeds']}.", "",
             "| arm | knowledge | instruction following | knowledge per seed |", "|---|---|---|---|",
             f"| base model | {section['base']['knowledge']:.3f} | {section['base']['instruction_following']:.3f} | |"]
    if "teacher_with_documents" in section:
        lines.append(f"| base model, the project's wiki page before each question | "
                     f"{section['teacher_with_documents']['knowledge']:.3f} | | |")
    labels = {"after_finetune": "after fine-tune (stage 1)", **{k: label for k, (label, _) in ARMS.items()}}
    rows = {**section["arms"], **{k: v for k, v in section.get("from_continual", {}).items()}}
    for key, values in rows.items():
        k, i = values["knowledge"], values["instruction_following"]
        source = " (from `opd bench continual`)" if key in section.get("from_continual", {}) else ""
        lines.append(f"| {labels[key]}{source} | {statistics.mean(k):.3f} ± {sd(k):.3f} | "
                     f"{statistics.mean(i):.3f} ± {sd(i):.3f} | {', '.join(f'{v:.3f}' for v in k)} |")
    return "\n".join(lines) + "\n"
