"""`opd bench vllm`: opd against a real vLLM server, what matched, and how fast a teacher scores through it.

Checks, each recorded with its numbers and passed/failed: the remote teacher's top-k and taken-token log-probs
against the local Hugging Face model (the tiny test teacher, and SmolLM2-135M-Instruct); `opd train --teacher URL`
losses on vLLM against the same run on `opd serve`; the student's sampler on vLLM with weight reloads (sampler_kl
right after a push and one update later); sampling requests that override the model's generation_config.json; the
bad inputs refused before any step; a teacher killed mid-run leaving a resumable checkpoint. Speed: teacher-scoring
tokens/s on SmolLM2-135M-Instruct (the realdata benchmark's teacher) through vLLM, through `opd serve` (both top-20
log-probs over HTTP) and as a local teacher in this process (hidden states: the full-vocabulary path).
Writes benchmarks/results/vllm.{json,md}.

vLLM runs from the virtualenv `opd.lm.remote.vllm.prepare_venv` makes (once, about 4 minutes). --quick runs the
checks on the tiny models only, scores the tiny teacher for the speed table, and skips the killed-teacher check
(tests/lm/test_vllm.py has it); it is what tests/benchmarks/test_vllm.py runs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import torch
import tyro

from opd.config import DistillConfig, OptimArgs, SamplingArgs
from opd.lm.hf.model import load_model, load_tokenizer
from opd.lm.remote.sampler import RemoteSampler
from opd.lm.remote.teacher import RemoteTeacher
from opd.lm.teachers.local import LocalTeacher
from opd.lm.train import TrainingError, distill
from opd.lm.remote.vllm import VLLM_VERSION, free_port, vllm_server
from benchmarks.common.results import RESULTS, write
from tests.lm.vllm_helpers import MAX_LEN, big_vocab_student, build_models, replace_teacher, shared_servers



@dataclass(frozen=True)
class VllmBenchArgs:
    """Sizes of the scoring-speed measurement (defaults: about 10 minutes on 2 CPU cores, with the server starts)."""

    sequences: int = 16
    """Sequences per scoring call (the realdata benchmark's 8 prompts x 2 would be 16)."""
    length: int = 256
    """Tokens per sequence; the teacher scores every position."""
    repeats: int = 3
    """Timed scoring calls per scorer, after one warm-up call; the median is reported."""
    top_k: int = 20
    """Log-probs per position over HTTP (vLLM's default --max-logprobs)."""
    threads: int = 2
    """Threads of every scorer (vLLM's worker, opd serve, the local teacher), one at a time."""


def _cfg(dirs, out, **kw) -> DistillConfig:
    base = dict(student=dirs["student"], steps=3, batch_size=4, train_examples=64, eval_examples=4, eval_every=0,
                save_every=100, top_k=5, sampling=SamplingArgs(max_new_tokens=8), out_dir=str(out), progress=False,
                optim=OptimArgs(lr=1e-2, warmup_steps=1), remote_max_retries=1)
    return DistillConfig(**{**base, **kw})


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def teacher_logprobs(url: str, model_dir: str, top_k: int, tolerance: float, rows: int = 4, length: int = 48) -> dict:
    """Max |difference| of the top-k and taken-token log-probs from vLLM against the local model, random sequences;
    passed when under `tolerance` and the top-k ids agree everywhere."""
    model = load_model(model_dir, dtype="float32", device="cpu").eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    ids_BL = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    ones_BL = torch.ones_like(ids_BL)
    signal = RemoteTeacher(url, top_k=top_k).score(ids_BL, ones_BL, ones_BL[:, 1:])
    with torch.no_grad():
        logp_BTV = model(ids_BL).logits[:, :-1].float().log_softmax(-1)
    top = logp_BTV.topk(top_k)
    taken = logp_BTV.gather(-1, ids_BL[:, 1:, None])[..., 0]
    diff_top = (signal.topk_logp_BTK - top.values).abs().max().item()
    diff_taken = (signal.taken_logp_BT - taken).abs().max().item()
    same_ids = (signal.topk_ids_BTK == top.indices).float().mean().item()
    return {"max_abs_diff_topk": diff_top, "max_abs_diff_taken": diff_taken, "topk_ids_equal": same_ids,
            "positions": rows * (length - 1), "tolerance": tolerance,
            "passed": max(diff_top, diff_taken) < tolerance and same_ids == 1.0}


def training_matches_opd_serve(dirs, url: str, root: Path) -> dict:
    """3 steps of `opd train --teacher URL` on vLLM and on opd serve: the largest per-step loss difference."""
    distill(_cfg(dirs, root / "train-vllm", teacher=url))
    with _opd_serve(dirs["teacher"], threads=1) as opd_url:
        distill(_cfg(dirs, root / "train-opd", teacher=opd_url))
    a, b = _metrics(root / "train-vllm"), _metrics(root / "train-opd")
    diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    return {"steps": len(a), "losses_vllm": [x["loss"] for x in a], "max_abs_loss_diff": diff,
            "passed": len(a) == len(b) == 3 and diff < 1e-4}


def sampler_sync(dirs, teacher_url: str, sampler_url: str, root: Path) -> dict:
    """4 steps with the student's sampler on vLLM, pushes before steps 1 and 3: sampler_kl right after a push (should
    be ~0) and one update later (should not)."""
    distill(_cfg(dirs, root / "sampler", teacher=teacher_url, sampler=sampler_url, steps=4, sync_every=2))
    kl = [m["sampler_kl"] for m in _metrics(root / "sampler")]
    return {"sampler_kl": kl, "after_push_max": max(kl[0], kl[2]), "one_update_stale_min": min(kl[1], kl[3]),
            "passed": max(kl[0], kl[2]) < 1e-8 and min(kl[1], kl[3]) > 1e-6}


def generation_config_override(sampler_url: str) -> dict:
    """Distinct completions of one prompt under 6 seeds: a bare request (vLLM applies the student's
    generation_config.json, top_k=1) against opd's RemoteSampler (every sampling field sent explicitly)."""
    client = RemoteSampler(sampler_url)
    prompt = [1, 7, 8, 5, 9, 16]
    model = client.client.served_model()
    bare = {httpx.post(f"{sampler_url}/completions", json={"model": model, "prompt": prompt, "max_tokens": 6,
                                                          "seed": s}, timeout=60).json()["choices"][0]["text"]
            for s in range(6)}
    explicit = {tuple(c) for c in client.sample([prompt] * 6, 6, seed=0)[0]}
    return {"distinct_bare": len(bare), "distinct_opd": len(explicit), "passed": len(bare) == 1 < len(explicit)}


def bad_inputs(dirs, teacher_url: str, sampler_url: str, root: Path) -> dict:
    """Each bad setup: refused before any step with a one-line message that names the fix."""
    cases = {
        "--top-k above vLLM's --max-logprobs": (dict(teacher=teacher_url, top_k=21), "--max-logprobs 21"),
        "a vLLM sampler without dev mode": (dict(teacher=dirs["teacher"], sampler=teacher_url),
                                            "VLLM_SERVER_DEV_MODE=1"),
        "a served vocabulary smaller than the student's": (
            dict(teacher=teacher_url, student=big_vocab_student(root, load_tokenizer(dirs["student"]))), "smaller vocabulary"),
        "a URL that is not an OpenAI server": (dict(teacher=sampler_url.removesuffix("/v1") + "/health/x"),
                                               "not an OpenAI-compatible server"),
    }
    out = {}
    for i, (name, (kw, fix)) in enumerate(cases.items()):
        run = root / f"bad{i}"
        try:
            distill(_cfg(dirs, run, **kw))
            message = "(accepted)"
        except ValueError as e:
            message = str(e)
        out[name] = {"message": message, "passed": fix in message and "\n" not in message
                     and not (run / "metrics.jsonl").exists()}
    return out


def killed_teacher(dirs, url: str, kill, root: Path) -> dict:
    """The teacher killed after step 2 of 4: the run stops with a checkpoint; resumed on a new server, it ends with
    the losses of an uninterrupted run."""
    def stop_teacher(step, student, m):
        if step == 2:
            kill()

    try:
        distill(_cfg(dirs, root / "killed", teacher=url, steps=4), callbacks=[stop_teacher])
        message = "(did not stop)"
    except TrainingError as e:
        message = str(e)
    fresh = replace_teacher(dirs)
    distill(_cfg(dirs, root / "killed", teacher=fresh.url, steps=4, resume=True))
    distill(_cfg(dirs, root / "straight", teacher=fresh.url, steps=4))
    resumed, straight = _metrics(root / "killed"), _metrics(root / "straight")
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(resumed, straight))
    return {"message": message, "steps": [m["step"] for m in resumed], "max_abs_loss_diff_vs_uninterrupted": diff,
            "passed": "checkpoint at step 2" in message and [m["step"] for m in resumed] == [1, 2, 3, 4]
            and diff < 1e-4}


