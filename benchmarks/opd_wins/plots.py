"""The `opd bench opd_wins` plots: each regime's test-accuracy curves, and the paired gap OPD − SFT."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"opd": "tab:blue", "sft": "tab:orange"}


def plot_curves(results: dict, path: Path) -> None:
    """One panel per regime: test accuracy against updates, the seed mean as a line and each seed as a thin one."""
    regimes = results["regimes"]
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 4.5), squeeze=False)
    for ax, (name, entry) in zip(axes[0], regimes.items()):
        for key, m in entry["methods"].items():
            c = m["curve"]
            ax.plot(c["step"], c["accuracy"], marker="o", ms=3, color=COLORS[key], label=m["label"])
            for seed_curve in c["accuracy_seeds"]:
                ax.plot(c["step"], seed_curve, color=COLORS[key], lw=0.6, alpha=0.35)
        ax.set_title(f"{name}: {entry['description']}", fontsize=8)
        ax.set_xlabel("updates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("held-out accuracy (greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gaps(results: dict, path: Path) -> None:
    """The long runs' paired gap OPD − SFT at every evaluation (mean ± sd over seeds), with each regime's final gap
    and seed spread as points on the right."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    g = results["regimes"]["long"]["gap_curve"]
    ax.errorbar(g["step"], g["gap_mean"], yerr=g["gap_std"], marker="o", ms=3, capsize=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="updates", ylabel="accuracy gap OPD − SFT (paired by seed)", title="long runs")
    ax.grid(alpha=0.3)
    names = list(results["regimes"])
    for i, name in enumerate(names):
        e = results["regimes"][name]
        bx.errorbar([i], [e["gap_mean"]], yerr=[e["seed_spread"]], marker="o", capsize=4)
        bx.scatter([i] * len(e["gap_seeds"]), e["gap_seeds"], color="grey", s=10, zorder=3)
    bx.axhline(0, color="black", lw=0.8)
    bx.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    bx.set(title="final gap (bar: seed spread; dots: seeds)")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
