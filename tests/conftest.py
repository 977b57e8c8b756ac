"""Tiny models for the LM tests: the arithmetic task's tokenizer, a teacher and a student built from configs."""

import importlib.util

import pytest
import torch

# The test models are tiny: one thread avoids thread start-up costs and contention on small CI machines.
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM

from opd.tasks import get_task
from opd.tasks.tokenizer import build_tokenizer


def tiny_llama(tokenizer, hidden: int, layers: int, seed: int, max_pos: int | None = None) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_pos or tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(get_task("arithmetic"))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """{'teacher': dir, 'student': dir}: randomly initialised tiny Llamas saved as HF directories."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, hidden, layers, seed in (("teacher", 32, 2, 1), ("student", 16, 1, 2)):
        model = tiny_llama(tokenizer, hidden, layers, seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


needs_ifeval = pytest.mark.skipif(importlib.util.find_spec("if_verifiable") is None,
                                  reason="the ifeval extra (if-verifiable) installs on Python >= 3.11 only")
"""For tests of the ifeval checker and the instruction-following prompts (pyproject's `ifeval` extra)."""
