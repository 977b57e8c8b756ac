"""Aligning two tokenizations of the same text, and the events two vocabularies can be compared on.

Spans. The student's sampled tokens are decoded to text; the teacher's tokenizer encodes that text again (it must
decode back to the same text, or alignment stops with one line). Each side's token boundaries are found by
incremental decoding (`char_ends`: the text decoded from the first k tokens; a token that ends inside a character,
such as a byte-level token holding half of a UTF-8 sequence, has no boundary). `align_spans` cuts the text at every
offset where both sides have a boundary: each span is the shortest piece of text that both tokenizations cover with
whole tokens, so the two sides' tokens of a span spell exactly the same text.

Events. `vocabulary_events` partitions each vocabulary into events both models can be compared on: a token whose
text the other vocabulary also has is the event of that text; any other token joins the event of the longest prefix
of its text that both vocabularies have (with a character-level vocabulary on one side that is its first
character); a token with no such prefix, or no text (half a UTF-8 sequence), falls into one `other` event. Special
tokens match by their content; both end-of-sequence tokens are one event.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.tasks.prompts import chat_token_ids, text_token_ids

OTHER = 0
"""Event id of the tokens that match nothing in the other vocabulary."""


_EOS, _SPECIAL = "\0eos", "\0special:"


@dataclass(frozen=True)
class Events:
    """A common partition of two vocabularies (see the module docstring)."""

    student_V: torch.Tensor
    """Event id of every student token id (rows of the student's LM head)."""
    teacher_V: torch.Tensor
    """Event id of every teacher token id."""
    names: list[str]
    """Each event's text (index = event id; `OTHER` first)."""

    @property
    def num_events(self) -> int:
        return len(self.names)


def token_texts(tokenizer, vocab_size: int) -> list[str | None]:
    """Each id's text as it reads inside decoded text, for the `vocab_size` rows of a model's head; None for ids the
    tokenizer lacks (padding rows of the head) and for tokens that decode to no whole character."""
    n = min(vocab_size, len(tokenizer))
    texts: list[str | None] = list(tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False))
    texts += [None] * (vocab_size - n)
    specials = set(tokenizer.all_special_ids)
    for i in range(n):
        if i == tokenizer.eos_token_id:
            texts[i] = _EOS
        elif i in specials:
            texts[i] = _SPECIAL + tokenizer.convert_ids_to_tokens(i)
        elif not texts[i] or "\ufffd" in texts[i]:
            texts[i] = None
    return texts


def vocabulary_events(student_tok, teacher_tok, student_vocab: int, teacher_vocab: int) -> Events:
    """The events of `student_tok` and `teacher_tok` (heads of `student_vocab` and `teacher_vocab` rows)."""
    s_texts, t_texts = token_texts(student_tok, student_vocab), token_texts(teacher_tok, teacher_vocab)
    shared = sorted((set(s_texts) & set(t_texts)) - {None})
    names = ["<other>", *shared]
    index = {text: i for i, text in enumerate(names) if i != OTHER}

    def event(text: str | None) -> int:
        if text is None:
            return OTHER
        if text in index:
            return index[text]
        if text.startswith("\0"):  # a special token the other side lacks: no text prefix means anything
            return OTHER
        for end in range(len(text) - 1, 0, -1):  # the longest shared prefix
            if text[:end] in index:
                return index[text[:end]]
        return OTHER

    return Events(torch.tensor([event(t) for t in s_texts]), torch.tensor([event(t) for t in t_texts]), names)


def char_ends(tokenizer, ids: list[int], text: str, who: str) -> list[int | None]:
    """The text offset where each token ends (decoding tokens 0..k), or None where the text decoded so far is not a
    prefix of `text` (the token ends inside a character). One line if all of `ids` do not decode to `text`."""
    prefixes = tokenizer.batch_decode([ids[:k + 1] for k in range(len(ids))], clean_up_tokenization_spaces=False)
    if prefixes and prefixes[-1] != text:
        raise ValueError(f"the {who} tokenizer cannot align by text: its tokens decode to {prefixes[-1]!r}, not "
                         f"{text!r}; --cross-tokenizer needs tokenizers whose decoding gives the text back")
    return [len(p) if text.startswith(p) else None for p in prefixes]


def retokenize(tokenizer, text: str) -> list[int]:
    """`text` in the teacher's tokens (no special tokens); one line if they do not decode back to `text`."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    back = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    if back != text:
        raise ValueError(f"the teacher tokenizer cannot round-trip the student's text: {text!r} encodes and decodes "
                         f"to {back!r}; --cross-tokenizer needs a teacher tokenizer that gives text back unchanged")
    return ids


def align_spans(student_ends: list[int | None], teacher_ends: list[int | None], length: int
                ) -> list[tuple[int, int, int, int]]:
    """Spans (s_start, s_stop, t_start, t_stop) of token indices between consecutive common boundaries.

    Tokens that decode to no text (an offset equal to the previous one) join the span before the boundary; a text
    of length 0 has no spans.
    """
    def boundaries(ends):
        at = {0: 0}
        for k, end in enumerate(ends):
            if end is not None and end > 0:
                at[end] = k + 1  # the last token that reaches this offset
        return at

    s_at, t_at = boundaries(student_ends), boundaries(teacher_ends)
    common = sorted(set(s_at) & set(t_at))
    if length and common[-1] != length:
        raise ValueError(f"token boundaries do not reach the end of the text ({common[-1]} of {length} characters)")
    return [(s_at[a], s_at[b], t_at[a], t_at[b]) for a, b in zip(common, common[1:])]


def teacher_prompt_ids(teacher_tok, row: dict) -> list[int]:
    """A prompt row rendered by the *teacher's* tokenizer, as `opd.lm.data.prompts.encode` renders it for the
    student: chat `messages` through the teacher's chat template (a final assistant turn that became the completion is
    left out), plain `prompt` text as one user turn through its template, or bare with its special tokens if it has
    none."""
    messages = row.get("messages")
    if messages:
        messages = list(messages)
        if messages[-1].get("role") == "assistant" and row.get("completion") == messages[-1].get("content"):
            messages.pop()
        if not getattr(teacher_tok, "chat_template", None):
            raise ValueError("the prompts are chat 'messages' but the teacher's tokenizer has no chat template; give "
                             "plain 'prompt' text for a cross-tokenizer teacher without one")
        return chat_token_ids(teacher_tok, messages)
    return text_token_ids(teacher_tok, row["prompt"])
