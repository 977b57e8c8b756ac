"""`opd plot RUN [RUN ...] --out FILE.png`: the curves of one or more run directories, side by side.

Each run's `metrics.jsonl` (one JSON object per step) is drawn against `step`, one line per run labelled with its
directory's name, in one panel per metric that at least one run logged: loss, held-out accuracy (eval steps only),
completion tokens per step and step time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from opd.args import PlotArgs

PANELS = (
    ("loss", "loss"),
    ("accuracy", "held-out accuracy"),
    ("completion_tokens", "completion tokens per step"),
    ("step_s", "step time (s)"),
)
"""(metrics.jsonl key, panel title), in the order the panels are drawn."""


def read_metrics(run: str | Path) -> list[dict]:
    """The rows of `run`/metrics.jsonl (or of `run` itself, if it is the file); one line for a run with none."""
    path = Path(run)
    path = path if path.is_file() else path / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run} has no metrics.jsonl; pass a run directory that `opd train` wrote")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {n} is not JSON ({err.msg}); a run writes one JSON object per "
                             f"line") from None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no steps; plot a run that has finished at least one step")
    return rows


def plot_runs(runs: list[str] | tuple[str, ...], out: str | Path | None = None):
    """A matplotlib Figure with one panel per metric any run logged and one line per run; saved to `out` if given."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed, or opened, on a server
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("opd plot needs at least one run directory")
    metrics = {_label(run, runs): read_metrics(run) for run in runs}
    panels = [(key, title) for key, title in PANELS if any(_series(rows, key)[0] for rows in metrics.values())]
    if not panels:
        raise ValueError(f"none of {', '.join(map(str, runs))} logged any of {', '.join(k for k, _ in PANELS)}")
    cols = min(2, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 3.5 * rows_n), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for i, (label, rows) in enumerate(metrics.items()):
            steps, values = _series(rows, key)
            if steps:
                # A run keeps its colour in every panel, even where another run has no line. Accuracy has a point per
                # evaluation only: markers keep a run with one evaluation (or one step) visible.
                ax.plot(steps, values, label=label, color=f"C{i}",
                        marker="o" if key == "accuracy" or len(steps) == 1 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    for ax in axes.flat[len(panels):]:
        ax.remove()
    fig.tight_layout()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    plt.close(fig)  # pyplot would keep every figure alive; the caller still holds this one
    return fig


def plot_main(args: PlotArgs) -> None:
    """`opd plot`: save the figure, then say where."""
    plot_runs(args.runs, args.out)
    print(f"wrote {args.out}")


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if key == "accuracy":  # --eval-on-start's score is that of the weights before the step it is logged with
        points = sorted(points + [(r["step"] - 1, r["accuracy_at_start"]) for r in rows
                                  if isinstance(r.get("accuracy_at_start"), (int, float))])
    return [s for s, _ in points], [v for _, v in points]


def _label(run: str, runs) -> str:
    """The run's directory name; its whole path where two runs share a name (a/opd and b/opd)."""
    path = Path(run)
    path = path.parent if path.name == "metrics.jsonl" else path
    names = [(Path(r).parent if Path(r).name == "metrics.jsonl" else Path(r)).name for r in runs]
    return path.name if names.count(path.name) == 1 else str(path)
