"""`opd bench remote_hidden`: the hidden-state remote teacher against top-20 log-probs, through `opd serve`.

An `opd serve` of the teacher (SmolLM2-135M-Instruct, `opd.lm.hf.pretrained.smollm2_dir`; --quick: a tiny random Llama)
runs in a child process on one thread; this process grades the same batches with `RemoteTeacher(top_k=20)`, with
`HiddenStateTeacher` in float32 and float16, and with a local teacher (for reference), also on one thread. Measured:
bytes the server sends per graded (completion) token, the one-off LM head download, graded tokens per second of
`score`, and how far the remote full-vocabulary log-probs are from the local teacher's. Writes
benchmarks/results/remote_hidden.{json,md}.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import tyro

from benchmarks.common.results import RESULTS, write

TOPK, LOCAL = "top-20 log-probs (RemoteTeacher)", "local teacher (reference)"
TEXT = (
    "On-policy distillation trains a small student on its own samples, graded token by token by a larger teacher. "
    "The teacher's grade is a distribution over the whole vocabulary at every position of the student's completion, "
    "and a remote teacher must send it over the network: either the few most likely tokens with their log-probs, or "
    "the hidden state from which the teacher's language-model head computes all of them. The first is small but "
    "approximate, the second exact but as large as the model's hidden size. Which one is cheaper depends on that "
    "size, on the vocabulary, and on how the numbers are written down. "
)


@dataclass(frozen=True)
class RemoteHiddenArgs:
    batches: int = 4
    """Timed batches per teacher (after one warm-up batch)."""
    batch_size: int = 8
    """Sequences per batch."""
    prompt_len: int = 64
    """Prompt tokens per sequence (not graded)."""
    completion_len: int = 64
    """Completion tokens per sequence (graded)."""


class Counting(httpx.HTTPTransport):
    """A real transport that counts the bytes of every answer, by endpoint."""

    def __init__(self):
        super().__init__()
        self.received: dict[str, int] = {}

    def handle_request(self, request):
        response = super().handle_request(request)
        self.received[request.url.path] = self.received.get(request.url.path, 0) + len(response.read())
        return response


def tiny_model(root: Path) -> str:
    """A tiny random Llama with the arithmetic tokenizer (--quick)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from opd.tasks import get_task
    from opd.tasks.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(get_task("arithmetic"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=512))
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    return str(root / "tiny")


def batches(model_dir: str, args: RemoteHiddenArgs) -> list:
    """`args.batches + 1` batches of left-padded prompts and completions cut from TEXT (varying offsets and lengths)."""
    from opd.lm.hf.model import load_tokenizer
    from opd.lm.batch import layout

    ids = load_tokenizer(model_dir)(TEXT * 40)["input_ids"]
    out, start = [], 0
    for _ in range(args.batches + 1):
        prompts, completions = [], []
        for b in range(args.batch_size):
            p, c = args.prompt_len - 3 * b, args.completion_len - 2 * b  # ragged: padding on both sides
            prompts.append(ids[start : start + p])
            completions.append(ids[start + p : start + p + c])
            start = (start + 37) % (len(ids) // 2)
        out.append(layout(prompts, completions, 0))
    return out


def other_jobs() -> list[str]:
    """The processes using the CPU besides this benchmark, as `ps` shows them."""
    lines = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True,
                           text=True).stdout.splitlines()[1:]
    mine = {os.getpid()}
    return [line[:140] for line in lines if line.split()[0].isdigit() and int(line.split()[0]) not in mine
            and float(line.split()[1]) >= 5.0 and " ps " not in f" {line} "][:10]


def start_server(model_dir: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "opd.cli", "serve", model_dir, "--port", str(port),
                             "--dtype", "float32", "--batch-window-ms", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"opd serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("opd serve did not start within 300 s")


def measure(teachers: dict, transports: dict, data: list) -> tuple[dict, dict]:
    """Per teacher: graded tokens per second of `score` and the server's bytes per graded token, and its signals.

    After one warm-up batch each, the teachers take turns batch by batch, so that the other jobs on a shared CPU
    slow them alike."""
    for teacher in teachers.values():
        teacher.score(data[0].input_ids_BL, data[0].attention_mask_BL, data[0].mask_BT)
    before = {name: dict(t.received) for name, t in transports.items()}
    seconds, signals = dict.fromkeys(teachers, 0.0), {name: [] for name in teachers}
    graded = 0
    for batch in data[1:]:
        graded += int(batch.mask_BT.sum())
        for name, teacher in teachers.items():
            start = time.perf_counter()
            signals[name].append(teacher.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT))
            seconds[name] += time.perf_counter() - start
    rows = {}
    for name in teachers:
        rows[name] = {"graded_tokens": graded, "seconds": seconds[name], "tokens_per_s": graded / seconds[name]}
        if name in transports:
            received, old = transports[name].received, before[name]
            sent = {k: v - old.get(k, 0) for k, v in received.items() if v - old.get(k, 0)}
            rows[name].update(bytes_per_graded_token=sum(sent.values()) / graded, bytes_by_endpoint=sent)
    return rows, signals


