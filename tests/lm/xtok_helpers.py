"""Tokenizers for the cross-tokenizer tests: character-level, byte-level BPE, and two different chat templates."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


def char_tokenizer(chars: str) -> PreTrainedTokenizerFast:
    """One token per character of `chars`, plus the task tokenizer's special tokens (ids 0-3)."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"])}
    vocab.update({c: len(vocab) + i for i, c in enumerate(sorted(set(chars)))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", clean_up_tokenization_spaces=False,
                                   pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def byte_bpe(texts: list[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained on `texts`: multi-byte characters are split across tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>",
                                   clean_up_tokenization_spaces=False)


def chat_tokenizers():
    """(student, teacher): character tokenizers over printable ASCII with different chat templates."""
    text = "".join(chr(i) for i in range(32, 127)) + "\n"
    student, teacher = char_tokenizer(text), char_tokenizer(text)
    student.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    teacher.chat_template = ("{% for m in messages %}[{{ m['role'] | upper }}]: {{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}[ASSISTANT]: {% endif %}")
    return student, teacher
