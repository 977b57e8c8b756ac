"""Tiny models for the LM tests: the arithmetic task's tokenizer, a teacher and a student built from configs."""

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


def tiny_gpt2(tokenizer, hidden: int, layers: int, seed: int):
    """A tiny GPT-2: learned absolute position embeddings, so wrong position ids under left padding change its
    numbers (a rotary Llama is blind to a constant shift of every position). Initialised wider than GPT-2's 0.02 so
    that its greedy completions vary from prompt to prompt and position to position."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=hidden, n_layer=layers, n_head=2, initializer_range=0.5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout, as the tiny Llamas: train mode = eval mode
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(cfg)


def pytest_collection_modifyitems(config, items):
    """Whole directories and markers that are slow by nature join the `slow` tier (pyproject's markers say what it
    is): every benchmark's --quick run (tests/benchmarks) and every test against a real vLLM server."""
    for item in items:
        if "benchmarks" in item.path.parts or item.get_closest_marker("vllm"):
            item.add_marker(pytest.mark.slow)


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

