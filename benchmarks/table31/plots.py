"""The Table 3.1 benchmark's plots: accuracy against FLOPs and wall time, the capacity sweep, the teacher-bias bars."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _reference_lines(ax, results: dict, start: bool = True) -> None:
    ax.axhline(results["teacher_accuracy"], color="black", ls="--", lw=1, label="teacher")
    ax.axhline(results["target_accuracy"], color="grey", ls="-.", lw=1, label="target")
    if start and "student_start_accuracy" in results:
        ax.axhline(results["student_start_accuracy"], color="grey", ls=":", lw=1, label="student start")


def plot_methods(results: dict, path: Path) -> None:
    """Held-out accuracy against cumulative training FLOPs (log scale) and wall time, one curve per method, the band
    spanning the seeds' minimum to maximum. Wall time is updates × the back-to-back seconds per update: the runs'
    own clocks ran beside each other (and beside whatever else the machine did), which says little about a method."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for key, s in results["methods"].items():
        c = dict(s["curve"], wall=[step * s["seconds_per_update"] for step in s["curve"]["step"]])
        for ax, x in zip(axes, ("flops", "wall")):
            # the warm start sits at x = 0, which a log axis cannot show: it is the dotted line instead
            xs = c[x][1:] if x == "flops" else c[x]
            lo = c["accuracy_min"][1:] if x == "flops" else c["accuracy_min"]
            hi = c["accuracy_max"][1:] if x == "flops" else c["accuracy_max"]
            ys = c["accuracy"][1:] if x == "flops" else c["accuracy"]
            (line,) = ax.plot(xs, ys, marker="o", ms=3, label=s["label"])
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    for ax in axes:
        _reference_lines(ax, results)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].set_ylim(0, 1.03)
    axes[0].set_xlabel("training FLOPs (student sampling + teacher generation/scoring + updates)")
    axes[1].set_xlabel("training wall time, s (updates × seconds per update timed back to back)")
    axes[0].set_ylabel("held-out accuracy")
    axes[1].legend(fontsize=8, loc="lower right")
    n = len(results["seeds"])
    fig.suptitle(f"Table 3.1 as an experiment: mean of {n} seeds, band = min-max over seeds"
                 + (" (--quick: meaningless numbers)" if results["args"]["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_capacity(results: dict, path: Path) -> None:
    """Accuracy and per-token reverse KL against student parameters, before and after on-policy distillation."""
    rows = results["capacity"]["sizes"]
    params = [r["params"] for r in rows]
    fig, (acc, kl) = plt.subplots(1, 2, figsize=(11, 4.5))
    acc.plot(params, [r["start_accuracy"] for r in rows], "o:", label="warm start")
    acc.plot(params, [r["final_accuracy"] for r in rows], "o-", label="after on-policy distillation")
    _reference_lines(acc, results, start=False)
    kl.plot(params, [r["reverse_kl_before"] for r in rows], "o:", label="warm start")
    kl.plot(params, [r["reverse_kl_after"] for r in rows], "o-", label="after on-policy distillation")
    for r in rows:
        acc.annotate(r["size"], (r["params"], r["final_accuracy"]), textcoords="offset points", xytext=(4, -10))
    for ax, ylabel in ((acc, "held-out accuracy"), (kl, "reverse KL per token (nats)")):
        ax.set_xscale("log")
        ax.set_xlabel(f"student parameters (teacher: {results['teacher_params']:,})")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Capacity: students of four sizes distilled from the same teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bias(results: dict, path: Path) -> None:
    """Whose answer each model gives on the problems the planted error affects: stacked horizontal bars."""
    b = results["bias"]
    rows = {"clean teacher": b["clean_teacher"], "biased teacher": b["biased_teacher"], **b["students"]}
    names = list(rows)[::-1]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(names) + 1.5))
    left = [0.0] * len(names)
    for key, label, color in (("truth", "true answer", "tab:green"), ("teacher", "biased teacher's answer", "tab:red"),
                              ("neither", "neither", "lightgrey")):
        widths = [rows[n][key] for n in names]
        ax.barh(names, widths, left=left, color=color, label=label)
        left = [a + w for a, w in zip(left, widths)]
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of affected held-out problems")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(textwrap.fill(f"Teacher bias: {b['rule']}", 70), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
