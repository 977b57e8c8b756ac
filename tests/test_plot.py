"""`opd plot`: runs' metrics.jsonl drawn as one panel per metric and one line per run, and its one-line errors."""

import json

import matplotlib.image
import pytest

from opd.cli import main
from opd.plot import plot_runs


def write_run(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def runs(tmp_path):
    opd = write_run(tmp_path / "opd", [
        {"step": 1, "loss": 2.0, "completion_tokens": 10, "step_s": 0.5, "reverse_kl": 1.0, "accuracy_at_start": 0.1},
        {"step": 2, "loss": 1.5, "completion_tokens": 12, "step_s": 0.4, "accuracy": 0.25},
        {"step": 3, "loss": 1.0, "completion_tokens": 9, "step_s": 0.4},
    ])
    # An SFT-like run with no completion tokens logged and no evaluation.
    sft = write_run(tmp_path / "sft", [{"step": 1, "loss": 3.0, "step_s": 0.7}, {"step": 2, "loss": 2.5, "step_s": 0.6}])
    return opd, sft


def lines(ax) -> dict:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_one_panel_per_metric_and_one_line_per_run(runs):
    fig = plot_runs(runs)
    panels = {ax.get_title(): lines(ax) for ax in fig.axes}
    assert list(panels) == ["loss", "held-out accuracy", "completion tokens per step", "step time (s)"]
    assert panels["loss"] == {"opd": ([1, 2, 3], [2.0, 1.5, 1.0]), "sft": ([1, 2], [3.0, 2.5])}
    assert panels["held-out accuracy"] == {"opd": ([0, 2], [0.1, 0.25])}  # eval steps only; --eval-on-start at 0
    assert panels["completion tokens per step"] == {"opd": ([1, 2, 3], [10, 12, 9])}
    assert set(panels["step time (s)"]) == {"opd", "sft"}
    # A panel that no run has is left out.
    fig = plot_runs(runs[1:])
    assert [ax.get_title() for ax in fig.axes] == ["loss", "step time (s)"]


def test_the_command_writes_a_png(runs, tmp_path, capsys):
    out = tmp_path / "figs" / "compare.png"
    main(["plot", *runs, "--out", str(out)])
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something was drawn
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_a_run_without_metrics_is_a_one_line_error(runs, tmp_path, capsys, content):
    bad = tmp_path / "bad"
    bad.mkdir()
    if content is not None:
        (bad / "metrics.jsonl").write_text(content)
    with pytest.raises(SystemExit) as info:
        main(["plot", runs[0], str(bad), "--out", str(tmp_path / "x.png")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad) in err, err
    assert not (tmp_path / "x.png").exists()
