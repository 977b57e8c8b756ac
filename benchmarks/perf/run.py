"""opd's on-policy loop against TRL's `DistillationTrainer` and `GKDTrainer`, side by side, one command.

For each teacher/student pair (`tiny`: the arithmetic task's models; `smollm2`: SmolLM2-135M-Instruct and a small
student over its 49,152-token vocabulary) the systems (opd; opd with sampling overlapped with the update, by a
local sampler process, `--overlap`, and by an `opd serve`, `--sampler --overlap`; TRL's two trainers) train the same student on the same prompts
with the same divergence, batch, completion length, learning rate and number of steps, each in its own process
(`benchmarks/perf/worker.py`). Reported per system: completion tokens/s and step time over the steps after warm-up,
peak RSS (of all its processes), the held-out per-token reverse KL to the teacher after training (so speed is never
bought with quality), and model FLOP utilisation against the fp32 matmul peak measured in the same run. A sweep over
completion length and vocabulary size (random Llama pairs) gives the plots of step time and memory.

    opd bench perf            # the full benchmark, about 15 minutes on 2 quiet cores
    opd bench perf --quick    # plumbing check with random stand-in models, about 2 minutes

Writes `results_dir`/perf.json, perf.md (a section for RESULTS.md) and perf.png; work files go to `out_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from benchmarks.common.command import command_line
from benchmarks.common.measure import matmul_gflops, run_watched
from benchmarks.perf import pairs, report

SYSTEMS = ("opd", "opd_compile", "opd_overlap", "opd_overlap_compile", "opd_sampler_overlap", "trl_distillation",
           "trl_gkd")
LEVER_SYSTEMS = ("opd_overlap", "opd_sampler_overlap")
"""Sampling overlapped with the update, two ways: `distill --overlap` (a local sampler process sharing the student's
memory, `opd.lm.rollouts.process`) and `distill --sampler URL --overlap` (an `opd serve` of the student, weights pushed
as safetensors each step). Both run only on `lever_pairs`."""
COMPILE_SYSTEMS = ("opd_compile", "opd_overlap_compile")
"""`opd` and `opd --overlap` with `--sampling.compile` (a torch.compile'd decoding step over a static KV cache); run
only on `compile_pairs`."""
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class PairSettings:
    """How one pair is run: the same for every system."""

    batch_size: int
    """Prompts per step (one completion each)."""
    max_new_tokens: int
    """Longest completion."""
    steps: int
    """Optimizer steps, the same for every system (the held-out KL is measured after the last)."""
    warmup: int
    """First steps left out of the timings (lazy initialisation, allocator growth)."""
    heldout_prompts: int
    """Held-out ("test" split) prompts for the reverse-KL measurement; 0 skips it."""


@dataclass(frozen=True)
class PerfArgs:
    """The performance benchmark; the defaults are the full run whose numbers are in RESULTS.md."""

    quick: bool = False
    """Plumbing check with random stand-in models and a handful of steps; its numbers mean nothing."""
    pairs: tuple[str, ...] = ("tiny", "smollm2")
    """Which pairs to run (`tiny`, `smollm2`)."""
    systems: tuple[str, ...] = SYSTEMS
    """Which systems to run on each pair."""
    lever_pairs: tuple[str, ...] = ("tiny", "smollm2")
    """Pairs on which the overlap systems (`opd_overlap`, `opd_sampler_overlap`) run; elsewhere they are left out."""
    compile_pairs: tuple[str, ...] = ("tiny",)
    """Pairs on which the compiled-sampling systems (`opd_compile`, `opd_overlap_compile`) run."""
    loss: str = "jsd"
    """The divergence every system trains with: `jsd` (generalized JSD with `beta`) or `reverse_kl`."""
    beta: float = 0.5
    """JSD's β (teacher weight in the mixture); TRL's β means the same."""
    also_reverse_kl: tuple[str, ...] = ("tiny",)
    """Pairs that are also run with the reverse KL (reported under `by_loss`)."""
    lr: float = 1e-3
    """Learning rate, constant (AdamW, no weight decay, gradient norm clipped to 1)."""
    threads: int = 2
    """torch threads of every process (and of the matmul-peak measurement)."""
    tiny: PairSettings = PairSettings(batch_size=32, max_new_tokens=64, steps=45, warmup=5, heldout_prompts=128)
    smollm2: PairSettings = PairSettings(batch_size=4, max_new_tokens=256, steps=6, warmup=1, heldout_prompts=8)
    sweep_systems: tuple[str, ...] = ("opd", "trl_distillation", "trl_gkd")
    """Which systems the sweep runs."""
    sweep_lengths: tuple[int, ...] = (32, 64, 128, 256)
    """Completion lengths of the sweep (at vocabulary `sweep_vocab_at`)."""
    sweep_vocabs: tuple[int, ...] = (512, 4096, 16384, 49152)
    """Vocabulary sizes of the sweep (at completion length `sweep_length_at`)."""
    sweep_length_at: int = 128
    """Completion length of the vocabulary sweep."""
    sweep_vocab_at: int = 49152
    """Vocabulary size of the completion-length sweep."""
    sweep: PairSettings = PairSettings(batch_size=4, max_new_tokens=0, steps=3, warmup=1, heldout_prompts=0)
    """Sweep runs (max_new_tokens is set per point)."""
    memory_cap_mb: int = 12000
    """A process whose RSS passes this is stopped and its entry recorded as over the cap (protects a shared box)."""
    timeout_s: int = 1200
    """Longest a single entry may run."""
    out_dir: str = "runs/perf"
    """Model directories and per-entry work files."""
    results_dir: str = "benchmarks/results"
    """Where perf.json, perf.md and perf.png go."""


QUICK = dict(
    also_reverse_kl=(),
    lever_pairs=("tiny",),
    threads=1,
    tiny=PairSettings(batch_size=4, max_new_tokens=8, steps=2, warmup=1, heldout_prompts=4),
    smollm2=PairSettings(batch_size=2, max_new_tokens=8, steps=2, warmup=1, heldout_prompts=2),
    sweep_lengths=(), sweep_vocabs=(),
)
"""What `--quick` overrides."""


def run_entry(spec: dict, work: Path, args: PerfArgs) -> dict:
    """One system on one pair, in a fresh Python process watched for memory; returns the worker's numbers."""
    work.mkdir(parents=True, exist_ok=True)
    name = f"{spec['pair']}-{spec['loss']}-{spec['system']}-L{spec['max_new_tokens']}"
    spec_path, out_path, log_path = work / f"{name}.spec.json", work / f"{name}.json", work / f"{name}.log"
    spec_path.write_text(json.dumps(spec, indent=1))
    out_path.unlink(missing_ok=True)
    shutil.rmtree(work / f"{name}-scratch", ignore_errors=True)  # a run directory left by an earlier run
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false")
    ended = run_watched([sys.executable, "-m", "benchmarks.perf.worker", str(spec_path), str(out_path)], log_path,
                        env, REPO_ROOT, args.memory_cap_mb, args.timeout_s)
    if ended.stopped:
        return {"error": f"stopped: {ended.stopped} ({ended.peak_seen_mb:.0f} MB RSS after {ended.wall_s:.0f} s)",
                "peak_rss_mb_at_stop": ended.peak_seen_mb}
    if ended.returncode != 0 or not out_path.exists():
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{name} failed (exit {ended.returncode}); log {log_path}:\n{tail}")
    return json.loads(out_path.read_text())


def _spec(args: PerfArgs, pair_name: str, models: dict, settings: PairSettings, system: str, loss: str,
          max_new_tokens: int | None = None, initial_kl: bool = False) -> dict:
    return dict(pair=pair_name, system=system, student=models["student"], teacher=models["teacher"], loss=loss,
                beta=args.beta, batch_size=settings.batch_size,
                max_new_tokens=max_new_tokens or settings.max_new_tokens, steps=settings.steps, lr=args.lr,
                threads=args.threads, seed=0, train_examples=5000, heldout_prompts=settings.heldout_prompts,
                initial_kl=initial_kl)


def run_pair(args: PerfArgs, name: str, models: dict, settings: PairSettings, loss: str, work: Path) -> dict:
    """The systems on one pair, back to back, with the matmul peak measured just before them."""
    peak = matmul_gflops(args.threads)
    entries = {}
    systems = [s for s in args.systems if (name in args.lever_pairs or s not in LEVER_SYSTEMS)
               and (name in args.compile_pairs or s not in COMPILE_SYSTEMS)]
    for i, system in enumerate(systems):
        spec = _spec(args, name, models, settings, system, loss, initial_kl=(i == 0))
        raw = run_entry(spec, work, args)
        entries[system] = raw if "error" in raw else report.summarise_entry(raw, settings.warmup, peak)
        print(f"  {name}/{loss}/{system}: " + report.one_line(entries[system]), flush=True)
    return report.summarise_pair(entries, peak, settings, loss, args.beta)


def run_sweep(args: PerfArgs, root: Path, work: Path) -> list[dict]:
    """Step time and memory of every system at each completion length and vocabulary size of the sweep."""
    points = [(args.sweep_vocab_at, L) for L in args.sweep_lengths]
    points += [(V, args.sweep_length_at) for V in args.sweep_vocabs if (V, args.sweep_length_at) not in points]
    rows = []
    for vocab, length in points:
        models = pairs.sweep_pair(root, vocab, quick=args.quick)
        peak = matmul_gflops(args.threads)
        for system in args.sweep_systems:
            spec = _spec(args, f"sweep-v{vocab}", models, args.sweep, system, args.loss, max_new_tokens=length)
            raw = run_entry(spec, work, args)
            entry = raw if "error" in raw else report.summarise_entry(raw, args.sweep.warmup, peak)
            rows.append(dict(system=system, vocab_size=vocab, max_new_tokens=length, **entry))
            print(f"  sweep V={vocab} L={length} {system}: " + report.one_line(entry), flush=True)
    return rows


def command(args: PerfArgs) -> str:
    """The command line that reproduces `args` (flags that differ from the defaults only; not those --quick sets)."""
    return command_line("perf", args, skip=QUICK if args.quick else ())


def perf(args: PerfArgs) -> dict:
    """Run the benchmark `args` describes and write perf.json, perf.md and perf.png; returns the results."""
    if args.quick:
        args = dataclasses.replace(args, **QUICK)
    unknown = set(args.systems + args.sweep_systems) - set(SYSTEMS)
    if unknown or args.loss not in ("jsd", "reverse_kl") or set(args.pairs) - {"tiny", "smollm2"}:
        raise ValueError(f"systems must be among {SYSTEMS}, loss jsd or reverse_kl, pairs tiny/smollm2; got "
                         f"{args.systems}, {args.loss}, {args.pairs}")
    root, work = Path(args.out_dir) / "models", Path(args.out_dir) / "entries"
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {"quick": args.quick, "command": command(args), "args": dataclasses.asdict(args),
                     "machine": report.machine(args.threads)}
    started = time.perf_counter()
    for name in args.pairs:
        models = pairs.tiny_pair(root, args.quick) if name == "tiny" else pairs.smollm2_pair(root, args.quick)
        settings = getattr(args, name)
        print(f"{name}: {models['description']}", flush=True)
        results[name] = run_pair(args, name, models, settings, args.loss, work) | {"models": models}
        if name in args.also_reverse_kl and args.loss != "reverse_kl":
            results[name]["by_loss"] = {"reverse_kl": run_pair(args, name, models, settings, "reverse_kl", work)}
    results["sweep"] = run_sweep(args, root, work)
    results["wall_s"] = time.perf_counter() - started
    results["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "perf.md").write_text(report.markdown(results))
    report.plot(results, out / "perf.png")
    return results


if __name__ == "__main__":
    perf(tyro.cli(PerfArgs))
