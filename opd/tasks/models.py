"""Small Llama configs for the teacher and the students, and the supervised batch format they train on."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from opd.tasks.base import Example
from opd.tasks.prompts import prompt_token_ids

MODEL_SIZES: dict[str, dict] = {
    "teacher": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    # Three thin layers learned this task faster than two wider ones of about the same size in our runs.
    "student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4),
    # A ladder of students for capacity sweeps, smallest first ("m" is "student").
    "xs": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    "s": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
    "m": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4),
    "l": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4),
}
"""Name -> LlamaConfig fields that set a model's size (the rest come from the tokenizer, see `make_model`)."""


def make_model(size: str, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A freshly initialised fp32 Llama of size `size` (a key of MODEL_SIZES) for `tokenizer`'s vocabulary."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # With a 20-token vocabulary separate output embeddings would cost little, but tying is the small-model norm.
        tie_word_embeddings=True,
        **MODEL_SIZES[size],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def num_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded `prompt + completion + eos` ids, attention mask, and a mask of the completion and eos positions.

    Prompts are tokenized as for generation (`opd.tasks.prompts.prompt_token_ids`: chat template if any), completions
    bare.

    All three are [B, L] tensors: ids and attention mask int64 (as HF tokenizers return them), the
    completion mask bool; it is what a supervised loss counts, after shifting to target coordinates
    (`completion_mask_BL[:, 1:]`).
    """
    if not examples:
        raise ValueError("encode_examples needs at least one example")
    prompt_ids = prompt_token_ids(tokenizer, [e.prompt for e in examples])
    completion_ids = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
    rows = [p + c + [tokenizer.eos_token_id] for p, c in zip(prompt_ids, completion_ids)]
    L = max(len(r) for r in rows)
    if L > tokenizer.model_max_length:
        raise ValueError(f"an example is {L} tokens long, over model_max_length={tokenizer.model_max_length}")
    input_ids_BL = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask_BL = torch.zeros((len(rows), L), dtype=torch.long)
    completion_mask_BL = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, (row, p) in enumerate(zip(rows, prompt_ids)):
        input_ids_BL[i, L - len(row) :] = torch.tensor(row)
        attention_mask_BL[i, L - len(row) :] = 1
        completion_mask_BL[i, L - len(row) + len(p) :] = True
    return input_ids_BL, attention_mask_BL, completion_mask_BL
