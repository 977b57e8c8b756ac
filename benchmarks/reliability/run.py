"""`opd bench reliability`: does training survive crashes, and does `opd serve` survive bad input and load?

Four checks, all against real processes (`python -m opd.cli train|serve`) on tiny models built here:

1. kill -9: a training run (checkpoint every step) is SIGKILLed at random moments `kills` times and resumed with
   `--resume` each time, then finished. Every kill must leave a checkpoint that loads, every resume must work, and
   the final weights and optimiser state must equal those of the same run done straight through, bit for bit.
2. Fuzz: thousands of hypothesis-generated malformed requests to `opd serve` (`benchmarks/reliability/fuzz.py`): no
   5xx, no crash, every malformed request answered with a 4xx and a one-line message.
3. Load: concurrent clients (teacher scoring and short generations, as opd's remote teacher and sampler send them)
   against the same server: zero errors; throughput and latency percentiles.
4. Teacher dies: `opd train --teacher http://127.0.0.1:PORT`, the server SIGKILLed mid-run. The trainer must retry,
   stop with a one-line error naming a checkpoint, and after a server restart resume to the same final weights as a
   run that never lost its teacher.

Writes `results_dir`/reliability.json and reliability.md (a section for RESULTS.md); models, runs and logs go to
`work_dir`. `--quick` (a few kills, a few hundred fuzz cases, 5 s of load) checks the same properties in about a
minute or two; the full run takes a few minutes.

    opd bench reliability            # the full benchmark
    opd bench reliability --quick
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

import opd
from benchmarks.common.command import command_line
from benchmarks.common.processes import Server, free_port
from benchmarks.reliability import server as server_phases
from benchmarks.reliability.fuzz import Target
from benchmarks.reliability.runs import TrainSpec, kill_and_resume, teacher_dies
from opd.lm.hf.model import load_tokenizer
from opd.lm.serve.app import ServeArgs


@dataclass(frozen=True)
class ReliabilityArgs:
    """The reliability benchmark; the defaults are the full run whose numbers go to RESULTS.md."""

    quick: bool = False
    """A short run for the test suite: 3 kills, 300 fuzz cases, 5 s of load (overrides those three settings)."""
    kills: int = 20
    """SIGKILLs of the training run, each followed by a resume."""
    fuzz_cases: int = 5000
    """Malformed (and some well-formed) requests sent to the server."""
    load_clients: int = 32
    """Concurrent clients in the load test."""
    load_seconds: float = 30.0
    """How long the load test runs."""
    teacher_steps: int = 12
    """Steps of the run whose teacher server is killed."""
    seed: int = 0
    """Seeds the kill times, the fuzzer, the load clients' requests and the training runs."""
    work_dir: str = "runs/reliability"
    """Where the tiny models, the runs and the server logs go (emptied phase by phase)."""
    results_dir: str = "benchmarks/results"
    """Where reliability.json and reliability.md are written."""
    progress: bool = True
    """Show progress bars."""


QUICK = dict(kills=3, fuzz_cases=300, load_seconds=5.0)


def reliability(args: ReliabilityArgs) -> dict:
    """Run the four checks, write reliability.json and reliability.md, and return the results."""
    threads, bars = torch.get_num_threads(), transformers.utils.logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()  # checkpoints are loaded after every kill
    try:
        results = _run(args)
    finally:
        torch.set_num_threads(threads)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    write(results, Path(args.results_dir))
    return results


def _run(args: ReliabilityArgs) -> dict:
    command = _command(args)
    if args.quick:
        args = dataclasses.replace(args, **QUICK)
    work, t0 = Path(args.work_dir), time.monotonic()
    phase_s, code_before, load_before = {}, code_fingerprint(), os.getloadavg()[0]
    student, teacher = make_models(work / "models", args.seed)
    rng = random.Random(args.seed)
    bar = tqdm(total=args.kills, desc="kill -9 and resume", disable=not args.progress)
    kill = kill_and_resume(TrainSpec(student, teacher, steps=5 * args.kills + 5, seed=args.seed), work / "kill9",
                           args.kills, rng, bar)
    bar.close()
    phase_s["kill_resume"] = round(time.monotonic() - t0, 1)

    shutil.rmtree(work / "serve", ignore_errors=True)  # the log is read for errors: start it empty
    server = Server(teacher, free_port(), work / "serve" / "server.log").start()
    try:
        tokenizer = load_tokenizer(teacher)
        context = transformers.AutoConfig.from_pretrained(teacher).max_position_embeddings
        target = Target.of(ServeArgs(model_dir=teacher), len(tokenizer), context)
        bar = tqdm(total=args.fuzz_cases, desc="fuzz", disable=not args.progress)
        fuzz = server_phases.fuzz_server(server.url, target, args.fuzz_cases, args.seed, bar)
        bar.close()
        phase_s["fuzz"] = round(time.monotonic() - t0 - sum(phase_s.values()), 1)
        fuzz["server_alive"] = server.proc.poll() is None
        fuzz["weights_version_after"] = server.health()["weights_version"]
        fuzz["server_log_errors"] = server.log_errors()
        load = server_phases.load_test(server.url, teacher, tokenizer, args.load_clients, args.load_seconds, args.seed)
        load["server_alive"] = server.proc.poll() is None
        load["server_log_errors"] = server.log_errors()[len(fuzz["server_log_errors"]):]
        phase_s["load"] = round(time.monotonic() - t0 - sum(phase_s.values()), 1)
        spec = TrainSpec(student, server.url, steps=args.teacher_steps, seed=args.seed, save_every=100,
                         remote_max_retries=1 if args.quick else 5)
        dies = teacher_dies(spec, work / "teacher", server, kill_after_steps=args.teacher_steps // 2)
    finally:
        server.stop()
    phase_s["teacher_kill"] = round(time.monotonic() - t0 - sum(phase_s.values()), 1)
    results = {
        "command": command, "quick": args.quick, "seed": args.seed, "wall_s": round(time.monotonic() - t0, 1),
        "phase_s": phase_s, "cpus": os.cpu_count(),
        # The machine's 1-minute load average (other work included) at the start and the end: context for timings.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "torch": torch.__version__, "kill_resume": summarize_kills(kill), "fuzz": fuzz, "load": load,
        "teacher_kill": dies,
        # Runs are compared across processes started minutes apart: an edit to opd/ in between can break a comparison.
        "code_changed_during_run": sorted({f for f, _ in code_fingerprint().items() ^ code_before.items()}),
    }
    results["all_passed"] = passed(results)
    return results


def code_fingerprint() -> dict[str, str]:
    """opd's source files (relative path -> sha256)."""
    root = Path(opd.__file__).parent
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.py")}


def make_models(root: Path, seed: int) -> tuple[str, str]:
    """A tiny student (xs) and teacher (s) for the arithmetic task, saved as HF directories; returns their paths."""
    from opd.tasks import get_task
    from opd.tasks.models import make_model
    from opd.tasks.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(get_task("arithmetic"))
    paths = []
    for name, size, model_seed in (("student", "xs", seed + 2), ("teacher", "s", seed + 1)):
        path = (root / name).resolve()  # absolute: the server runs in another folder
        make_model(size, tokenizer, model_seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]


def summarize_kills(kill: dict) -> dict:
    """The kill -9 phase's record with its counts on top."""
    records = kill["records"]
    steps = [r["checkpoint_step"] for r in records if r["killed"]]
    return {
        "kills": sum(r["killed"] for r in records),
        "resumes": sum(r["killed"] for r in records),  # every kill is followed by a resume (the last one finishes)
        "resume_failures": sum(r["resume_failed"] for r in records),
        "checkpoints_inspected": sum(r["checkpoint_step"] is not None for r in records),
        "corrupt_checkpoints": sum(r["checkpoint_loadable"] is False for r in records),
        "checkpoint_step_went_back": sum(r["step_went_back"] for r in records),
        "kills_during_startup": sum(r["after_steps"] == 0 for r in records if r["killed"]),
        "kills_inside_a_checkpoint_write": sum(r["checkpoint_inside_write"] for r in records if r["killed"]),
        "kills_between_the_two_renames": sum(r["checkpoint_where"] == ".checkpoint.old" for r in records),
        "checkpoint_steps_at_kills": steps,
        **kill,
    }


def passed(results: dict) -> bool:
    """Did every correctness property hold (timings are reported, never judged)?"""
    k, f, ld, t = results["kill_resume"], results["fuzz"], results["load"], results["teacher_kill"]
    c, tc = k["comparison"], t["comparison"]
    return all([
        k["kills"] > 0, k["resume_failures"] == 0, k["corrupt_checkpoints"] == 0, k["checkpoint_step_went_back"] == 0,
        c["weights_bit_exact"], c["optimizer_bit_exact"], c["metrics_match"], c["final_step"] == k["steps"],
        k["tmp_dirs_left_at_end"] == 0,
        f["failures"] == 0, f["server_alive"], not f["server_log_errors"], f["weights_version_after"] == 0,
        ld["errors"] == 0, ld["requests"] > 0, ld["server_alive"], not ld["server_log_errors"],
        t["server_killed_mid_run"], t["exit_code"] == 2, t["message_is_one_line"], t["message_names_checkpoint"],
        t["checkpoint"]["loadable"], tc["weights_bit_exact"], tc["optimizer_bit_exact"], tc["metrics_match"],
        tc["final_step"] == t["steps"],
    ])


def write(results: dict, results_dir: Path) -> None:
    """reliability.json and reliability.md in `results_dir`."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "reliability.json").write_text(json.dumps(results, indent=2) + "\n")
    (results_dir / "reliability.md").write_text(markdown(results))


def _yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def markdown(r: dict) -> str:
    """The RESULTS.md section."""
    k, f, ld, t = r["kill_resume"], r["fuzz"], r["load"], r["teacher_kill"]
    c, tc = k["comparison"], t["comparison"]
    lat, kinds = ld["latency"], ld["by_kind"]
    lines = [
        "## Reliability",
        "",
        f"`{r['command']}` ({r['wall_s']:.0f} s, torch {r['torch']}, {r['cpus']} CPUs with load average "
        f"{r['load_average'][0]} → {r['load_average'][1]}). All processes are the real CLI "
        "(`python -m opd.cli train|serve`) on tiny arithmetic models; timings depend on the machine, the yes/no "
        "answers must not.",
        "",
        "| check | result |",
        "| --- | --- |",
        f"| kill -9 during training, then `--resume` | {k['kills']} kills ({k['kills_during_startup']} in start-up, "
        f"{k['kills_inside_a_checkpoint_write']} inside a checkpoint write), {k['resume_failures']} failed resumes, "
        f"{k['corrupt_checkpoints']} corrupt checkpoints, {k['tmp_dirs_left_at_end']} temporary directories left at "
        f"the end; {k['steps']} steps, checkpoints at kills {k['checkpoint_steps_at_kills']} |",
        f"| final weights = uninterrupted run (same seed) | bit-exact: {_yes(c['weights_bit_exact'])} "
        f"({c['tensors']} tensors, max abs diff {c['max_abs_weight_diff']:.1e}); optimiser state bit-exact: "
        f"{_yes(c['optimizer_bit_exact'])}; every logged step (incl. {c['redone_steps']} redone) matches: "
        f"{_yes(c['metrics_match'])} |",
        f"| fuzzing `opd serve` | {f['cases']} requests ({f['must_fail']} malformed), {f['server_errors_5xx']} 5xx, "
        f"{f['failures']} answers breaking the rule (no 5xx; malformed → 4xx with a one-line message), "
        f"{f['no_answer']} unanswered; server alive after: {_yes(f['server_alive'])}, errors in its log: "
        f"{len(f['server_log_errors'])} |",
        f"| load: {ld['clients']} concurrent clients for {ld['seconds']:.0f} s | {ld['requests']} requests, "
        f"{ld['errors']} errors; {ld['requests_per_s']} requests/s, {ld['tokens_per_s']} tokens/s "
        f"({ld['scored_tokens_per_s']} scored + {ld['generated_tokens_per_s']} generated); latency p50 "
        f"{lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms (scoring {kinds['score'].get('p50_ms')} / "
        f"{kinds['score'].get('p99_ms')} ms, generation {kinds['generate'].get('p50_ms')} / "
        f"{kinds['generate'].get('p99_ms')} ms) |",
        f"| teacher server SIGKILLed mid-run | killed after step {t['steps_logged_at_kill']} of {t['steps']}; the "
        f"trainer retried for {t['seconds_kill_to_exit']:.1f} s, exited {t['exit_code']} with one line: "
        f"{_yes(t['message_is_one_line'] and t['message_names_checkpoint'])}; checkpoint at step "
        f"{t['checkpoint']['step']} loads: {_yes(bool(t['checkpoint']['loadable']))}; after a restart the resumed "
        f"run equals an uninterrupted one bit for bit: {_yes(tc['weights_bit_exact'] and tc['optimizer_bit_exact'])} |",
        "",
        f"Load workload: {ld['workload']}. The trainer's message: `` {t['message']} ``",
        "",
        f"All properties held: {_yes(r['all_passed'])}."
        + (f" Files of opd edited during the run: {', '.join(r['code_changed_during_run'])}."
           if r["code_changed_during_run"] else ""),
        "",
    ]
    if r["quick"]:
        lines.insert(3, "*`--quick`: a plumbing check; run without it for the numbers.*\n")
    return "\n".join(lines)


def _command(args: ReliabilityArgs) -> str:
    """The command line that reproduces `args` (the flags that differ from the defaults)."""
    return command_line("reliability", args)


def reliability_main(args: ReliabilityArgs) -> None:
    """CLI: run the benchmark and print the markdown section it wrote."""
    reliability(args)
    print((Path(args.results_dir) / "reliability.md").read_text())


if __name__ == "__main__":
    import tyro

    reliability_main(tyro.cli(ReliabilityArgs))
