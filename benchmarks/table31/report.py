"""Turning the Table 3.1 runs into numbers, a markdown section and plots (see `run.py`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.common.results import quick_banner
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


def add_rl_level(methods: dict) -> float:
    """Give every method the FLOPs its seed-mean curve needs to reach RL's final accuracy (`flops_to_rl_accuracy`,
    None if never) and RL's total FLOPs over that (`rl_flops_ratio`): the seed's "RL-level accuracy at a fraction
    of RL's compute". Returns that accuracy level."""
    level = methods["rl"]["final_accuracy"]
    for s in methods.values():
        s["flops_to_rl_accuracy"] = _first_reaching(s["curve"]["flops"], s["curve"]["accuracy"], level)
        reached = s["flops_to_rl_accuracy"]
        s["rl_flops_ratio"] = methods["rl"]["total_flops"] / reached if reached else None
    return level


def mean_of_dicts(rows: list[dict]) -> dict:
    """Key-wise mean of dicts of numbers."""
    return {k: _mean([r[k] for r in rows]) for k in rows[0]}


def _sci(x: float | None) -> str:
    return "never" if x is None else f"{x:.2e}"


def _seconds(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def markdown(results: dict) -> str:
    """The RESULTS.md section: tables of every part that ran, and what the numbers say."""
    args = results["args"]
    names = output_names(args["quick"])
    out = ["## Table 3.1 as an experiment: SFT vs RL vs on-policy distillation, accuracy against compute", ""]
    out += quick_banner(args["quick"])
    out += [f"Teacher: {results['teacher_params']:,} parameters, held-out accuracy {results['teacher_accuracy']:.3f} "
            f"({results['eval_examples']} problems). Target accuracy {results['target_accuracy']:.3f} "
            f"({results['target_definition']}). Command: `{results['command']}`; {results['wall_seconds_total']:.0f} s "
            f"wall for this invocation ({results['runs_reused']} of {results['runs_total']} runs found finished in "
            f"the run directory and reused), {args['workers']} worker process(es) of {args['threads']} torch "
            "thread(s)."]
    if "methods" in results:
        m = results["methods"]
        out += ["", "Student start (warm start: SFT on ground truth until it solves 20 % of training problems, "
                f"`opd.lm.recipes.supervised.warm_start_student`, step cap {args['warm_start_steps'] or 'default'}): "
                f"{results['student_start_accuracy']:.3f} (seeds "
                f"{', '.join(f'{a:.3f}' for a in results['student_start_accuracy_seeds'])}). "
                f"Student: size {results['student_size']}, {results['student_params']:,} parameters. Every method: "
                f"batch {args['batch_size']} sequences, {len(results['seeds'])} seeds, lr {args['lr']:g} (RL "
                f"{args['rl_lr']:g}); RL: {args['batch_size'] // args['group_size']} prompts × {args['group_size']} "
                f"samples, group-normalised 0/1 reward.", "",
                "| method | updates | final accuracy (mean ± sd) | per seed | FLOPs to target | FLOPs to RL's final "
                f"accuracy ({results['rl_accuracy_level']:.3f}) | total FLOPs | FLOPs / update | s / update |",
                "|---|---|---|---|---|---|---|---|---|"]
        for s in m.values():
            ratio = ""
            if s["rl_flops_ratio"] and s is not m["rl"]:
                # reached at the first evaluation: the true crossing may be earlier, the ratio larger
                at_least = "≥ " if s["flops_to_rl_accuracy"] == s["curve"]["flops"][1] else ""
                ratio = f" ({at_least}{s['rl_flops_ratio']:.1f}× less than RL)"
            out.append(f"| {s['label']} | {s['steps']} | {s['final_accuracy']:.3f} ± {s['final_accuracy_std']:.3f} | "
                       f"{', '.join(f'{a:.3f}' for a in s['final_accuracy_seeds'])} | {_sci(s['flops_to_target'])} | "
                       f"{_sci(s['flops_to_rl_accuracy'])}{ratio} | {s['total_flops']:.2e} | "
                       f"{s['total_flops'] / s['steps']:.2e} | {_seconds(s.get('seconds_per_update'))} |")
        out += ["", "FLOPs to a level: on the seed-mean curve, at the first evaluation at or above it. s / update: "
                "wall seconds per update timed back to back in one process after the runs "
                f"({args['timing_steps']} updates each, seed {results['seeds'][0]}'s warm start); the runs themselves "
                "shared the machine, so their own step times (`wall_seconds` in the JSON) are noisier."]
        out += ["", "Where the FLOPs went (mean per run):", "",
                "| method | " + " | ".join(KIND_LABELS.values()) + " |", "|---" * (len(KIND_LABELS) + 1) + "|"]
        for s in m.values():
            out.append(f"| {s['label']} | " + " | ".join(f"{s['flops_by_kind'][k]:.2e}" for k in KIND_LABELS) + " |")
        out += ["", f"![accuracy vs FLOPs](benchmarks/results/{names['methods']})"]
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
                "full vocabulary, on the held-out prompts.", "", f"![capacity](benchmarks/results/{names['capacity']})"]
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
        out += ["", f"![teacher bias](benchmarks/results/{names['bias']})"]
    return "\n".join(out) + "\n"


def output_names(quick: bool) -> dict[str, str]:
    """File names of the outputs; a --quick run gets its own (`*_quick.*`) so it never overwrites the real ones."""
    suffix = "_quick" if quick else ""
    return {"json": f"table31{suffix}.json", "md": f"table31{suffix}.md", "methods": f"table31{suffix}.png",
            "capacity": f"capacity{suffix}.png", "bias": f"bias{suffix}.png"}


def write_all(results: dict, results_dir: Path) -> None:
    """The JSON, the markdown section and the plots, under the names `output_names` gives."""
    from benchmarks.table31 import plots

    names = output_names(results["args"]["quick"])
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / names["json"]).write_text(json.dumps(results, indent=2) + "\n")
    (results_dir / names["md"]).write_text(markdown(results))
    if "methods" in results:
        plots.plot_methods(results, results_dir / names["methods"])
    if "capacity" in results:
        plots.plot_capacity(results, results_dir / names["capacity"])
    if "bias" in results:
        plots.plot_bias(results, results_dir / names["bias"])
