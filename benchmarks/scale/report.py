"""Numbers, tables and plots of `opd bench scale` (`benchmarks.scale.run`); `benchmarks.gpu.run` writes its tables
with the same row formatting.

Definitions, the same for every system:
- tokens/s: completion tokens of a step / its wall time, mean over the timed steps (sampling rows: tokens sampled / the
  time to sample them);
- step s = teacher s + student s: teacher s is the teacher's scoring (opd: its `score`, a server's answer included;
  TRL: its teacher's trunk), student s the rest of the step: the student's forward and backward, the loss (where both
  heads are applied), clipping and the optimizer step;
- peak RSS: the high-water mark (VmHWM) of the point's process, imports, models and optimizer state included, plus
  that of its teacher's `opd serve` where it has one;
- step memory: how far RSS (GPU: allocated memory) rose during a timed step above where the step began: activations,
  loss buffers and gradients, not the weights or the optimizer state;
- MFU: `opd.flops` FLOPs of the step (teacher forward + 3 × student forward) / its time / the matmul peak measured in
  the same run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from benchmarks.scale.worker import STEP_SYSTEMS

SYSTEM_NAMES = {"opd": "opd", "opd_topk": "opd, top-20 server teacher",
                "opd_hidden": "opd, hidden-state server teacher", "opd_gc": "opd + gradient checkpointing",
                "opd_budget": "opd, token budget of one row per micro-batch",
                "trl_distillation": "TRL DistillationTrainer", "opd_sampling": "opd sampling (student, KV cache)"}
GOAL_LENGTH = 4096
"""The length at which opd is held against TRL (the longest both ran, if shorter)."""
SPEEDUP_GOAL, MEMORY_GOAL, VOCAB_FLAT_GOAL, LENGTH_EXPONENT_GOAL = 1.5, 0.5, 1.5, 1.1
"""Goals: tokens/s ≥ 1.5× TRL's and peak memory ≤ 0.5× TRL's at `GOAL_LENGTH`; opd's step memory less its gradients
(activations and loss buffers) at the largest vocabulary ≤ 1.5× that at the smallest; opd's step memory growing with
length with a fitted exponent ≤ 1.1 (linear, with room for fitting noise)."""


def fit_exponent(xs, ys) -> float:
    """b of the least-squares fit of log y = a + b log x: how y grows with x (y = c·x^b gives b exactly)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError(f"fitting an exponent needs two distinct x values, got {list(xs)}")
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def ok_rows(rows: list[dict], system: str | None = None) -> list[dict]:
    return [r for r in rows if not r.get("failed") and (system is None or r["system"] == system)]


def exponents(rows: list[dict]) -> dict:
    """Per system with two or more lengths measured: the fitted exponents of peak RSS, step memory and time
    (step s; sampling s for sampling) against completion length."""
    out = {}
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = sorted(ok_rows(rows, system), key=lambda r: r["length"])
        if len({r["length"] for r in mine}) < 2:
            continue
        xs = [r["length"] for r in mine]
        time_key = "sampling_s" if system == "opd_sampling" else "step_s"
        out[system] = {"memory": fit_exponent(xs, [r["peak_rss_mb"] for r in mine]),
                       "step_memory": fit_exponent(xs, [max(r["step_rise_mb"], 1.0) for r in mine]),
                       "time": fit_exponent(xs, [r[time_key] for r in mine]), "lengths": xs}
    return out


def loss_memory_mb(row: dict) -> float:
    """Step memory less the gradients' bytes: activations and loss buffers."""
    return row["step_rise_mb"] - row.get("grad_mb", 0.0)


def goals(results: dict) -> dict:
    """Each goal: what was measured, the target and whether it was met (None: not measured)."""
    out = {}
    both = {r["length"] for r in ok_rows(results["length"], "opd")} & {
        r["length"] for r in ok_rows(results["length"], "trl_distillation")}
    at = GOAL_LENGTH if GOAL_LENGTH in both else max(both, default=None)
    if at is not None:
        opd, trl = (next(r for r in ok_rows(results["length"], s) if r["length"] == at)
                    for s in ("opd", "trl_distillation"))
        memory, speed = opd["peak_rss_mb"] / trl["peak_rss_mb"], opd["tokens_per_s"] / trl["tokens_per_s"]
        out["memory_vs_trl"] = {"length": at, "value": memory, "target": MEMORY_GOAL, "met": memory <= MEMORY_GOAL}
        out["speed_vs_trl"] = {"length": at, "value": speed, "target": SPEEDUP_GOAL, "met": speed >= SPEEDUP_GOAL}
    vocab = sorted(ok_rows(results["vocab"], "opd"), key=lambda r: r["vocab"])
    if len(vocab) >= 2:
        ratio = loss_memory_mb(vocab[-1]) / max(loss_memory_mb(vocab[0]), 1.0)
        out["vocab_flat"] = {"vocabs": [r["vocab"] for r in vocab], "value": ratio, "target": VOCAB_FLAT_GOAL,
                             "met": ratio <= VOCAB_FLAT_GOAL}
    if "opd" in results.get("exponents", {}):
        b = results["exponents"]["opd"]["step_memory"]
        out["length_linear"] = {"value": b, "target": LENGTH_EXPONENT_GOAL, "met": b <= LENGTH_EXPONENT_GOAL}
    return out