class _opd_serve:
    """`opd serve MODEL_DIR` in a child process (its own threads, as in use); yields its /v1 URL."""

    def __init__(self, model_dir: str, threads: int):
        self.model_dir, self.threads, self.port = model_dir, threads, free_port()

    def __enter__(self) -> str:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "opd.cli", "serve", self.model_dir, "--port", str(self.port), "--dtype", "float32",
             "--device", "cpu", "--max-logprobs", "20"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return url + "/v1"
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"opd serve {self.model_dir} exited with code {self.process.returncode}")
            time.sleep(0.5)
        raise RuntimeError(f"opd serve {self.model_dir} did not start")

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.process.wait()


def scoring_speed(model_dir: str, vllm_url: str, args: VllmBenchArgs) -> dict:
    """Teacher-scoring tokens/s (tokens scored per second of wall time, median of `repeats` calls) per scorer."""
    vocab = load_tokenizer(model_dir).__len__()
    ids_BL = torch.randint(0, vocab, (args.sequences, args.length), generator=torch.Generator().manual_seed(1))
    ones_BL = torch.ones_like(ids_BL)
    tokens = args.sequences * (args.length - 1)

    def timed(score) -> dict:
        score()  # warm-up: connections, caches, compilation
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            score()
            seconds.append(time.perf_counter() - t0)
        return {"tokens_per_s": tokens / statistics.median(seconds), "seconds": seconds}

    results = {}
    remote = RemoteTeacher(vllm_url, top_k=args.top_k)
    results["vLLM (top-20 over HTTP)"] = timed(lambda: remote.score(ids_BL, ones_BL, ones_BL[:, 1:]))
    with _opd_serve(model_dir, args.threads) as url:
        served = RemoteTeacher(url, top_k=args.top_k)
        results["opd serve (top-20 over HTTP)"] = timed(lambda: served.score(ids_BL, ones_BL, ones_BL[:, 1:]))
    torch.set_num_threads(args.threads)
    local = LocalTeacher(load_model(model_dir, dtype="float32", device="cpu").eval(), with_taken_logp=False)
    results["local teacher (hidden states, in-process)"] = timed(
        lambda: local.score(ids_BL, ones_BL, ones_BL[:, 1:]))
    return {"model": model_dir, "sequences": args.sequences, "length": args.length, "scorers": results}


