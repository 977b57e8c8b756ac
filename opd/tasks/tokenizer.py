"""A character-level tokenizer built locally with `tokenizers`, saved as a normal HF tokenizer directory.

One token per character means that tokenizing a prompt and its completion separately and concatenating
the ids gives the same ids as tokenizing the joined text, and that decoding gives the text back exactly.
No special token is added when encoding (as with Qwen2), so prompts and completions can be tokenized
with the default arguments; the end-of-sequence token is appended by whoever builds a training sequence.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from opd.tasks.base import Task

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
MODEL_MAX_LENGTH = 128
"""Longest sequence (prompt + completion + eos) the tokenizer and the models are set up for."""


def build_tokenizer(task: Task, model_max_length: int = MODEL_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character of `task.alphabet` plus pad/bos/eos/unk (ids 0-3), left padding."""
    chars = sorted(set(task.alphabet))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(chars)})
    # BPE without merges splits a string into characters (unknown ones become <unk>); no pre-tokenizer,
    # so spaces are ordinary characters, and Fuse joins the characters back without inserting spaces.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )
