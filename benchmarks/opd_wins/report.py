"""Turning the `opd bench opd_wins` runs into per-regime numbers, a markdown section and plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from benchmarks.common.results import quick_banner
from benchmarks.common.stats import sd
from benchmarks.opd_wins import runs
from opd.lm.eval import accuracy
from opd.lm.hf.model import load_model, load_tokenizer
from opd.tasks import get_task


def output_names(quick: bool) -> dict[str, str]:
    """File names of the outputs; a --quick run gets its own (`*_quick.*`) so it never overwrites the real ones."""
    suffix = "_quick" if quick else ""
    return {"json": f"opd_wins{suffix}.json", "md": f"opd_wins{suffix}.md", "curves": f"opd_wins{suffix}.png",
            "gaps": f"opd_wins_gaps{suffix}.png"}


def compare(description: str, step: int, arms: dict[str, dict]) -> dict:
    """A regime's entry: each arm's accuracy at `step` per seed (arms "opd" and "sft", each {"label", "curves"}), the
    paired gap OPD − SFT per seed, its mean and sd, and the seed spread (the larger of the two arms' sds)."""
    methods = {}
    for key, arm in arms.items():
        seeds = [runs.accuracy_at(c, step) for c in arm["curves"]]
        methods[key] = {"label": arm["label"], "final_accuracy_seeds": seeds, "final_accuracy": statistics.mean(seeds),
                        "final_accuracy_std": sd(seeds), "curve": _curve(arm["curves"], step)}
    gaps = [o - s for o, s in zip(methods["opd"]["final_accuracy_seeds"], methods["sft"]["final_accuracy_seeds"])]
    spread = max(methods["opd"]["final_accuracy_std"], methods["sft"]["final_accuracy_std"])
    gap = statistics.mean(gaps)
    return {"description": description, "step": step, "methods": methods, "gap_seeds": gaps, "gap_mean": gap,
            "gap_std": sd(gaps), "seed_spread": spread, "opd_wins_beyond_spread": gap > spread,
            "sft_wins_beyond_spread": -gap > spread}


def _curve(curves: list[dict], until: int) -> dict:
    """The seeds' curves side by side (test and validation accuracy at every evaluation up to step `until`) and
    their mean (a run read for a shorter regime is cut at that regime's step)."""
    if any(c["step"] != curves[0]["step"] for c in curves):
        raise ValueError("the seeds of an arm were evaluated at different steps; rerun them with the same settings")
    n = sum(s <= until for s in curves[0]["step"])
    curves = [{k: c[k][:n] for k in ("step", "accuracy", "val_accuracy", "flops")} | {
        "seconds_per_update": c["seconds_per_update"]} for c in curves]
    steps = curves[0]["step"]
    seeds = [c["accuracy"] for c in curves]
    return {"step": steps, "accuracy": [statistics.mean(col) for col in zip(*seeds)], "accuracy_seeds": seeds,
            "val_accuracy_seeds": [c["val_accuracy"] for c in curves],
            "flops": [statistics.mean(col) for col in zip(*[c["flops"] for c in curves])],
            "seconds_per_update": statistics.mean(c["seconds_per_update"] for c in curves)}


def start_accuracies(args, student_dir: Path, task_name: str = "arithmetic",
                     max_new_tokens: int | None = None) -> tuple[float, float]:
    """A warm start's test and validation accuracy on `task_name` (the point every curve from it begins at)."""
    task, max_new_tokens = get_task(task_name), max_new_tokens or args.max_new_tokens
    student, tokenizer = load_model(str(student_dir)), load_tokenizer(str(student_dir))
    test = task.examples(args.eval_examples, seed=0, split="test")  # what distill evaluates on (opd.lm.data.prompts)
    val = runs.validation_examples(args.val_examples, 5000, task_name)
    return (accuracy(student, tokenizer, task, test, max_new_tokens=max_new_tokens),
            accuracy(student, tokenizer, task, val, max_new_tokens=max_new_tokens))


def sweep_choice(args, paths: dict) -> dict[str, tuple[float, float]]:
    """method -> (learning rate, temperature) with the best validation accuracy at `sweep_steps` (ties: the first
    point in `sweep_points` order); the default setting's numbers come from the sweep seed's long run."""
    return {m: max(rows, key=lambda r: r["val_accuracy"])["setting"] for m, rows in _sweep(args, paths).items()}


def _sweep(args, paths: dict) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for method, lr, temperature in runs.sweep_points(args):
        run_dir = paths["runs"] / "long" / f"seed-{args.sweep_seed}" / method if (lr, temperature) == (
            args.lr, 1.0) else paths["runs"] / "sweep" / runs.point_name(method, lr, temperature)
        curve = runs.read_run(run_dir, math.nan, math.nan)
        rows.setdefault(method, []).append({"setting": (lr, temperature), "lr": lr, "temperature": temperature,
                                            "val_accuracy": runs.accuracy_at(curve, args.sweep_steps, "val_accuracy")})
    return rows


def summarise(args, paths: dict, chosen: dict | None) -> dict:
    """Every regime that ran, as `compare` entries, plus the teachers' recovery probe and the sweep."""
    start, start_val = start_accuracies(args, paths["warm"])
    label = {k: v["label"] for k, v in runs.METHODS.items()}

    def curves(sub: str, name: str, **kw) -> list[dict]:
        return [runs.read_run(paths["runs"] / sub / f"seed-{seed}" / name, kw.get("acc", [start] * 99)[i],
                              kw.get("val", [start_val] * 99)[i], kw.get("start_step", 0))
                for i, seed in enumerate(args.seeds)]

    long = {m: curves("long", m) for m in runs.METHODS}
    results = {"student_start_accuracy": start, "student_start_val_accuracy": start_val, "seeds": list(args.seeds),
               "eval_examples": args.eval_examples,
               "binomial_se_at_0.6": math.sqrt(0.6 * 0.4 / args.eval_examples), "regimes": {}}
    regimes = results["regimes"]
    regimes["long"] = compare(f"both methods {args.steps} updates from the warm start", args.steps,
                              {m: {"label": label[m], "curves": long[m]} for m in runs.METHODS})
    regimes["long"]["gap_curve"] = _gap_curve(long)
    if "plateau" in args.parts:
        branch = args.steps if args.plateau_at is None else args.plateau_at
        at = [runs.accuracy_at(c, branch) for c in long["sft"]]
        val = [runs.accuracy_at(c, branch, "val_accuracy") for c in long["sft"]]
        arms = {m: {"label": f"SFT {branch}, then {args.extra_steps} of {label[m]}",
                    "curves": curves("plateau", f"sft-then-{m}", acc=at, val=val, start_step=branch)}
                for m in runs.METHODS}
        regimes["plateau"] = compare(f"from SFT's checkpoint at {branch} updates, {args.extra_steps} more of each",
                                     branch + args.extra_steps, arms)
        # the same number of updates without a switch: OPD all the way, from the long runs
        regimes["plateau"]["opd_only_same_step"] = {
            "seeds": [runs.accuracy_at(c, branch + args.extra_steps) for c in long["opd"]]
            if branch + args.extra_steps <= args.steps else None}
    if "recovery" in args.parts:
        arms = {m: {"label": f"{label[m]}, recovery teacher", "curves": curves("recovery", m)} for m in runs.METHODS}
        regimes["recovery"] = compare(f"under the noisy-prefix (recovery) teacher, {args.recovery_steps} updates",
                                      args.recovery_steps, arms)
        regimes["recovery"]["clean_teacher_same_step"] = compare(
            "reference: under the clean teacher (the long runs) at the same step", args.recovery_steps,
            {m: {"label": label[m], "curves": long[m]} for m in runs.METHODS})
        teacher_info = json.loads((Path(paths["recovery_teacher"]) / "info.json").read_text())
        results["recovery_probe"] = runs.probe_teachers(
            {"clean teacher": paths["teacher"], "recovery teacher": paths["recovery_teacher"]}, paths["warm"],
            args.probe_examples, args.max_new_tokens) | {"recovery_teacher_training": teacher_info}
    else:
        results["recovery_probe"] = runs.probe_teachers({"clean teacher": paths["teacher"]}, paths["warm"],
                                                        args.probe_examples, args.max_new_tokens)
    _check_sft_source(args, results["recovery_probe"]["clean teacher"])
    if chosen is not None:
        points = _sweep(args, paths)
        results["sweep"] = {"steps": args.sweep_steps, "seed": args.sweep_seed, "runs": sum(map(len, points.values())),
                            "points": points, "chosen": chosen}
    if "tuned" in args.parts:
        arms = {}
        for m, (lr, t) in chosen.items():
            sub = ("long", m) if (lr, t) == (args.lr, 1.0) else ("tuned", runs.point_name(m, lr, t))
            arms[m] = {"label": f"{label[m]}, lr {lr:g}, T {t:g}", "curves": curves(*sub)}
        regimes["tuned"] = compare(f"each method at its validation-chosen setting, {args.tuned_steps} updates",
                                   args.tuned_steps, arms)
    return results


def _check_sft_source(args, clean_teacher: dict) -> None:
    """SFT on the true solutions stands for SFT on the task teacher's samples only where its samples are them."""
    match = clean_teacher["sample_is_true_solution"]
    if args.sft_source == "data" and match < args.min_sample_match:
        raise ValueError(f"only {match:.3f} of the teacher's samples are the true solutions, so SFT on the data does "
                         f"not stand for SFT on its samples: rerun with --sft-source teacher")


def _gap_curve(long: dict) -> dict:
    """The paired gap OPD − SFT (mean and sd over seeds) at every evaluation of the long runs."""
    steps = long["opd"][0]["step"]
    gaps = [[o["accuracy"][i] - s["accuracy"][i] for o, s in zip(long["opd"], long["sft"])] for i in range(len(steps))]
    return {"step": steps, "gap_mean": [statistics.mean(g) for g in gaps], "gap_std": [sd(g) for g in gaps]}


def _row(entry: dict, name: str) -> str:
    o, s = entry["methods"]["opd"], entry["methods"]["sft"]
    verdict = "OPD" if entry["opd_wins_beyond_spread"] else "SFT" if entry["sft_wins_beyond_spread"] else "neither"

    def cell(m):
        seeds = ", ".join(f"{a:.3f}" for a in m["final_accuracy_seeds"])
        return f"{m['final_accuracy']:.3f} ± {m['final_accuracy_std']:.3f} ({seeds})"

    return (f"| {name} | {entry['step']} | {cell(o)} | {cell(s)} | {entry['gap_mean']:+.3f} "
            f"({', '.join(f'{g:+.3f}' for g in entry['gap_seeds'])}) | {entry['seed_spread']:.3f} | {verdict} |")


def markdown(results: dict) -> str:
    """The RESULTS.md section."""
    args, names = results["args"], output_names(results["args"]["quick"])
    out = ["## Where on-policy distillation wins: OPD vs SFT on teacher samples, regime by regime", ""]
    out += quick_banner(args["quick"])
    out += [f"Quickstart setting: one warm start (test accuracy {results['student_start_accuracy']:.3f}), batch "
            f"{args['batch_size']}, lr {args['lr']:g}, seeds {results['seeds']}; test accuracy on "
            f"{results['eval_examples']} held-out problems (binomial standard error about "
            f"{results['binomial_se_at_0.6']:.3f} at 60 %). Gap = OPD − SFT paired by seed; spread = the larger of "
            "the "
            "two arms' seed sds; verdict = who is ahead by more than the spread. Command: "
            f"`{results['command']}`; {results['wall_seconds_total']:.0f} s wall for this invocation "
            f"({results['runs_reused']} runs found finished and reused), "
            f"{args['workers']} worker(s) of {args['threads']} thread(s).", "",
            "| regime | at update | OPD (mean ± sd, seeds) | SFT (mean ± sd, seeds) | gap (seeds) | spread | ahead |",
            "|---|---|---|---|---|---|---|"]
    titles = {"long": "long runs", "plateau": "after SFT's plateau", "recovery": "recovery teacher",
              "tuned": "tuned on validation", "harder": "longer chains (5-7 digits)",
              "noisy": "noisy teacher, longer chains"}
    for key, entry in results["regimes"].items():
        out.append(_row(entry, titles[key]))
        if key == "recovery":
            out.append(_row(entry["clean_teacher_same_step"], "(clean teacher, same step)"))
    only = results["regimes"].get("plateau", {}).get("opd_only_same_step", {}).get("seeds")
    if only:
        out += ["", f"For the plateau regime's step count without a switch, OPD from the warm start (the long runs): "
                f"{statistics.mean(only):.3f} ± {sd(only):.3f} ({', '.join(f'{a:.3f}' for a in only)})."]
    g = results["regimes"]["long"]["gap_curve"]
    out += ["", "Long runs, paired gap OPD − SFT at every evaluation: " + ", ".join(
        f"{s}: {m:+.3f}" for s, m in zip(g["step"][1:], g["gap_mean"][1:])) + "."]
    if "recovery_probe" in results:
        p = results["recovery_probe"]
        out += ["", f"Teachers on {p['problems']} test problems ({p['student_error_prefixes']} wrong greedy prefixes "
                "of "
                "the warm start, cut after their first wrong character):", "",
                "| teacher | clean accuracy | right answer after a student's error | after one corrupted digit | "
                "T=1 sample = true solution |", "|---|---|---|---|---|"]
        for name in ("clean teacher", "recovery teacher"):
            if name not in p:
                continue
            t = p[name]
            out.append(f"| {name} | {t['clean_accuracy']:.3f} | {t['recovers_from_student_errors']:.3f} | "
                       f"{t['recovers_from_corrupted_digit']:.3f} | {t['sample_is_true_solution']:.3f} |")
        if args["sft_source"] == "data":
            out += ["", "Under the task teacher, SFT's completions are the true solutions (`--sft-source data`): its "
                    "temperature-1 samples are those (last column), so this is SFT on its samples without generating "
                    "them. Under the recovery teacher, SFT learns from that teacher's own samples."]
    if "recovery_teacher_training" in results.get("recovery_probe", {}):
        p = results["recovery_probe"]
        r = p["recovery_teacher_training"]["recovery"]
        out += ["", f"Recovery teacher: the task teacher fine-tuned {r['steps']} steps (batch {r['batch_size']}, lr "
                f"{r['lr']:g}) on problems of which {r['corrupt_share']:.0%} carry one wrong digit in a step, loss on "
                f"the true rest only ({p['recovery_teacher_training'].get('train_wall_s', '?')} s)."]
    for regime, what in (("harder", "Longer chains"), ("noisy", "Noisy teacher")):
        if f"{regime}_setup" in results:
            out += ["", _harder_text(results, regime, what, args["probe_examples"])]
    if "sweep" in results:
        s = results["sweep"]
        out += ["", f"Sweep (validation split, seed {s['seed']}, {s['steps']} updates, {s['runs']} settings): "
                + "; ".join(
            f"{m}: " + ", ".join(f"lr {r['lr']:g} T {r['temperature']:g} → {r['val_accuracy']:.3f}" for r in rows)
            for m, rows in s["points"].items()) + ". Chosen: " + ", ".join(
            f"{m} lr {lr:g} T {t:g}" for m, (lr, t) in s["chosen"].items()) + "."]
    out += ["", f"![curves](benchmarks/results/{names['curves']})", "",
            f"![gaps](benchmarks/results/{names['gaps']})"]
    return "\n".join(out) + "\n"


def _harder_text(results: dict, regime: str, what: str, probes: int) -> str:
    """The paragraph under the table on the harder or the noisy regime's setup and its accuracy by chain length."""
    t, w = results[f"{regime}_setup"]["teacher"], results[f"{regime}_setup"]["warm_start"]
    entry = results["regimes"][regime]
    text = (f"{what}: task `{t['task']}`. The teacher is the task teacher fine-tuned {t['steps']} steps on it "
            f"(held-out accuracy {t['test_accuracy']:.3f}; temperature-1 samples that are the true solution: "
            f"{t['sample_is_true_solution']:.3f}), the warm start the quickstart's warm start fine-tuned "
            f"{w['steps_done']} steps on it (test accuracy {w['test_accuracy']:.3f}). SFT learns from "
            + ("the true solutions (= the teacher's samples). " if entry["sft_source"] == "data"
               else "the teacher's own temperature-1 samples. "))
    if "sft_greedy_same_step" in entry:
        g = entry["sft_greedy_same_step"]
        text += (f"{g['label']}, same updates: {g['mean']:.3f} ({', '.join(f'{a:.3f}' for a in g['seeds'])}). ")
    by = entry["accuracy_by_chain_length"]
    arms = [a for a in ("opd", "sft", "sft_greedy") if a in by]
    mean_at = lambda rows, k: statistics.mean(r[k] for r in rows)  # noqa: E731
    return text + (f"Greedy accuracy by chain length ({probes} test problems; warm start / " + " / ".join(arms)
                   + ", seed means): " + ", ".join(f"{k} steps {v:.2f} / " + " / ".join(
                       f"{mean_at(by[a], k):.2f}" for a in arms) for k, v in by["warm start"].items()) + ".")


def write_all(results: dict, results_dir: Path) -> None:
    """The JSON, the markdown section and the plots, under the names `output_names` gives."""
    from benchmarks.opd_wins import plots

    names = output_names(results["args"]["quick"])
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / names["json"]).write_text(json.dumps(results, indent=2) + "\n")
    (results_dir / names["md"]).write_text(markdown(results))
    plots.plot_curves(results, results_dir / names["curves"])
    plots.plot_gaps(results, results_dir / names["gaps"])