def other_jobs() -> list[str]:
    """What else was running (other processes using >= 10 % of a core, not this one or its vLLM servers), for reading
    the timings."""
    out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    jobs = []
    for line in out.splitlines()[1:]:
        pid, cpu, args = line.split(None, 2)
        if float(cpu) >= 10.0 and int(pid) != os.getpid() and "vllm" not in args.lower() and "<defunct>" not in args:
            jobs.append(f"{args[:100]} ({cpu} % CPU)")
    return jobs[:8]


def run(args: VllmBenchArgs, quick: bool) -> dict:
    """Every check (and the speed table) against vLLM."""
    from opd.tasks import get_task
    from opd.tasks.tokenizer import build_tokenizer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = build_models(root / "models", build_tokenizer(get_task("arithmetic")))
        servers = shared_servers(dirs)
        teacher, sampler = servers["teacher"].url, servers["student"].url
        checks = {"teacher log-probs, tiny teacher": teacher_logprobs(teacher, dirs["teacher"], 5, tolerance=1e-5),
                  "opd train --teacher vLLM equals opd serve": training_matches_opd_serve(dirs, teacher, root),
                  "student sampler on vLLM with weight reloads": sampler_sync(dirs, teacher, sampler, root),
                  "sampling ignores generation_config.json": generation_config_override(sampler)}
        checks.update({f"bad input: {k}": v for k, v in bad_inputs(dirs, teacher, sampler, root).items()})
        if not quick:
            checks["teacher killed mid-run, resumed"] = killed_teacher(dirs, teacher, servers["teacher"].kill, root)
            from opd.lm.hf.pretrained import smollm2_dir

            smol = str(smollm2_dir())
            # vLLM refuses a prompt of max_model_len tokens even with max_tokens=0: it counts one output token
            with vllm_server(smol, max_model_len=max(MAX_LEN, args.length + 1), threads=args.threads) as server:
                # 30 float32 layers through other kernels (vLLM's CPU attention, fused norms) than Hugging Face's:
                # the first run measured 4.7e-4 at most, with every top-20 id equal (vllm_notes.md)
                checks["teacher log-probs, SmolLM2-135M"] = teacher_logprobs(server.url, smol, args.top_k, 2e-3, 2, 128)
                speed = scoring_speed(smol, server.url, args)
        else:
            speed = scoring_speed(dirs["teacher"], teacher, args)
    return {"vllm": VLLM_VERSION, "quick": quick, "checks": checks,
            "all_passed": all(c["passed"] for c in checks.values()), "speed": speed, "args": asdict(args),
            "other_jobs": other_jobs(), "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores"}


