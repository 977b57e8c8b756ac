"""Turning the Table 3.1 runs into numbers, a markdown section and plots (see `benchmarks.table31`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from opd.flops import FLOP_KINDS

FLOPS_FORMULA = (
    "forward FLOPs per token = 2·N + 4·n_layer·d_attn·c (+ 2·V·D at positions whose next-token distribution is "
    "used); N = decoder weight matrices except embedding lookups, c = tokens attended (causal); "
    "forward+backward = 3 × forward; real tokens only (padding excluded); sampling with a KV cache = one forward "
    "over prompt + completion. "
    "Excluded: softmax/norms/activations, the optimiser step, evaluation. See opd/flops.py."
)
KIND_LABELS = {"flops_sample": "student sampling", "flops_teacher_generate": "teacher generation",
               "flops_teacher_score": "teacher scoring", "flops_update": "student updates"}


def finished(run_dir: Path, config: dict, steps: int) -> bool:
    """Whether `run_dir` holds a run of exactly `config` (progress bars aside) that reached `steps`."""
    cfg_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    if not (cfg_path.is_file() and metrics_path.is_file() and (run_dir / "checkpoint").is_dir()):
        return False
    lines = metrics_path.read_text().splitlines()
    saved = json.loads(cfg_path.read_text())
    same = {k: v for k, v in saved.items() if k != "progress"} == {k: v for k, v in config.items() if k != "progress"}
    return same and bool(lines) and json.loads(lines[-1])["step"] == steps


def read_curve(run_dir: Path, start_accuracy: float) -> dict:
    """A run's evaluations as lists (step, cumulative FLOPs, cumulative training wall time, accuracy), starting at
    step 0 with `start_accuracy`, plus its totals. Wall time sums `step_s`, so evaluation time is left out."""
    curve = {"step": [0], "flops": [0.0], "wall_seconds": [0.0], "accuracy": [start_accuracy]}
    wall = 0.0
    totals = dict.fromkeys(FLOP_KINDS, 0.0)
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    if not lines:
        raise ValueError(f"{run_dir}/metrics.jsonl is empty; run it again")
    for m in lines:
        wall += m["step_s"]
        for kind in FLOP_KINDS:
            totals[kind] += m[kind]
        if "accuracy" in m:
            for key, value in (("step", m["step"]), ("flops", m["total_flops"]), ("wall_seconds", wall),
                               ("accuracy", m["accuracy"])):
                curve[key].append(value)
    return curve | {"total_flops": lines[-1]["total_flops"], "wall_seconds_total": wall, "flops_by_kind": totals,
                    "steps": lines[-1]["step"]}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _first_reaching(xs: list[float], accuracies: list[float], target: float) -> float | None:
    return next((x for x, a in zip(xs, accuracies) if a >= target), None)


def summarise_method(curves: list[dict], target: float) -> dict:
    """One method over seeds: final accuracy, compute to the target (on the seed-mean curve), totals, the curve."""
    steps = curves[0]["step"]
    if any(c["step"] != steps for c in curves):
        raise ValueError("the seeds of a method were evaluated at different steps; rerun them with the same settings")
    keys = ("flops", "wall_seconds", "accuracy")
    columns = {key: [[c[key][i] for c in curves] for i in range(len(steps))] for key in keys}
    mean_curve = {key: [_mean(col) for col in cols] for key, cols in columns.items()}
    final = [c["accuracy"][-1] for c in curves]
    return {
        "final_accuracy": _mean(final),
        "final_accuracy_std": statistics.stdev(final) if len(final) > 1 else 0.0,
        "final_accuracy_seeds": final,
        "flops_to_target": _first_reaching(mean_curve["flops"], mean_curve["accuracy"], target),
        "flops_to_target_seeds": [_first_reaching(c["flops"], c["accuracy"], target) for c in curves],
        "wall_seconds_to_target": _first_reaching(mean_curve["wall_seconds"], mean_curve["accuracy"], target),
        "total_flops": _mean([c["total_flops"] for c in curves]),
        "flops_by_kind": {k: _mean([c["flops_by_kind"][k] for c in curves]) for k in FLOP_KINDS},
        "wall_seconds": _mean([c["wall_seconds_total"] for c in curves]),
        "steps": curves[0]["steps"],
        "curve": {"step": steps, **mean_curve, "accuracy_min": [min(col) for col in columns["accuracy"]],
                  "accuracy_max": [max(col) for col in columns["accuracy"]],
                  "accuracy_seeds": [c["accuracy"] for c in curves]},
    }


def mean_of_dicts(rows: list[dict]) -> dict:
    """Key-wise mean of dicts of numbers."""
    return {k: _mean([r[k] for r in rows]) for k in rows[0]}


def _sci(x: float | None) -> str:
    return "never" if x is None else f"{x:.2e}"


def markdown(results: dict) -> str:
    """The RESULTS.md section: tables of every part that ran, and what the numbers say."""
    args = results["args"]
    out = ["## Table 3.1 as an experiment: SFT vs RL vs on-policy distillation, accuracy against compute", ""]
    if args["quick"]:
        out += ["**--quick run: tiny step counts, the numbers below mean nothing.**", ""]
    out += [f"Teacher: {results['teacher_params']:,} parameters, held-out accuracy {results['teacher_accuracy']:.3f} "
            f"({results['eval_examples']} problems). Target accuracy {results['target_accuracy']:.3f} "
            f"({results['target_definition']}). Command: `{results['command']}`; {results['wall_seconds_total']:.0f} s "
            f"wall in all, {args['threads']} torch thread(s)."]
    if "methods" in results:
        m = results["methods"]
        out += ["", f"Student start (warm start, {args['warm_start_steps']} SFT steps on ground truth): "
                f"{results['student_start_accuracy']:.3f} (seeds "
                f"{', '.join(f'{a:.3f}' for a in results['student_start_accuracy_seeds'])}). "
                f"Student: size {results['student_size']}, {results['student_params']:,} parameters. Every method: "
                f"batch {args['batch_size']} sequences, {len(results['seeds'])} seeds, lr {args['lr']:g} (RL "
                f"{args['rl_lr']:g}); RL: {args['batch_size'] // args['group_size']} prompts × {args['group_size']} "
                f"samples, group-normalised 0/1 reward.", "",
                "| method | updates | final accuracy (mean ± sd) | per seed | FLOPs to target | total FLOPs | "
                "FLOPs / update | training wall s |", "|---|---|---|---|---|---|---|---|"]
        for s in m.values():
            out.append(f"| {s['label']} | {s['steps']} | {s['final_accuracy']:.3f} ± {s['final_accuracy_std']:.3f} | "
                       f"{', '.join(f'{a:.3f}' for a in s['final_accuracy_seeds'])} | {_sci(s['flops_to_target'])} | "
                       f"{s['total_flops']:.2e} | {s['total_flops'] / s['steps']:.2e} | {s['wall_seconds']:.0f} |")
        out += ["", "Where the FLOPs went (mean per run):", "",
                "| method | " + " | ".join(KIND_LABELS.values()) + " |", "|---" * (len(KIND_LABELS) + 1) + "|"]
        for s in m.values():
            out.append(f"| {s['label']} | " + " | ".join(f"{s['flops_by_kind'][k]:.2e}" for k in KIND_LABELS) + " |")
        out += ["", "![accuracy vs FLOPs](benchmarks/results/table31.png)"]
    if "capacity" in results:
        c = results["capacity"]
        out += ["", f"### Capacity sweep (on-policy distillation, full reverse KL, {c['steps']} updates, "
                f"seeds {c['seeds']})", "",
                "| student | parameters | accuracy before | accuracy after | reverse KL / token before | after |",
                "|---|---|---|---|---|---|"]
        for r in c["sizes"]:
            out.append(f"| {r['size']} | {r['params']:,} | {r['start_accuracy']:.3f} | {r['final_accuracy']:.3f} | "
                       f"{r['reverse_kl_before']:.3f} | {r['reverse_kl_after']:.3f} |")
        out += ["", "Reverse KL: mean over the student's own sampled completion tokens of KL(student ‖ teacher), "
                "full vocabulary, on the held-out prompts.", "", "![capacity](benchmarks/results/capacity.png)"]
    if "bias" in results:
        b = results["bias"]
        out += ["", "### Teacher bias", "", f"Planted error: {b['rule']}. It changes the answer of "
                f"{b['affected_share']:.0%} of problems; measured on {b['biased_teacher']['n']} affected held-out "
                f"problems (answers) and as many unaffected ones (accuracy); students: mean of seeds {b['seeds']}, "
                f"{args['steps']} updates each.", "",
                "| model | answer = truth | answer = biased teacher's | neither | accuracy, unaffected problems |",
                "|---|---|---|---|---|"]
        rows = {"clean teacher": b["clean_teacher"], "biased teacher": b["biased_teacher"], **b["students"]}
        for name, r in rows.items():
            out.append(f"| {name} | {r['truth']:.3f} | {r['teacher']:.3f} | {r['neither']:.3f} | "
                       f"{r['unaffected_accuracy']:.3f} |")
        out += ["", "![teacher bias](benchmarks/results/bias.png)"]
    return "\n".join(out) + "\n"


def write_all(results: dict, results_dir: Path, reading: Path | None = None) -> None:
    """table31.json, table31.md (with the hand-written reading appended if `reading` exists) and the plots."""
    from benchmarks import table31_plots as plots

    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "table31.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    if reading is not None and reading.is_file():
        text += "\n" + reading.read_text()
    (results_dir / "table31.md").write_text(text)
    if "methods" in results:
        plots.plot_methods(results, results_dir / "table31.png")
    if "capacity" in results:
        plots.plot_capacity(results, results_dir / "capacity.png")
    if "bias" in results:
        plots.plot_bias(results, results_dir / "bias.png")
