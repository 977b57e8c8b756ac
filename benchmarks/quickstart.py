"""`opd bench quickstart`: the quickstart's comparison with its default settings, written to RESULTS.md.

On-policy distillation vs SFT on teacher samples at an equal number of student updates, from the same warm-started
student, 3 seeds; held-out accuracy on the arithmetic task. Writes benchmarks/results/quickstart.{json,md}.
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import replace
from typing import Annotated

import torch
import tyro

from benchmarks.common.results import RESULTS, write
from benchmarks.common.stats import sd
from opd.quickstart import METHODS, QuickstartArgs, format_table, quickstart


def main(args: Annotated[QuickstartArgs, tyro.conf.arg(name="")], quick: bool = False) -> dict:
    """Run the quickstart (a few-second plumbing version with --quick) and write its RESULTS.md section."""
    if quick:
        args = replace(args, seeds=(0,), steps=4, batch_size=4, warm_start_steps=4, eval_examples=10)
    results = quickstart(args)
    write("quickstart", results, section, quick, RESULTS)
    return results


def section(results: dict) -> str:
    """The RESULTS.md section for one quickstart run (its `results.json`)."""
    args = QuickstartArgs(**{k: tuple(v) if k == "seeds" else v for k, v in results["args"].items()})
    opd, sft = (results[m] for m in METHODS)
    gap = statistics.mean(opd) - statistics.mean(sft)
    spread = max(sd(opd), sd(sft))
    verdict = (
        f"On-policy distillation {'beats' if gap > 0 else 'does not beat'} SFT on teacher samples: the difference is "
        f"{gap:+.3f} accuracy (mean over seeds), and the larger of the two seed standard deviations is {spread:.3f}, "
        f"so the gap is {'larger' if abs(gap) > spread else 'not larger'} than the spread across seeds."
    )
    return "\n".join([
        "## Quickstart: on-policy distillation vs SFT on teacher samples",
        "",
        f"Command: `opd bench quickstart` (= `opd quickstart`: one warm-started student (SFT on ground truth, batch "
        f"64, stopped at 20 % training accuracy, at most {args.warm_start_steps} steps), then per seed {args.steps} updates of batch {args.batch_size} at lr "
        f"{args.lr} for each method; accuracy is greedy on {args.eval_examples} held-out problems; seeds "
        f"{list(args.seeds)}). {args.threads} torch thread(s), {platform.machine()} CPU, "
        f"{results['wall_seconds']:.0f} s wall time.",
        "",
        format_table(results),
        "",
        verdict,
        "",
    ])


if __name__ == "__main__":
    tyro.cli(main)