def section(results: dict) -> str:
    lines = ["## opd against a real vLLM server", "",
             f"Command: `opd bench vllm` (vLLM {results['vllm']}, CPU wheel, float32, from the virtualenv "
             f"`opd.lm.remote.vllm.prepare_venv` makes). {results['machine']}; running at the same time: "
             f"{'; '.join(results['other_jobs']) or 'nothing else'}.", "",
             "| check | result | numbers |", "|---|---|---|"]
    for name, c in results["checks"].items():
        numbers = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()
                            if k not in ("passed", "message", "losses_vllm", "sampler_kl"))
        lines.append(f"| {name} | {'passed' if c['passed'] else 'FAILED'} | {numbers} |")
    s = results["speed"]
    lines += ["", f"Teacher scoring, {Path(s['model']).name}: {s['sequences']} sequences of {s['length']} tokens per "
              f"call, {results['args']['threads']} threads per scorer, median of {results['args']['repeats']} "
              "calls:", "",
              "| scorer | tokens/s |", "|---|---|"]
    lines += [f"| {name} | {r['tokens_per_s']:.0f} |" for name, r in s["scorers"].items()]
    return "\n".join(lines + [""])


def main(args: VllmBenchArgs, quick: bool = False) -> dict:
    """Run against vLLM (a plumbing version with --quick) and write the results and the RESULTS.md section."""
    if quick:
        args = VllmBenchArgs(sequences=4, length=64, repeats=1, top_k=5, threads=1)
    results = run(args, quick)
    write("vllm", results, section, quick, RESULTS)
    return results


if __name__ == "__main__":
    tyro.cli(main)
