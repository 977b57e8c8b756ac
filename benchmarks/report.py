"""Assemble RESULTS.md from the sections the benchmarks write to benchmarks/results/, short enough to read.

Every `opd bench NAME` writes `benchmarks/results/NAME.md` (all of its tables) and then runs this file. Next to it, a
hand-written `NAME_notes.md` reads those numbers; it opens with an "**In short.**" paragraph of at most six lines.
RESULTS.md is then: the verdict table (`VERDICTS` below: what is claimed, our number, whether it holds), and per
benchmark its command, the setup line and first table of `NAME.md`, the notes' "In short", and links to both files.
The same verdict table goes into the README's "Results at a glance". `python benchmarks/report.py` alone rebuilds both
from what is there.

Every number in a verdict's "ours" cell must appear in `NAME.md` or `NAME_notes.md`. After a rerun that moved the
numbers, a missing one is marked in the table and named on stderr until someone re-reads the run and edits the row.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
GLANCE_BEGIN = "<!-- results at a glance: written by benchmarks/report.py from its VERDICTS -->"
GLANCE_END = "<!-- end of results at a glance -->"
IN_SHORT = "**In short.**"
IN_SHORT_MAX_LINES = 6


@dataclass(frozen=True)
class Verdict:
    """One benchmark: `opd bench NAME` writes results/NAME.md; its reading is results/NAME_notes.md."""

    name: str
    title: str
    claim: str
    """What is claimed and by whom: a section of the survey (the document opd started from), a paper, or our own goal."""
    ours: str
    """Our number(s); each must appear in NAME.md or NAME_notes.md."""
    holds: str


VERDICTS = [
    Verdict("quickstart", "Quickstart: on-policy distillation vs SFT on teacher samples",
            "On-policy distillation beats SFT on teacher samples at equal compute (survey §3.3)",
            "0.605 ± 0.044 against 0.634 ± 0.047 after 200 updates, 3 seeds",
            "no: −0.029, inside the seed spread"),
    Verdict("table31", "Table 3.1: SFT vs RL vs on-policy distillation, accuracy against compute",
            "Table 3.1 (survey §3.3): on-policy distillation reaches RL's accuracy for a fraction of its compute, "
            "and beats off-policy distillation",
            "RL's final 0.332 reached with 3.4–7.5× fewer FLOPs by every teacher-based method; at 300 updates "
            "on-policy 0.555, SFT on teacher samples 0.590",
            "partly: the compute saving holds; on-policy does not beat SFT"),
    Verdict("perf", "Performance against TRL",
            "Our goal: ≥ 2× the tokens/s of TRL 1.16's trainers at ≤ 0.5× their peak memory, same held-out KL",
            "49k vocabulary: 2.27× / 2.42× (DistillationTrainer / GKDTrainer) at 0.50× / 0.28× the memory; "
            "20-token vocabulary: 1.6–2.7× over three runs",
            "at 49k yes (memory narrowly); not reliably at 20 tokens"),
    Verdict("reliability", "Reliability: crashes, fuzzing, load, a dying teacher server",
            "Our goal: a run survives kill -9, malformed requests, load and a dying teacher server",
            "20 kills, 0 failed resumes, final weights bit-exact; 5000 fuzzed requests, 0 5xx",
            "yes"),
    Verdict("control", "The lineage on control tasks",
            "Survey §1.1–2.3: KD helps a small student; Rusu's compressed students match their teacher; DAgger beats BC",
            "KD 87.9 → 92.3 %; CartPole at 2,000 steps: student acts + aggregation 1.00, DAgger 0.94–0.96, BC 0.88; "
            "Rusu at 25 / 7 / 4 % size: 84 / 87 / 64 % of the teacher (Breakout)",
            "KD and DAgger yes; Rusu's compression no (weak teachers)"),
    Verdict("realdata", "Your own data on a real model: instruction following with SmolLM2",
            "Our goal: your own prompt file and a real chat model (SmolLM2-135M-Instruct teaching a 10-layer cut); "
            "survey's mechanism: the student's own states carry the win",
            "held-out reverse KL 6.89 → 0.38 on-policy; the same loss on teacher samples 2.12, forward KL 1.66, SFT "
            "1.70; instruction following 0.156 against at most 0.010",
            "yes, every seed; on cross-entropy of teacher samples the order reverses (18.6 against 7.2–8.4)"),
    Verdict("remote_hidden", "A full-vocabulary remote teacher: hidden states against top-20 log-probs",
            "Our goal: a teacher server can send the exact full-vocabulary distribution",
            "3,073 bytes per token (top-20: 2,814); log-probs within 3.6e-05 of a local teacher's",
            "yes"),
    Verdict("shared_cpu", "Training on a CPU that other jobs share",
            "Our goal: a run next to busy jobs is not slowed down by its own threads",
            "1.02 s per step by default, 2.61 s with one thread per core (quiet machine: 0.21 s)",
            "yes, for jobs running when it starts"),
    Verdict("skd", "Speculative knowledge distillation (SKD) from a weak and a warm student",
            "SKD (survey §5.2): the teacher corrects the student's proposals, which helps a weak student",
            "weak start: every method below 1 %; warm start: SKD 0.565, on-policy 0.592, SFT 0.610",
            "not shown: all within the seed spread"),
    Verdict("opd_wins", "Where on-policy distillation wins",
            "Survey §3.1–3.3: training on the student's own states beats SFT on teacher samples",
            "1,000 updates: 0.690 against 0.828; a noisy teacher: +0.025, and SFT on its greedy outputs 0.325",
            "no language regime beyond the seed spread"),
    Verdict("opd_wins_control", "Where on-policy distillation wins, control: Rusu compression with the student's own "
            "play",
            "Survey §2.3: a student trained on the states it visits beats one trained on the teacher's",
            "Space Invaders at 7 % / 4 % size: 47 % / 48 % of the teacher, against 36 % / 35 % with replay "
            "(10 seeds)",
            "yes for small students; no difference at 25 % or on Breakout"),
    Verdict("xtok", "Distillation across tokenizers",
            "Survey §5.1: a student with another tokenizer still learns, through alignment",
            "BPE student 0.225 → 0.707 (SFT on the teacher's samples: 0.788); Gemma 3 270M → SmolLM2: reverse KL "
            "1.137 → 0.411",
            "yes; SFT stays ahead on this task"),
    Verdict("vllm", "opd against a real vLLM server",
            "Our goal: a real vLLM works as the teacher and as the student's sampler",
            "losses equal to `opd serve`'s within 1.49e-08; top-20 log-probs within 0.000466 (SmolLM2)",
            "yes, every check passed"),
    Verdict("robotics", "Robotics analogues: sim-to-real, RLDG, RPD, interpretable policies",
            "Survey §4.2, §5.2: sim-to-real; RLDG (RL-expert data beats human demonstrations); RPD surpasses its "
            "teacher; interpretable students",
            "sim-to-real 679 under shifted dynamics (BC 26, PPO 623); RLDG 83 % against 89 % for human-like demos; "
            "RPD 1000 against the teacher's 332",
            "sim-to-real and interpretable yes; RPD partly (PPO gets there too); RLDG reversed"),
    Verdict("continual", "Continual learning: personalisation and forgetting",
            "Survey §4.1: self-distillation after a fine-tune restores instruction following and keeps the new "
            "knowledge",
            "instruction following 0.24 → 0.31, knowledge 0.49 → 0.22; a task sequence: first task kept at 0.705 "
            "against 0.013",
            "partly: the skill returns, the knowledge does not; retention holds"),
    Verdict("privileged", "A teacher that sees the reference solution (self-distillation with privileged context)",
            "SDFT/OPSD: the student's own start, shown the solution in its prompt, teaches better than SFT on it",
            "arithmetic: 0.000 on every seed against SFT's 0.659; SmolLM2 stage 2 with the document in the "
            "teacher's prompt: knowledge 0.021 ± 0.021 against 0.222 without it",
            "no: the arithmetic teacher cannot read its context; SmolLM2's can (0.438), yet knowledge fell"),
    Verdict("tools", "Distilling a tool-using student: on-policy against SFT on teacher conversations",
            "Our goal: distil agents that call tools over several turns; the survey's claim (§3.3) carried over: "
            "on-policy distillation beats SFT on teacher samples",
            "calculator arithmetic: 0.383 ± 0.054 against 0.424 ± 0.016 after 200 updates, 3 seeds; tool-call "
            "validity 1.000 in every arm",
            "the regime works; on-policy does not beat SFT here (−0.041, within the seed spread)"),
    Verdict("scale", "How cost grows: completion length, vocabulary, model size",
            "Our goal: at 4k tokens, ≥ 1.5× the tokens/s of TRL 1.16's DistillationTrainer at ≤ 0.5× its peak memory; "
            "loss memory flat in the vocabulary, memory at most linear in length",
            "at 4,096 tokens 1.95× TRL's tokens/s at 0.34× its peak memory; step memory ∝ length^0.19 (TRL 0.95); "
            "at a 262k vocabulary 1.63× TRL's tokens/s (46.5 against 28.5), but opd's step memory grows 3.65×",
            "length goals met; vocabulary memory goal not met"),
    Verdict("gpu", "opd on one GPU: Qwen3-shaped models against TRL",
            "Our goal: the same train step on one GPU at Qwen3 sizes (0.6B and 1.7B students, 4B and 8B teachers, bf16) "
            "against TRL's DistillationTrainer",
            "not measured yet: needs a GPU machine (benchmarks/gpu/README.md)",
            "not measured yet"),
]

HEADER = """# Results

