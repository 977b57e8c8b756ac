"""Each speed/memory lever of the performance benchmark measured on its own, before and after, back to back.

The loss levers (chunk size, the fused divergence of `opd.fused`, no taken-token pass of the teacher), the decoding
head of `opd.lm.hf.decode` and its compiled path are library code now; "before" is how opd ran without them (1024
positions per chunk, autograd, `with_taken_logp=True`, the model's own `lm_head` call, eager decoding).

    python -m benchmarks.perf.lever_bench            # 5-10 minutes on 2 quiet cores
    python -m benchmarks.perf.lever_bench --quick    # plumbing check

Uses the model directories `benchmarks.perf.run` builds under `out_dir`/models (run it first, or pass `--quick` for
random stand-ins). Each measurement is the median of `repeats` alternating runs of the two variants, in process CPU
seconds (robust to other jobs on a shared machine) and wall seconds. Writes `results_dir`/perf_levers.json and
perf_levers.md.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro

from benchmarks.perf import pairs
from opd import losses
from opd.chunked import auto_chunk_size, chunked_divergence
from opd.fused import fused_divergence
from opd.lm.hf.model import final_hidden, lm_head, load_model, load_tokenizer
from opd.lm.batch import encode_prompts, layout
from opd.lm.hf.decode import sample_completions
from opd.lm.teachers.local import LocalTeacher
from opd.tasks import get_task


@dataclass(frozen=True)
class LeverArgs:
    """Lever-by-lever measurements on the benchmark's pairs."""

    quick: bool = False
    """Random stand-in models, one repeat."""
    threads: int = 1
    """torch threads."""
    repeats: int = 3
    """Alternating runs of each variant; the median is reported."""
    tiny_batch: int = 32
    smollm2_batch: int = 4
    smollm2_new_tokens: int = 256
    compile: bool = True
    """Also time compiled sampling (`sample_completions(compile=True)`, tiny student; the first call compiles,
    10-20 s)."""
    out_dir: str = "runs/perf"
    results_dir: str = "benchmarks/results"


