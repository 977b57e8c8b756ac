"""A second tokenizer for a task: byte-pair encoding trained on the task's own text, for cross-tokenizer tests.

Paired with the task's character-level tokenizer (`opd.tasks.tokenizer`), it splits the same text differently:
merges such as "+0" or "s=" cross the characters' boundaries, so a character-level teacher and a BPE student
disagree on where tokens end. No pre-tokenizer, so merges may also cross spaces; the Fuse decoder joins tokens
without adding spaces, so decoding gives the text back exactly.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, trainers
from transformers import PreTrainedTokenizerFast

from opd.tasks.base import Task
from opd.tasks.tokenizer import MODEL_MAX_LENGTH, SPECIAL_TOKENS


def build_bpe_tokenizer(task: Task, vocab_size: int = 64, examples: int = 2000,
                        model_max_length: int = MODEL_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """A BPE tokenizer of `vocab_size` tokens (the same special tokens, ids 0-3, as the character-level one) trained
    on `examples` of the task's training split (prompts and completions). Deterministic."""
    special = list(SPECIAL_TOKENS.values())
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=sorted(set(task.alphabet)), show_progress=False)
    texts = [e.prompt + e.completion for e in task.examples(examples, seed=0, split="train")]
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length, padding_side="left",
                                   clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)