Every number here was measured by the command named in its section, on the machine stated there; each section is
regenerated by that command (which also rebuilds this file). Numbers are reported as measured, whatever they show.
"The survey" is the document opd started from, "On-Policy Distillation的谱系与演进" (the lineage and evolution of
on-policy distillation); claims name its sections. Each benchmark's full tables and reading are linked under it.
"""

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*(?:e[+-]?\d+)?")


def anchor(title: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces turned into hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _plain_numbers(text: str) -> str:
    return re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 2,000 and 2000 are the same number


def untraced(verdict: Verdict) -> list[str]:
    """The numbers of `verdict.ours` that neither NAME.md nor NAME_notes.md contains."""
    text = _plain_numbers(" ".join(p.read_text() for p in (RESULTS / f"{verdict.name}.md",
                                                            RESULTS / f"{verdict.name}_notes.md") if p.exists()))
    return [n for n in _NUMBER.findall(verdict.ours)
            if not re.search(rf"(?<![\d.]){re.escape(_plain_numbers(n))}(?![\d])", text)]


def verdict_table(link_to: str = "") -> str:
    """The verdict table; each command links to its section (in RESULTS.md: `link_to` names that file from where the
    table stands)."""
    rows = ["| claim | ours | holds? | command |", "|---|---|---|---|"]
    for v in VERDICTS:
        missing = untraced(v)
        holds = v.holds + (f" (⚠ not in the latest results: {', '.join(missing)})" if missing else "")
        rows.append(f"| {v.claim} | {v.ours} | {holds} | [`opd bench {v.name}`]({link_to}#{anchor(v.title)}) |")
    return "\n".join(rows) + "\n"


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def _opd_bench(text: str) -> str:
    """Name recorded commands by the entry point that runs them: `python -m benchmarks.X` and `python benchmarks/X.py`
    are `opd bench NAME` (which runs the same file with the same flags), so a moved file breaks no recorded command."""
    from opd.cli import BENCHMARKS

    for name, file in BENCHMARKS.items():
        # the file's module now, and where it was before the benchmarks moved into packages (benchmarks/NAME.py)
        modules = {"benchmarks." + file.removesuffix(".py").replace("/", "."), f"benchmarks.{name}"}
        paths = {f"benchmarks/{file}", f"benchmarks/{name}.py"}
        recorded = "|".join([*(f"-m {re.escape(m)}" for m in modules), *map(re.escape, paths)])
        text = re.sub(rf"python3? ({recorded})(?![\w.])", f"opd bench {name}", text)
    return text


def headline(section: str) -> list[str]:
    """The head of a section file: the paragraphs before its first table (the command, the machine, what the table
    measures; the title and any plot left out) and that table."""
    head = []
    for p in _paragraphs(section):
        if p.startswith("|"):
            return head + [p]
        if head and head[-1].startswith("### ") and "\n" not in head[-1]:
            head[-1] += "\n" + p  # a heading needs no blank line after it
        elif not p.startswith(("## ", "![")):
            head.append(p)
    return head


def in_short(notes: Path) -> str:
    """The "**In short.**" paragraph of a notes file ("" if it has none)."""
    if not notes.exists():
        return ""
    found = [p for p in _paragraphs(notes.read_text()) if p.startswith(IN_SHORT)]
    if found and len(found[0].splitlines()) > IN_SHORT_MAX_LINES:
        print(f"report: {notes.name}: the In short paragraph is longer than {IN_SHORT_MAX_LINES} lines",
              file=sys.stderr)
    return found[0] if found else ""


def render_results() -> str:
    parts = [HEADER, "## At a glance\n", verdict_table()]
    for v in VERDICTS:
        path, notes = RESULTS / f"{v.name}.md", RESULTS / f"{v.name}_notes.md"
        command = f"`opd bench {v.name}`"
        if not path.exists():
            parts.append(f"## {v.title}\n\nNot measured yet: run {command}.\n")
            continue
        links = [f"[all tables](benchmarks/results/{path.name})"]
        if notes.exists():
            links.append(f"[full reading](benchmarks/results/{notes.name})")
        block = [_opd_bench(p) for p in [*headline(path.read_text()), in_short(notes)] if p]
        head = f"## {v.title}\n{command} · {' · '.join(links)}"
        if block and not block[0].startswith(("|", "#")):  # the links and the setup text as one block, a line apart
            block[0] = f"{head}\\\n{block[0]}"
        else:
            block.insert(0, head)
        parts.append("\n\n".join(block) + "\n")
    return "\n".join(parts)


def render_readme(readme: str) -> str:
    """`readme` with the table between its glance markers replaced by the verdict table."""
    begin, end = readme.index(GLANCE_BEGIN) + len(GLANCE_BEGIN), readme.index(GLANCE_END)
    return readme[:begin] + "\n\n" + verdict_table(link_to="RESULTS.md") + "\n" + readme[end:]


def write_results() -> Path:
    """Rebuild RESULTS.md and the README's verdict table; a benchmark not yet measured says how to produce it."""
    for v in VERDICTS:
        if missing := untraced(v):
            print(f"report: opd bench {v.name}: {', '.join(missing)} not found in benchmarks/results/{v.name}.md "
                  f"or its notes; re-read the run and update its row of VERDICTS in benchmarks/report.py",
                  file=sys.stderr)
    out = ROOT / "RESULTS.md"
    out.write_text(render_results())
    if README.exists() and GLANCE_BEGIN in (text := README.read_text()):
        README.write_text(render_readme(text))
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # `python benchmarks/report.py` from a checkout: opd.cli names the benchmarks
    print(write_results())
