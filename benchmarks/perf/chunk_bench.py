"""The loss step of opd on its own: how long the divergence takes, by chunk size, vocabulary and code path.

    python -m benchmarks.perf.chunk_bench            # about 10 minutes on one quiet core
    python -m benchmarks.perf.chunk_bench --quick    # plumbing check

One step's loss part at the SmolLM2 pair's sizes (student hidden 256 with a tied head, teacher hidden 576), on random
hidden states (the trunks are not part of what changes here): the divergence's forward and backward through
`opd.chunked.chunked_divergence` (autograd) and `opd.fused.fused_divergence` (written-out gradient), for a range of
chunk sizes at each vocabulary size, and the teacher's taken-token pass that `LocalTeacher` now skips for the
full-vocabulary losses. Process CPU seconds, median of `repeats`, `threads` torch threads. This is what
`opd.chunked.CHUNK_ELEMENTS` was chosen from. Writes `results_dir`/perf_chunks.json and perf_chunks.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro

from benchmarks.perf.lever_bench import median_seconds
from opd import losses
from opd.chunked import auto_chunk_size, chunked_divergence, chunked_taken_logp
from opd.fused import fused_divergence


@dataclass(frozen=True)
class ChunkArgs:
    """Chunk sizes and code paths of the loss, at several vocabulary sizes."""

    quick: bool = False
    """Small sizes, one repeat."""
    threads: int = 1
    positions: int = 1024
    """Completion positions in the step (batch 4 × 256 new tokens at the SmolLM2 pair)."""
    vocabs: tuple[int, ...] = (20, 4096, 49152, 151936)
    """Vocabulary sizes: the arithmetic task's characters, a small BPE, SmolLM2, Qwen."""
    chunk_sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
    repeats: int = 3
    loss: str = "jsd"
    """`jsd` (β = 0.5) or `reverse_kl`."""
    results_dir: str = "benchmarks/results"


def _problem(vocab: int, positions: int):
    g = torch.Generator().manual_seed(0)
    student_head = torch.nn.Linear(256, vocab, bias=False)
    teacher_head = torch.nn.Linear(576, vocab, bias=False).requires_grad_(False)
    with torch.no_grad():  # logits with a spread of a few units, as from trained models
        student_head.weight.copy_(torch.randn(vocab, 256, generator=g) * 0.2)
        teacher_head.weight.copy_(torch.randn(vocab, 576, generator=g) * 0.15)
    hidden = torch.randn(positions, 256, generator=g).requires_grad_()
    return student_head, teacher_head, hidden, torch.randn(positions, 576, generator=g)


def loss_step(path: str, divergence, problem, chunk_size: int | None):
    """Forward + backward of the divergence over all positions, as `opd.lm.train.student_loss` runs it."""
    student_head, teacher_head, hidden, teacher_hidden = problem
    fn = fused_divergence if path == "fused" else chunked_divergence

    def run():
        fn(divergence, hidden, student_head, teacher_hidden_ND=teacher_hidden, teacher_head=teacher_head,
           chunk_size=chunk_size).mean().backward()
        hidden.grad = student_head.weight.grad = None
    return run


def chunk_bench(args: ChunkArgs) -> dict:
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    positions = 64 if args.quick else args.positions
    vocabs = (20, 4096) if args.quick else args.vocabs
    divergence = losses.get_divergence("jsd", beta=0.5) if args.loss == "jsd" else losses.reverse_kl
    rows = []
    for vocab in vocabs:
        n = positions if vocab < 100_000 else positions // 4  # the largest vocabulary on fewer positions
        problem = _problem(vocab, n)
        auto = min(n, auto_chunk_size(vocab))
        sizes = sorted({c for c in args.chunk_sizes if c < n} | {n, auto})
        for path in ("autograd", "fused"):
            for c in sizes if path == "fused" or vocab <= 49152 else [auto]:
                s = median_seconds(loss_step(path, divergence, problem, c), repeats)[0]
                rows.append(dict(vocab=vocab, positions=n, path=path, chunk_size=c, auto=c == auto, cpu_s=s))
                print(f"V={vocab} N={n} {path} chunk {c}: {s:.3f} s", flush=True)
        with torch.no_grad():
            _, teacher_head, _, teacher_hidden = problem
            targets = torch.randint(0, vocab, (n,))
            s = median_seconds(lambda: chunked_taken_logp(teacher_hidden, teacher_head, targets), repeats)[0]
        rows.append(dict(vocab=vocab, positions=n, path="teacher taken-token pass", chunk_size=None, auto=True,
                         cpu_s=s))
        print(f"V={vocab} teacher taken-token pass: {s:.3f} s", flush=True)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": asdict(args), "rows": rows}
    (out / "perf_chunks.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "perf_chunks.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    args = result["args"]
    lines = ["### The loss step by chunk size", "",
             f"`python -m benchmarks.perf.chunk_bench{' --quick' if args['quick'] else ''}` — {args['threads']} "
             f"thread(s), {args['loss']}, divergence forward + backward from hidden states (student 256 wide with a "
             f"tied head, teacher 576), CPU seconds, median of {args['repeats']}. **Bold**: the default chunk size "
             f"(`opd.chunked.auto_chunk_size`).", "",
             *([result["note"] + ".", ""] if result.get("note") else []),
             "| vocab | positions | path | chunk size | CPU s |", "|---:|---:|---|---:|---:|"]
    for r in result["rows"]:
        c = "—" if r["chunk_size"] is None else (f"**{r['chunk_size']}**" if r["auto"] else str(r["chunk_size"]))
        lines.append(f"| {r['vocab']} | {r['positions']} | {r['path']} | {c} | {r['cpu_s']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    chunk_bench(tyro.cli(ChunkArgs))