def fmt(x, spec: str = ".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def one_line(row: dict) -> str:
    """A point's row in one line, for the progress log."""
    if row.get("failed"):
        return f"failed: {row['failed']}"
    seconds = row["step_s"] if row["step_s"] is not None else row["sampling_s"]
    return (f"{seconds:.2f} s, {row['tokens_per_s']:.1f} tokens/s, peak RSS {row['peak_rss_mb']:.0f} MB, step memory "
            f"{row['step_rise_mb']:.0f} MB, MFU {row['mfu']:.3f}")


STEP_HEADER = [("| system | {key} | step s | teacher s | student s | tokens/s | peak RSS MB | step memory MB | MFU "
               "| failed |"),
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]


def step_rows(rows: list[dict], key: str, fmt_key=str, label: str | None = None) -> list[str]:
    """Markdown rows of train-step points, keyed by `key` (length, vocab, params; its column named `label`)."""
    lines = [h.format(key=label or key) for h in STEP_HEADER]
    for r in rows:
        if r["system"] == "opd_sampling":
            continue
        if r.get("failed"):
            lines.append(f"| {SYSTEM_NAMES[r['system']]} | {fmt_key(r[key])} | | | | | | | | {r['failed']} |")
            continue
        lines.append(f"| {SYSTEM_NAMES[r['system']]} | {fmt_key(r[key])} | {r['step_s']:.2f} | {fmt(r['teacher_s'])} | "
                     f"{fmt(r['student_s'])} | {r['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['step_rise_mb']:.0f} | {r['mfu']:.3f} | |")
    return lines


def goal_rows(g: dict) -> list[str]:
    yes = {True: "met", False: "not met", None: "not measured"}
    lines = ["| goal | measured | met? |", "|---|---:|---|"]
    if "speed_vs_trl" in g:
        s, m = g["speed_vs_trl"], g["memory_vs_trl"]
        lines.append(f"| tokens/s ≥ {s['target']}× TRL's at {s['length']} tokens | {s['value']:.2f}× | "
                     f"{yes[s['met']]} |")
        lines.append(f"| peak memory ≤ {m['target']}× TRL's at {m['length']} tokens | {m['value']:.2f}× | "
                     f"{yes[m['met']]} |")
    if "vocab_flat" in g:
        v = g["vocab_flat"]
        lines.append(f"| step memory less gradients flat in vocabulary ({v['vocabs'][0]:,} → {v['vocabs'][-1]:,}), "
                     f"largest ÷ smallest ≤ {v['target']} | {v['value']:.2f}× | {yes[v['met']]} |")
    if "length_linear" in g:
        x = g["length_linear"]
        lines.append(f"| step memory at most linear in length, fitted exponent ≤ {x['target']} | {x['value']:.2f} | "
                     f"{yes[x['met']]} |")
    return lines


def markdown(results: dict) -> str:
    """The section of RESULTS.md: the goals, then each sweep's table, the exponents and the plots."""
    a, m = results["args"], results["machine"]
    prompt = next((r["prompt_tokens"] for r in results["length"] if "prompt_tokens" in r), "short")
    lines = ["## How cost grows: completion length, vocabulary, model size", ""]
    if results["quick"]:
        lines += ["*`--quick` run: tiny random models; the numbers mean nothing.*", ""]
    run = (f"`{results['command']}` — {m['cores']} cores, {a['threads']} torch threads, torch {m['torch']}, "
           f"transformers {m['transformers']}, TRL {m['trl']}; fp32 matmul peak {results['matmul_gflops']:.0f} "
           f"GFLOP/s at the start, {results['matmul_gflops_end']:.0f} at the end; load average "
           f"{m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at the end; wall "
           f"{results['wall_s'] / 60:.1f} min (estimated {results['estimate_s'] / 60:.0f}).")
    setup = (f"One train step on fixed completions (a {prompt}-token prompt, then random token ids, every "
             f"completion position graded), batch 1, reverse KL (TRL: β = 1), AdamW lr {a['lr']} constant, clip 1, "
             f"fp32; {a['warmup']} untimed step then {a['steps']} timed per point, each point a process of its own "
             f"under a {a['memory_cap_gib']:.0f} GiB cap. Definitions: `benchmarks/scale/report.py`.")
    left = [SYSTEM_NAMES[x] for x in STEP_SYSTEMS if x not in (*a["systems"], *a["arm_systems"])]
    arms = "; ".join(SYSTEM_NAMES[x] for x in a["arm_systems"])
    scope = (f"Run at {', '.join(map(str, a['arm_lengths']))} tokens only: {arms}. " if arms else "") + (
        f"Left out: {'; '.join(left)} (`ScaleArgs` in `benchmarks/scale/run.py` says why)." if left else "")
    lines += [run, "", setup, ""] + ([scope, ""] if scope else [])
    lines += goal_rows(results["goals"]) + [""]
    length = results["length"]
    if length:
        lines += [f"### Completion length ({length[0]['pair']})", ""]
        lines += step_rows(sorted(length, key=lambda r: (r["system"] != "opd", r["system"], r["length"])), "length")
        sampling = [r for r in length if r["system"] == "opd_sampling"]
        if sampling:
            lines += ["", ("Sampling alone (`opd.lm.hf.decode`, no end-of-sequence token, so every row runs the full "
                           "length; peak RSS holds the KV cache):"), "",
                      "| length | tokens/s | sampling s | peak RSS MB | failed |", "|---:|---:|---:|---:|---|"]
            lines += [f"| {r['length']} | {fmt(r.get('tokens_per_s'), '.1f')} | {fmt(r.get('sampling_s'))} | "
                      f"{fmt(r.get('peak_rss_mb'), '.0f')} | {r.get('failed') or ''} |" for r in sampling]
    if results.get("exponents"):
        lines += ["", "### How each grows with length: fitted exponent b of y ∝ length^b (log-log least squares)", "",
                  "| system | peak RSS | step memory | time | lengths |", "|---|---:|---:|---:|---|"]
        lines += [f"| {SYSTEM_NAMES[s]} | {e['memory']:.2f} | {e['step_memory']:.2f} | {e['time']:.2f} | "
                  f"{', '.join(map(str, e['lengths']))} |" for s, e in results["exponents"].items()]
    if results["vocab"]:
        lines += ["", f"### Vocabulary, at {a['vocab_length']} completion tokens", ""]
        lines += [f"- {v:,}: {d}" for v, d in dict.fromkeys((r["vocab"], r["pair"]) for r in results["vocab"])] + [""]
        lines += step_rows(sorted(results["vocab"], key=lambda r: (r["system"], r["vocab"])), "vocab",
                           lambda v: f"{v:,}")
    if results["model_size"]:
        lines += ["", f"### Model size, at {a['size_length']} completion tokens", ""]
        lines += [f"- {d}" for d in dict.fromkeys(r["pair"] for r in results["model_size"])] + [""]
        lines += step_rows(sorted(results["model_size"], key=lambda r: (r["system"], r["params"])), "params",
                           lambda p: f"{p / 1e6:.0f}M", label="student params")
    if not results["quick"]:
        lines += ["", "![memory and time against completion length](scale_length.png)",
                  "![memory and time against vocabulary](scale_vocab.png)"]
    return "\n".join(lines) + "\n"


def _loglog(ax, rows: list[dict], key: str, value: str, label_suffix: str = "") -> None:
    for system in dict.fromkeys(r["system"] for r in rows):
        pts = sorted((r[key], r[value]) for r in ok_rows(rows, system) if r.get(value))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=SYSTEM_NAMES[system] + label_suffix)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)


def plot_length(results: dict, path: Path) -> None:
    """Peak RSS and time against completion length, log-log, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = results["length"]
    _loglog(mem, rows, "length", "peak_rss_mb")
    _loglog(sec, [r for r in rows if r["system"] != "opd_sampling"], "length", "step_s")
    _loglog(sec, [r for r in rows if r["system"] == "opd_sampling"], "length", "sampling_s")
    mem.set(xlabel="completion tokens", ylabel="peak RSS (MB)", title="memory")
    sec.set(xlabel="completion tokens", ylabel="seconds (a train step; sampling alone)", title="time")
    sec.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_vocab(results: dict, path: Path) -> None:
    """Step memory and step time against vocabulary size, log-log, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(12, 4.5))
    _loglog(mem, results["vocab"], "vocab", "step_rise_mb")
    _loglog(sec, results["vocab"], "vocab", "step_s")
    mem.set(xlabel="vocabulary", ylabel="step memory (MB)", title="memory a step adds")
    sec.set(xlabel="vocabulary", ylabel="step seconds", title="time")
    sec.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