def median_seconds(fn, repeats: int) -> tuple[float, float]:
    """(median CPU seconds, median wall seconds) of `fn()`, after one untimed call."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu), statistics.median(wall)


def _compare(name: str, before, after, repeats: int, note: str = "", **extra) -> dict:
    b_cpu, b_wall = median_seconds(before, repeats)
    a_cpu, a_wall = median_seconds(after, repeats)
    row = dict(lever=name, before_cpu_s=b_cpu, after_cpu_s=a_cpu, before_wall_s=b_wall, after_wall_s=a_wall,
               speedup_cpu=b_cpu / a_cpu, note=note, **extra)
    print(f"{name}: {b_cpu:.3f} -> {a_cpu:.3f} CPU s ({row['speedup_cpu']:.2f}x) {note}", flush=True)
    return row


def _hf_generate(model, prompts, pad, eos, max_new_tokens):
    P = max(map(len, prompts))
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    attn = (torch.arange(P)[None, :] >= torch.tensor([P - len(p) for p in prompts])[:, None]).long()
    out = model.eval().generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=True,
                                temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=eos)
    return out[:, P:]


def sampler_levers(model_dir: str, batch: int, new_tokens: int, repeats: int, label: str) -> dict:
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    prompts = encode_prompts(tok, [e.prompt for e in get_task("arithmetic").examples(batch, seed=0, split="train")],
                             1 << 30)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    return _compare(f"sampler ({label}, batch {batch}, {new_tokens} new tokens)",
                    lambda: _hf_generate(model, prompts, pad, eos, new_tokens),
                    lambda: sample_completions(model, prompts, pad, eos, new_tokens), repeats,
                    "HF generate -> opd.lm.hf.decode (KV cache, rows leave at eos, inverse-CDF draw)")


def decode_head_lever(model_dir: str, batch: int, new_tokens: int, repeats: int) -> dict:
    """opd's sampler with the model's own head call (`logits_to_keep=1`) against its decoder + `weight @ hidden.T`."""
    from functools import partial

    from opd.lm.hf import decode as sampler

    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    prompts = encode_prompts(tok, [e.prompt for e in get_task("arithmetic").examples(batch, seed=0, split="train")],
                             1 << 30)
    fast = sampler.next_token_logits

    def with_model_head():
        sampler.next_token_logits = partial(fast, fast_head=False)
        try:
            return sample_completions(model, prompts, tok.pad_token_id, None, new_tokens)
        finally:
            sampler.next_token_logits = fast

    return _compare(f"decoding head (49k-vocabulary student, batch {batch}, {new_tokens} new tokens)",
                    with_model_head, lambda: sample_completions(model, prompts, tok.pad_token_id, None, new_tokens),
                    repeats, "the model's lm_head (F.linear) -> decoder + weight @ hidden.T (opd.lm.hf.decode)")


def loss_levers(models: dict, batch: int, new_tokens: int, repeats: int) -> list[dict]:
    """Teacher scoring and the chunked loss (forward + backward) on one on-policy batch of the 49k pair."""
    tok = load_tokenizer(models["student"])
    student, teacher = load_model(models["student"]), load_model(models["teacher"]).eval()
    prompts = encode_prompts(tok, [e.prompt for e in get_task("arithmetic").examples(batch, seed=0, split="train")],
                             1 << 30)
    torch.manual_seed(0)
    b = layout(prompts, sample_completions(student, prompts, tok.pad_token_id, tok.eos_token_id, new_tokens),
               tok.pad_token_id)
    m = b.mask_BT.bool()
    with torch.no_grad():
        t_hidden_BTD = final_hidden(teacher, b.input_ids_BL, b.attention_mask_BL)[:, :-1]
    t_hidden, t_head, s_head = t_hidden_BTD[m], lm_head(teacher), lm_head(student)
    rows = []

    def opd_loss(divergence, chunk):
        def run():
            s_hidden = final_hidden(student, b.input_ids_BL, b.attention_mask_BL)[:, :-1][m]
            chunked_divergence(divergence, s_hidden, s_head, teacher_hidden_ND=t_hidden, teacher_head=t_head,
                               chunk_size=chunk).mean().backward()
            student.zero_grad(set_to_none=True)
        return run

    def fused_loss(divergence, chunk):
        def run():
            s_hidden = final_hidden(student, b.input_ids_BL, b.attention_mask_BL)[:, :-1][m]
            fused_divergence(divergence, s_hidden, s_head, teacher_hidden_ND=t_hidden, teacher_head=t_head,
                             chunk_size=chunk).mean().backward()
            student.zero_grad(set_to_none=True)
        return run

    def trl_loss(beta):
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def run():  # TRL takes [B, C, D] hidden states of the completion tokens and a completion mask
            s_hidden = final_hidden(student, b.input_ids_BL, b.attention_mask_BL)[:, :-1]
            C = int(b.mask_BT.sum(1).max())
            P = b.input_ids_BL.shape[1] - 1 - C
            loss, _, _ = _chunked_divergence_loss(s_hidden[:, P:], t_hidden_BTD[:, P:], s_head.weight, t_head.weight,
                                                  b.mask_BT[:, P:], beta)
            loss.backward()
            student.zero_grad(set_to_none=True)
        return run

    n = int(m.sum())
    vocab = s_head.weight.shape[0]
    chunk = auto_chunk_size(vocab)
    for name, divergence, beta in (("JSD β=0.5", losses.get_divergence("jsd", beta=0.5), 0.5),
                                   ("reverse KL", losses.reverse_kl, 1.0)):
        rows.append(_compare(f"chunk size 1024 -> {chunk} ({name}, {n} positions, V={vocab})",
                             opd_loss(divergence, 1024), opd_loss(divergence, chunk), repeats,
                             "student forward + chunked divergence (autograd) + backward"))
        rows.append(_compare(f"fused divergence ({name}, chunk {chunk})", opd_loss(divergence, chunk),
                             fused_loss(divergence, chunk), repeats,
                             "opd.chunked (autograd) -> opd.fused (written-out gradient, computed in forward)"))
        rows.append(_compare(f"reference: TRL's chunked loss -> opd ({name})", trl_loss(beta),
                             fused_loss(divergence, None), repeats,
                             "TRL DistillationTrainer's _chunked_divergence_loss on the same hidden states"))

    def teacher_score(with_taken: bool):
        local = LocalTeacher(teacher, with_taken_logp=with_taken)
        return lambda: local.score(b.input_ids_BL, b.attention_mask_BL, b.mask_BT)

    rows.append(_compare("teacher scoring without the taken-token pass", teacher_score(True), teacher_score(False),
                         repeats, "LocalTeacher(with_taken_logp=False), as make_teacher builds it for the "
                         "full-vocabulary losses, which never read taken_logp_BT"))
    # bf16 teacher: speed of the trunk and the head, size of the weights, and how far its log-probs move
    teacher_bf16 = load_model(models["teacher"], dtype="bfloat16").eval()

    @torch.no_grad()
    def score(model):
        h = final_hidden(model, b.input_ids_BL, b.attention_mask_BL)[:, :-1][m]
        return torch.log_softmax(lm_head(model)(h).float(), -1)

    diff = (score(teacher) - score(teacher_bf16)).abs()
    weights_mb = lambda mdl: sum(p.numel() * p.element_size() for p in mdl.parameters()) / 2**20  # noqa: E731
    rows.append(_compare("teacher in bf16 (trunk + full log-probs at completion positions)", lambda: score(teacher),
                         lambda: score(teacher_bf16), repeats,
                         f"weights {weights_mb(teacher):.0f} -> {weights_mb(teacher_bf16):.0f} MB; "
                         f"max |Δ log p| {diff.max().item():.3f}, mean {diff.mean().item():.4f}",
                         weights_mb_before=weights_mb(teacher), weights_mb_after=weights_mb(teacher_bf16)))
    return rows


def step_lever(models: dict, batch: int, new_tokens: int, repeats: int, loss: str = "jsd") -> dict:
    """opd's whole scored step but sampling and the optimizer (teacher scoring, student forward, loss, backward) on
    one on-policy batch of the 49k pair: as opd ran it before the loss levers entered the library, and as now."""
    import opd.fused
    from opd.config import DistillConfig
    from opd.lm.train import student_loss

    tok = load_tokenizer(models["student"])
    student, teacher = load_model(models["student"]), load_model(models["teacher"])
    prompts = encode_prompts(tok, [e.prompt for e in get_task("arithmetic").examples(batch, seed=0, split="train")],
                             1 << 30)
    torch.manual_seed(0)
    b = layout(prompts, sample_completions(student, prompts, tok.pad_token_id, tok.eos_token_id, new_tokens),
               tok.pad_token_id)
    student.train()

    def step(before: bool):
        cfg = DistillConfig(student="-", loss=loss, beta=0.5, chunk_size=1024 if before else None)
        local = LocalTeacher(teacher, chunk_size=cfg.chunk_size, with_taken_logp=before)

        def run():
            signal = local.score(b.input_ids_BL, b.attention_mask_BL, b.mask_BT)
            student_loss(student, b, signal, cfg)[0].backward()
            student.zero_grad(set_to_none=True)

        def run_before():  # the autograd path: opd.fused declines every head
            plain_linear, opd.fused.plain_linear = opd.fused.plain_linear, lambda *a: False
            try:
                run()
            finally:
                opd.fused.plain_linear = plain_linear
        return run_before if before else run

    return _compare(f"opd's scored step, before -> after ({loss}, {int(b.mask_BT.sum())} positions, "
                    f"V={len(tok)})", step(True), step(False), repeats,
                    "teacher scoring + student forward + loss + backward: chunk 1024, autograd, taken-token pass -> "
                    "library defaults")


def compile_lever(model_dir: str, batch: int, new_tokens: int, repeats: int) -> dict:
    """opd's sampler eager (DynamicCache, rows leave at eos) against `compile=True` (one compiled graph per decoding
    step over a static cache); the first compiled call, which compiles, is timed apart."""
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    prompts = encode_prompts(tok, [e.prompt for e in get_task("arithmetic").examples(batch, seed=0, split="train")],
                             1 << 30)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    t0 = time.perf_counter()
    sample_completions(model, prompts, pad, eos, new_tokens, compile=True)
    compile_s = time.perf_counter() - t0
    return _compare(f"compiled sampling (tiny student, batch {batch}, {new_tokens} new tokens)",
                    lambda: sample_completions(model, prompts, pad, eos, new_tokens),
                    lambda: sample_completions(model, prompts, pad, eos, new_tokens, compile=True), repeats,
                    f"opd.lm.hf.decode eager -> compile=True (static cache, forward + draw one graph); first call "
                    f"(compiling) {compile_s:.0f} s", compile_s=compile_s)


def markdown(rows: list[dict], args: LeverArgs) -> str:
    lines = ["### Levers, one at a time", "",
             f"`python -m benchmarks.perf.lever_bench{' --quick' if args.quick else ''}` — {args.threads} thread(s), "
             f"median of {args.repeats} alternating runs; CPU seconds of this process (wall seconds in the JSON).", "",
             "| lever | before (CPU s) | after (CPU s) | speedup | note |", "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['lever']} | {r['before_cpu_s']:.3f} | {r['after_cpu_s']:.3f} | "
                     f"{r['speedup_cpu']:.2f}× | {r['note']} |")
    return "\n".join(lines) + "\n"


def lever_bench(args: LeverArgs) -> list[dict]:
    """Run every lever measurement; write perf_levers.json and perf_levers.md."""
    torch.set_num_threads(args.threads)
    root = Path(args.out_dir) / "models"
    root.mkdir(parents=True, exist_ok=True)
    repeats = 1 if args.quick else args.repeats
    tiny, big = pairs.tiny_pair(root, args.quick), pairs.smollm2_pair(root, args.quick)
    new_tokens = 8 if args.quick else args.smollm2_new_tokens
    rows = [sampler_levers(tiny["student"], args.tiny_batch, 8 if args.quick else 64, repeats, "tiny student"),
            sampler_levers(big["student"], args.smollm2_batch, new_tokens, repeats, "49k-vocabulary student"),
            decode_head_lever(big["student"], args.smollm2_batch, new_tokens, repeats)]
    rows += loss_levers(big, args.smollm2_batch, new_tokens, repeats)
    rows.append(step_lever(big, args.smollm2_batch, new_tokens, repeats))
    if args.compile:
        rows.append(compile_lever(tiny["student"], args.tiny_batch, 8 if args.quick else 64, repeats))
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf_levers.json").write_text(json.dumps({"args": asdict(args), "levers": rows}, indent=1) + "\n")
    (out / "perf_levers.md").write_text(markdown(rows, args))
    return rows


if __name__ == "__main__":
    lever_bench(tyro.cli(LeverArgs))
