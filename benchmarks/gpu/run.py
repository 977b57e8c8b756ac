"""`opd bench gpu`: opd's train step against TRL's `DistillationTrainer` on one GPU, at Qwen3's sizes.

    python -m benchmarks.gpu.run --out gpu_results/          # on the GPU machine: about 8 minutes on one H100
    python -m benchmarks.gpu.run --quick --device cpu        # toy sizes, anywhere (a plumbing check)

Random-weight students shaped like Qwen3-0.6B and -1.7B under teachers shaped like Qwen3-4B and -8B (the real configs'
widths, layers, heads and vocabulary of 151,936; no downloads), bf16 weights, at 1k and 4k completion tokens. Each
point is `benchmarks.scale.worker` in a process of its own, as in `opd bench scale`: the same fixed batch, the same
reverse KL, AdamW and clipping for both systems. Reported: tokens/s, step time split into teacher and student, peak
GPU memory (`torch.cuda.max_memory_allocated`), MFU against the bf16 matmul peak measured on the device.

Needs torch, transformers, accelerate and peft, plus tyro (opd's config imports it); not datasets (the worker stands a
placeholder in for it), TRL only for its rows (without it they say "not importable"), no tyro here: argparse.
`benchmarks/gpu/README.md` says what to bring. Writes OUT/gpu.json and OUT/gpu.md (--quick: OUT/gpu_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.common.measure import matmul_gflops
from benchmarks.common.results import write
from benchmarks.scale import models, points
from benchmarks.scale.report import fmt, one_line
from benchmarks.scale.worker import importable

QWEN3 = {
    "0.6B": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128},
    "1.7B": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128},
    "4B": {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128},
    "8B": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False},
    # --quick: toy shapes of the same architecture over a small vocabulary
    "toy-student": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "head_dim": 16},
    "toy-teacher": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 16},
}
"""Qwen3's configs (rms_norm_eps 1e-6, rope θ 1e6 as in them); every size ties its embeddings except 8B."""
QWEN3_COMMON = {"rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0}
PAIRS = ("0.6B:4B", "1.7B:4B", "1.7B:8B")
"""student:teacher pairs of the full run; the 8B teacher is left out where the GPU has under 60 GiB."""
SYSTEMS = ("opd", "trl_distillation")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="opd bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="where gpu.json and gpu.md go")
    parser.add_argument("--work", default="runs/gpu", help="model directories and per-point logs")
    parser.add_argument("--quick", action="store_true", help="toy models, short lengths: a plumbing check")
    parser.add_argument("--device", default="cuda", help="torch device (cuda, or cpu for --quick)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="weights' dtype")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), help="student:teacher sizes, e.g. 0.6B:4B")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096], help="completion lengths")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per point")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point")
    parser.add_argument("--threads", type=int, default=4, help="CPU threads per worker")
    parser.add_argument("--timeout", type=int, default=600, help="longest one point may run, seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.warmup, args.steps, args.threads = ["toy-student:toy-teacher"], 1, 1, 1
        if args.lengths == [1024, 4096]:
            args.lengths = [32, 64]
    return args


def build_pairs(args: argparse.Namespace, root: Path) -> list[dict]:
    """The random model directories of `args.pairs`, built on the device (fast) and saved in the weights' dtype."""
    from benchmarks.perf.pairs import padded_char_tokenizer

    vocab = 2048 if args.quick else models.QWEN_VOCAB
    tokenizer = padded_char_tokenizer(vocab, model_max_length=8192)
    built = {}
    out = []
    for spec in args.pairs:
        student, teacher = spec.split(":")
        for name in (student, teacher):
            if name not in built:
                sizes = {**QWEN3_COMMON, "tie_word_embeddings": True, **QWEN3[name]}
                built[name] = models.random_model_dir(root / f"qwen3-{name}-{args.dtype}-v{vocab}", "qwen3", sizes,
                                                      tokenizer, seed=len(built), max_positions=40960,
                                                      dtype=args.dtype, device=args.device)
        out.append(models.pair(built[teacher], built[student], f"Qwen3-{student}-shaped student, "
                                                               f"Qwen3-{teacher}-shaped teacher (random weights)")
                   | {"name": spec})
    return out


def markdown(results: dict) -> str:
    """gpu.md: one table of every point, then opd's tokens/s and memory as a multiple of TRL's."""
    m = results["machine"]
    lines = ["## opd on one GPU: Qwen3-shaped models against TRL", ""]
    if results["quick"]:
        lines += ["*`--quick` run: toy models; the numbers mean nothing.*", ""]
    run = (f"`{results['command']}` — {m['device']}, torch {m['torch']}, transformers {m['transformers']}, TRL "
           f"{m['trl'] or 'not installed'}; {results['dtype']} matmul peak {results['matmul_gflops']:.0f} GFLOP/s; "
           f"wall {results['wall_s'] / 60:.1f} min. Random weights, batch 1, reverse KL, AdamW, "
           f"{results['warmup']} untimed and {results['steps']} timed steps per point.")
    lines += [run, "",
              ("| pair | length | system | step s | teacher s | student s | tokens/s | peak GPU GB | peak RSS GB | MFU "
               "| failed |"), "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["rows"]:
        gpu, rss = (r.get(k) and r[k] / 1024 for k in ("peak_gpu_mb", "peak_rss_mb"))
        lines.append(f"| {r['pair']} | {r['length']} | {r['system']} | {fmt(r.get('step_s'))} | "
                     f"{fmt(r.get('teacher_s'))} | {fmt(r.get('student_s'))} | {fmt(r.get('tokens_per_s'), '.0f')} | "
                     f"{fmt(gpu, '.1f')} | {fmt(rss, '.1f')} | {fmt(r.get('mfu'), '.3f')} | {r.get('failed') or ''} |")
    ratios = compare(results["rows"])
    if ratios:
        lines += ["", "| pair | length | opd tokens/s ÷ TRL's | opd peak GPU memory ÷ TRL's |", "|---|---:|---:|---:|"]
        lines += [f"| {r['pair']} | {r['length']} | {r['speed']:.2f} | {fmt(r['memory'])} |" for r in ratios]
    return "\n".join(lines) + "\n"


def compare(rows: list[dict]) -> list[dict]:
    """opd against TRL at each (pair, length) where both ran."""
    ok = {(r["pair"], r["length"], r["system"]): r for r in rows if not r.get("failed")}
    out = []
    for (pair, length, system), opd in ok.items():
        trl = ok.get((pair, length, "trl_distillation"))
        if system == "opd" and trl:
            memory = (opd["peak_gpu_mb"] / trl["peak_gpu_mb"]) if "peak_gpu_mb" in opd else None
            out.append({"pair": pair, "length": length, "speed": opd["tokens_per_s"] / trl["tokens_per_s"],
                        "memory": memory})
    return out


def machine(device: str) -> dict:
    import transformers

    trl = None
    if importable("trl"):
        import trl as trl_module

        trl = trl_module.__version__
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor()
    return {"device": name or platform.machine(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl, "python": platform.python_version(), "cpu_cores": os.cpu_count()}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    started = time.perf_counter()
    work = Path(args.work)
    if args.device.startswith("cuda") and not args.quick:
        memory_gib = torch.cuda.get_device_properties(args.device).total_memory / 2**30
        if memory_gib < 60:
            args.pairs = [p for p in args.pairs if not p.endswith(":8B")]
    pairs = build_pairs(args, work / "models")
    peak = matmul_gflops(args.threads, n=512 if args.quick else 8192, repeats=10, device=args.device,
                         dtype=getattr(torch, args.dtype))
    print(f"gpu: {len(pairs) * len(args.lengths) * len(args.systems)} points; {args.dtype} matmul peak "
          f"{peak:.0f} GFLOP/s on {args.device}", flush=True)
    rows = []
    for pair in pairs:
        for length in args.lengths:
            for system in args.systems:
                point = points.spec(system, pair, length, warmup=args.warmup, steps=args.steps,
                                    threads=args.threads, device=args.device, dtype=args.dtype)
                if system == "trl_distillation" and not importable("trl"):
                    row = {"system": system, "length": length, "failed": "not importable: trl is not installed"}
                else:
                    row = points.run_point(point, work / "points", f"{pair['name'].replace(':', '-')}-{system}-"
                                           f"L{length}", 100 * 1024, args.timeout, peak)
                rows.append({"pair": pair["name"], **row, "student_params": pair["student_params"],
                             "teacher_params": pair["teacher_params"]})
                print(f"  {pair['name']} L={length} {system}: {row.get('failed') or one_line(row)}", flush=True)
    command = "python -m benchmarks.gpu.run " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {"quick": args.quick, "command": command.strip(), "device": args.device, "dtype": args.dtype,
               "warmup": args.warmup, "steps": args.steps, "matmul_gflops": peak, "machine": machine(args.device),
               "pairs": pairs, "rows": rows, "wall_s": time.perf_counter() - started}
    write("gpu", results, markdown, args.quick, Path(args.out))
    print(json.dumps(compare(rows), indent=1))
    return results


if __name__ == "__main__":
    main()