def full_logp_error(signals: list, local_signals: list, data: list) -> float:
    """Largest |log p_remote - log p_local| over the whole vocabulary at every graded position."""
    worst = 0.0
    for s, ref, batch in zip(signals, local_signals, data[1:]):
        m = batch.mask_BT.bool()
        with torch.no_grad():
            got = s.head(s.hidden_BTD[m]).float().log_softmax(-1)
            want = ref.head(ref.hidden_BTD[m]).float().log_softmax(-1)
        worst = max(worst, float((got - want).abs().max()))
    return worst


def remote_hidden(args: RemoteHiddenArgs, model_dir: str) -> dict:
    from opd.lm.hf.model import load_model
    from opd.lm.remote.teacher import RemoteTeacher
    from opd.lm.remote.hidden import HiddenStateTeacher
    from opd.lm.teachers.local import LocalTeacher

    torch.set_num_threads(1)
    data = batches(model_dir, args)
    jobs_before = other_jobs()
    proc, url = start_server(model_dir)
    try:
        teachers, transports, heads = {}, {}, {}
        transports[TOPK] = Counting()
        teachers[TOPK] = RemoteTeacher(url, top_k=20, transport=transports[TOPK])
        teachers[LOCAL] = LocalTeacher(load_model(model_dir).eval(), with_taken_logp=False)
        for dtype in ("float32", "float16"):
            name = f"hidden states, {dtype} (HiddenStateTeacher)"
            transports[name] = Counting()
            teachers[name] = HiddenStateTeacher(url, dtype=dtype, with_taken_logp=False, transport=transports[name])
            start = time.perf_counter()
            teachers[name].head()
            heads[name] = {"head_download_s": time.perf_counter() - start,
                           "head_bytes": transports[name].received.get("/opd/lm_head", 0)}
        rows, signals = measure(teachers, transports, data)
        for name, head in heads.items():
            rows[name].update(head, max_full_vocab_logp_error=full_logp_error(signals[name], signals[LOCAL], data))
        results = {"teachers": rows}
    finally:
        proc.terminate()
        proc.wait(30)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    results.update(
        args=vars(args), model=str(model_dir), hidden_size=config["hidden_size"], vocab_size=config["vocab_size"],
        machine=f"{platform.machine()} CPU, {os.cpu_count()} cores; server and client on 1 torch thread each",
        other_jobs_before=jobs_before, other_jobs_after=other_jobs())
    return results


def section(results: dict) -> str:
    a = results["args"]
    lines = ["## A full-vocabulary remote teacher: hidden states against top-20 log-probs", "",
             f"Command: `opd bench remote_hidden` (teacher {Path(results['model']).name}: hidden size "
             f"{results['hidden_size']}, vocabulary {results['vocab_size']}; `opd serve` in a child process; "
             f"{a['batches']} batches of {a['batch_size']} sequences, prompts up to {a['prompt_len']} and "
             f"completions up to {a['completion_len']} tokens, the completions graded). {results['machine']}. "
             f"Other jobs on the CPU: {len(results['other_jobs_before'])} before, "
             f"{len(results['other_jobs_after'])} after (listed in remote_hidden.json).", "",
             "| teacher | bytes per graded token | graded tokens/s | LM head, once | max full-vocab log-prob error |",
             "|---|---|---|---|---|"]
    for name, r in results["teachers"].items():
        per_token = f"{r['bytes_per_graded_token']:.0f}" if "bytes_per_graded_token" in r else "—"
        head = f"{r['head_bytes'] / 2**20:.0f} MiB in {r['head_download_s']:.1f} s" if "head_bytes" in r else "—"
        error = f"{r['max_full_vocab_logp_error']:.1e}" if "max_full_vocab_logp_error" in r else "—"
        lines.append(f"| {name} | {per_token} | {r['tokens_per_s']:.0f} | {head} | {error} |")
    return "\n".join(lines + [""])


def main(args: RemoteHiddenArgs, quick: bool = False) -> dict:
    """Measure (a plumbing version on a tiny model with --quick) and write the results and the RESULTS.md section."""
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            args = RemoteHiddenArgs(batches=1, batch_size=2, prompt_len=8, completion_len=6)
            model_dir = tiny_model(Path(tmp))
        else:
            from opd.lm.hf.pretrained import smollm2_dir

            model_dir = str(smollm2_dir())
        results = remote_hidden(args, model_dir)
    write("remote_hidden", results, section, quick, RESULTS)
    return results


if __name__ == "__main__":
    tyro.cli(main)
