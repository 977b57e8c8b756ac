"""Numbers, table and plot of the performance benchmark (`benchmarks.perf.run`).

Definitions, used for every system alike:
- completion tokens/s: completion tokens sampled (eos included) over the timed steps / their wall time;
- FLOPs of a step: `opd.flops.step_flops` over the step's real tokens (sampling + teacher scoring + student forward
  and backward; padding and recomputation not counted), so MFU = FLOPs/s achieved / the fp32 matmul peak measured in
  the same run, and the FLOP limit (tokens/s if every FLOP ran at that peak) = tokens / (FLOPs / peak);
- peak RSS: the high-water mark (VmHWM) of the system's own process at the end of training (imports and model
  loading included), plus that of its second process where it has one: the sampler process of `--overlap`, or the
  `opd serve` that samples for `--sampler` (read just before it stops; both parts are in perf.json).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics

import torch

OPD_VARIANTS = {"opd": "", "opd_compile": "compile_", "opd_overlap": "overlap_",
                "opd_overlap_compile": "overlap_compile_", "opd_sampler_overlap": "sampler_overlap_"}
"""The opd systems held against the goals, with the prefix of their keys in a pair's `goals`."""
SYSTEM_NAMES = {"opd": "opd", "opd_compile": "opd --sampling.compile",
                "opd_overlap": "opd --overlap (library, sampler process)",
                "opd_overlap_compile": "opd --overlap --sampling.compile",
                "opd_sampler_overlap": "opd --sampler --overlap (library)",
                "trl_distillation": "TRL DistillationTrainer",
                "trl_gkd": "TRL GKDTrainer (λ=1)"}


def summarise_entry(raw: dict, warmup: int, matmul_gflops: float) -> dict:
    """One system's timings over the steps after `warmup`, with its FLOP rate, MFU and FLOP-limited tokens/s."""
    n = min(len(raw["step_s"]), len(raw["completion_tokens"]), len(raw["flops"]))
    if n <= warmup:
        raise ValueError(f"only {n} steps were recorded; need more than warmup={warmup}")
    times, tokens, flops = raw["step_s"][warmup:n], raw["completion_tokens"][warmup:n], raw["flops"][warmup:n]
    seconds, total_flops = sum(times), sum(flops)
    peak = matmul_gflops * 1e9
    out = {
        "timed_steps": len(times),
        "step_time_s": seconds / len(times),
        "step_time_s_median": statistics.median(times),
        "completion_tokens_per_step": sum(tokens) / len(tokens),
        "completion_tokens_per_s": sum(tokens) / seconds,
        "flops_per_step": total_flops / len(times),
        "achieved_gflops": total_flops / seconds / 1e9,
        "mfu": total_flops / seconds / peak,
        "flop_limit_tokens_per_s": sum(tokens) / (total_flops / peak),
        "peak_rss_mb": raw["peak_rss_mb"],
    }
    for key in ("trainer_peak_rss_mb", "server_peak_rss_mb", "sampler_peak_rss_mb", "heldout_reverse_kl",
                "heldout_reverse_kl_start", "import_rss_mb", "train_wall_s", "threads", "loadavg_start",
                "loadavg_end"):
        if key in raw:
            out[key] = raw[key]
    out["step_s_all"] = raw["step_s"]
    return out


def summarise_pair(entries: dict, matmul_gflops: float, settings, loss: str, beta: float) -> dict:
    """The pair's entries plus its FLOP limit, and opd's ratios to each TRL trainer (the issue's goals)."""
    ok = {k: v for k, v in entries.items() if "error" not in v}
    per_token = [v["flops_per_step"] / v["completion_tokens_per_step"] for v in ok.values()]
    limit = matmul_gflops * 1e9 / statistics.mean(per_token) if per_token else None
    out = dict(entries, matmul_gflops=matmul_gflops, flop_limit_tokens_per_s=limit, loss=loss,
               beta=beta if loss == "jsd" else None, settings=dataclasses.asdict(settings))
    goals = {}
    for mine, prefix in OPD_VARIANTS.items():
        if mine not in ok:
            continue
        me = ok[mine]
        goals[f"{prefix}fraction_of_flop_limit"] = me["completion_tokens_per_s"] / limit
        speedups = []
        for trl in ("trl_distillation", "trl_gkd"):
            if trl not in ok:
                continue
            speedups.append(me["completion_tokens_per_s"] / ok[trl]["completion_tokens_per_s"])
            goals[f"{prefix}speedup_vs_{trl}"] = speedups[-1]
            goals[f"{prefix}memory_ratio_vs_{trl}"] = me["peak_rss_mb"] / ok[trl]["peak_rss_mb"]
            if "heldout_reverse_kl" in me and "heldout_reverse_kl" in ok[trl]:
                goals[f"{prefix}reverse_kl_minus_{trl}"] = me["heldout_reverse_kl"] - ok[trl]["heldout_reverse_kl"]
        goals[f"{prefix}speed_goal_met"] = bool(speedups) and (
            min(speedups) >= 2.0 or goals[f"{prefix}fraction_of_flop_limit"] >= 0.8)
    out["goals"] = goals
    return out


