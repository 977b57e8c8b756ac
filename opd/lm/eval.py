"""Task accuracy of a causal LM under greedy decoding."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.tasks.base import Example, Task


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text a model is conditioned on for `prompt`: through the chat template if the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
) -> list[str]:
    """Greedy completions of `prompts` (one left-padded batch), decoded from the new tokens only, stopped at eos."""
    if tokenizer.padding_side != "left":
        raise ValueError("generation needs a left-padding tokenizer; set tokenizer.padding_side = 'left'")
    texts = [format_prompt(tokenizer, p) for p in prompts]
    # A chat template already writes any special tokens it wants.
    batch = tokenizer(
        texts, return_tensors="pt", padding=True, add_special_tokens=not getattr(tokenizer, "chat_template", None)
    ).to(model.device)
    out_BL = model.generate(
        **batch,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(out_BL[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: list[Example],
    batch_size: int = 256,
    max_new_tokens: int = 64,
    progress: bool = False,
) -> float:
    """Share of `examples` whose greedy completion `task.is_correct` accepts."""
    if not examples:
        raise ValueError("accuracy needs at least one example")
    was_training = model.training
    model.eval()
    correct = 0
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="accuracy", disable=not progress):
        chunk = examples[start : start + batch_size]
        completions = generate_greedy(model, tokenizer, [e.prompt for e in chunk], max_new_tokens)
        correct += sum(task.is_correct(e, c) for e, c in zip(chunk, completions))
    model.train(was_training)
    return correct / len(examples)
