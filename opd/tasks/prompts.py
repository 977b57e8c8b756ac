"""How a task's prompt text becomes the tokens a model is conditioned on: the same for training and for generation.

Pure tokenizer functions, kept on the task side so that the supervised batches (`opd.tasks.models`) and evaluation
(`opd.lm.eval`) share them without the task side importing the LM side.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text a model is conditioned on for `prompt`: through the chat template if the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt


def chat_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of a chat, rendered with the tokenizer's chat template and a generation prompt."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def text_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of one prompt text: a single user turn through the chat template if the tokenizer has one, else the
    text with whatever special tokens the tokenizer adds."""
    if getattr(tokenizer, "chat_template", None):
        return chat_token_ids(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as the model sees it: through the chat template if there is one (which writes
    any special tokens itself), else with whatever special tokens the tokenizer adds (none for ours)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    texts = [format_prompt(tokenizer, p) for p in prompts]
    return tokenizer(texts, add_special_tokens=not has_template)["input_ids"]