def one_line(entry: dict) -> str:
    """A progress line for one entry."""
    if "error" in entry:
        return entry["error"]
    kl = entry.get("heldout_reverse_kl")
    return (f"{entry['completion_tokens_per_s']:.0f} tok/s, {entry['step_time_s']:.3f} s/step, "
            f"{entry['peak_rss_mb']:.0f} MB, MFU {entry['mfu']:.3f}" + (f", KL {kl:.4f}" if kl is not None else ""))


def machine(threads: int) -> dict:
    """What the numbers were measured on."""
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            "loadavg_start": os.getloadavg(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl_version, "python": platform.python_version()}


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def pair_table(pair: dict) -> list[str]:
    """Markdown rows: one per system of a pair."""
    lines = ["| system | completion tokens/s | step time (s) | peak RSS (MB) | held-out reverse KL | MFU |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, name in SYSTEM_NAMES.items():
        if key not in pair:
            continue
        e = pair[key]
        if "error" in e:
            lines.append(f"| {name} | {e['error']} | | | | |")
            continue
        lines.append(f"| {name} | {e['completion_tokens_per_s']:.0f} | {e['step_time_s']:.3f} | "
                     f"{e['peak_rss_mb']:.0f} | {_fmt(e.get('heldout_reverse_kl'), '.4f')} | {e['mfu']:.3f} |")
    second = {"server_peak_rss_mb": "`opd serve`", "sampler_peak_rss_mb": "sampler process"}
    parts = [f"{SYSTEM_NAMES[key]}: {pair[key]['trainer_peak_rss_mb']:.0f} MB trainer + "
             f"{pair[key][field]:.0f} MB {what}" for key in SYSTEM_NAMES for field, what in second.items()
             if field in pair.get(key, {})]
    if parts:
        lines += ["", "Peak RSS of two processes, summed: " + "; ".join(parts) + "."]
    return lines


def goals_table(goals: dict) -> list[str]:
    """Markdown rows: each opd variant against both TRL trainers (speed, memory, quality) and the FLOP limit."""
    if not goals:
        return []
    lines = ["| | tokens/s ÷ TRL Distillation | tokens/s ÷ TRL GKD | share of FLOP limit | RSS ÷ TRL Distillation "
             "| RSS ÷ TRL GKD | KL − TRL Distillation | KL − TRL GKD | speed goal met |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for mine, prefix in OPD_VARIANTS.items():
        if f"{prefix}fraction_of_flop_limit" not in goals:
            continue
        g = lambda key, spec: _fmt(goals.get(prefix + key), spec)  # noqa: E731
        lines.append(f"| {SYSTEM_NAMES[mine]} | {g('speedup_vs_trl_distillation', '.2f')} | "
                     f"{g('speedup_vs_trl_gkd', '.2f')} | {g('fraction_of_flop_limit', '.2f')} | "
                     f"{g('memory_ratio_vs_trl_distillation', '.2f')} | {g('memory_ratio_vs_trl_gkd', '.2f')} | "
                     f"{g('reverse_kl_minus_trl_distillation', '+.4f')} | {g('reverse_kl_minus_trl_gkd', '+.4f')} | "
                     f"{goals[prefix + 'speed_goal_met']} |")
    return lines + [""]


def markdown(results: dict) -> str:
    """The RESULTS.md section: per-pair tables, goals, the sweep, and how to reproduce."""
    m = results["machine"]
    lines = ["## Performance: opd vs TRL on-policy distillation", ""]
    if results["quick"]:
        lines += ["*`--quick` run: random stand-in models and a couple of steps; the numbers mean nothing.*", ""]
    lines += [f"`{results['command']}` — {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, "
              f"transformers {m['transformers']}, TRL {m['trl']}; load average at start "
              f"{m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f}; "
              f"wall {results['wall_s'] / 60:.1f} min.", ""]
    for name in ("tiny", "smollm2"):
        if name not in results:
            continue
        pair = results[name]
        blocks = [(pair["loss"], pair)] + list(pair.get("by_loss", {}).items())
        s = pair["settings"]
        lines += [f"### `{name}`: {pair['models']['description']}", "",
                  f"Batch {s['batch_size']}, up to {s['max_new_tokens']} new tokens, {s['steps']} steps "
                  f"(the first {s['warmup']} not timed), temperature 1, lr {results['args']['lr']} constant; "
                  f"held-out reverse KL on {s['heldout_prompts']} test prompts after the last step "
                  f"(before training: {_fmt(pair.get('opd', {}).get('heldout_reverse_kl_start'), '.4f')}).", ""]
        for loss, block in blocks:
            label = f"JSD β={block['beta']}" if loss == "jsd" else "reverse KL"
            lines += [f"**{label}** — fp32 matmul peak {block['matmul_gflops']:.0f} GFLOP/s; FLOP limit "
                      f"{_fmt(block['flop_limit_tokens_per_s'], '.0f')} completion tokens/s.", ""]
            lines += pair_table(block) + [""]
            lines += goals_table(block.get("goals", {}))
    if results.get("sweep"):
        lines += ["### Sweep: step time and peak RSS against completion length and vocabulary size", "",
                  "| vocab | new tokens | system | step time (s) | tokens/s | peak RSS (MB) | MFU |",
                  "|---:|---:|---|---:|---:|---:|---:|"]
        for r in results["sweep"]:
            if "error" in r:
                lines.append(f"| {r['vocab_size']} | {r['max_new_tokens']} | {SYSTEM_NAMES[r['system']]} | "
                             f"{r['error']} | | | |")
            else:
                lines.append(f"| {r['vocab_size']} | {r['max_new_tokens']} | {SYSTEM_NAMES[r['system']]} | "
                             f"{r['step_time_s']:.3f} | {r['completion_tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                             f"{r['mfu']:.3f} |")
        lines += ["", "![step time and memory](perf.png)", ""]
    return "\n".join(lines) + "\n"


def plot(results: dict, path) -> None:
    """Step time and peak RSS against completion length and against vocabulary size, one line per system.

    Without a sweep (`--quick`), the pairs' own entries are the points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("sweep", []) if "error" not in r]
    if not rows:
        for name in ("tiny", "smollm2"):
            if name in results:
                for system in SYSTEM_NAMES:
                    e = results[name].get(system)
                    if e and "error" not in e:
                        vocab = 49152 if name == "smollm2" else 20
                        rows.append(dict(e, system=system, vocab_size=vocab,
                                         max_new_tokens=results[name]["settings"]["max_new_tokens"]))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    a = results["args"]
    for col, (axis, fixed_key, fixed) in enumerate([("max_new_tokens", "vocab_size", a["sweep_vocab_at"]),
                                                     ("vocab_size", "max_new_tokens", a["sweep_length_at"])]):
        for system, name in SYSTEM_NAMES.items():
            pts = sorted((r[axis], r["step_time_s"], r["peak_rss_mb"]) for r in rows
                         if r["system"] == system and (r[fixed_key] == fixed or not results.get("sweep")))
            if pts:
                xs, ts, ms = zip(*pts)
                axes[0, col].plot(xs, ts, marker="o", label=name)
                axes[1, col].plot(xs, ms, marker="o", label=name)
        label = "completion length (new tokens)" if axis == "max_new_tokens" else "vocabulary size"
        for row, ylabel in ((0, "step time (s)"), (1, "peak RSS (MB)")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    axes[0, 0].set_title(f"vocabulary {a['sweep_vocab_at']:,}")
    axes[0, 1].set_title(f"{a['sweep_length_at']} new tokens")
    fig.suptitle("opd vs TRL: step time and memory" + (" (--quick: meaningless numbers)" if results["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
