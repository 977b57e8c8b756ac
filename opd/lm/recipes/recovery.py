"""Teachers that know how to recover: noisy-prefix (DART-style) data, and a measure of recovery from wrong prefixes.

The task teacher (`opd.lm.recipes.supervised`) was trained on clean worked solutions only, so on a student's prefix that
already holds a wrong digit its next-token distribution need not carry any correction. On-policy distillation grades
exactly those states, so whether the teacher can recover from them matters to it, and not to SFT on teacher samples
(which never visits them). Here:

- `corrupt(example, rng)` turns a worked example into (prompt + its completion up to one wrong digit, the true rest):
  trained on, it teaches a model to ignore the error and finish with the true steps and answer;
- `error_prefixes(model, ...)` cuts a model's own wrong greedy completions just after their first wrong character;
- `continuation_accuracy(teacher, ...)` says how often a model, continuing greedily from such prefixes, still ends
  with the right answer;
- `recovery_teacher(...)` fine-tunes a copy of a teacher on a mix of clean and corrupted examples, cached like the
  task teacher (`<cache root>/arithmetic-teacher-recovery`).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from opd.lm.eval import generate_greedy
from opd.lm.hf.model import load_model, load_tokenizer
from opd.lm.recipes.supervised import load_teacher, save_teacher, train_supervised
from opd.tasks import get_task
from opd.tasks.arithmetic import ANSWER_MARKER
from opd.tasks.base import Example

RECOVERY_VERSION = 1
"""Part of a recovery teacher's cached settings: bump it when the corruption or the training recipe changes."""


def corrupt(example: Example, rng: random.Random) -> Example:
    """`example` with one digit of its worked steps (never the answer) replaced by another digit, as a prompt (the
    original prompt + the completion up to and including the wrong digit) and a completion (the true rest).

    Training on it puts loss only on what follows the error, which is the clean solution's own text: the model learns
    to carry on with the true steps and answer whatever the one wrong digit in its context says.
    """
    steps_end = example.completion.find(ANSWER_MARKER)
    if steps_end < 0:
        raise ValueError(f"not an arithmetic worked example (no {ANSWER_MARKER!r}): {example.completion!r}")
    digits = [i for i, c in enumerate(example.completion[:steps_end]) if c.isdigit()]
    if not digits:
        raise ValueError(f"no digit to corrupt in {example.completion!r}")
    i = rng.choice(digits)
    wrong = rng.choice([d for d in "0123456789" if d != example.completion[i]])
    return Example(prompt=example.prompt + example.completion[:i] + wrong, completion=example.completion[i + 1:],
                   answer=example.answer)


def noisy_mix(examples: list[Example], corrupt_share: float, seed: int) -> list[Example]:
    """`examples` with a share `corrupt_share` of them (chosen by `seed`) replaced by `corrupt`ed versions: the clean
    ones keep the model's clean accuracy, the corrupted ones teach it to recover."""
    if not 0.0 <= corrupt_share <= 1.0:
        raise ValueError(f"corrupt_share must lie in [0, 1], got {corrupt_share}")
    rng = random.Random(f"noisy-mix/{seed}")
    return [corrupt(e, rng) if rng.random() < corrupt_share else e for e in examples]


def error_prefixes(model, tokenizer, examples: list[Example], max_new_tokens: int) -> list[Example]:
    """For each of `examples` that `model` gets wrong greedily: the prompt extended by the model's own completion up
    to and including its first character that differs from the true solution (the true rest as completion). These
    are the states after a first mistake that greedy decoding of this model actually reaches."""
    completions = generate_greedy(model.eval(), tokenizer, [e.prompt for e in examples], max_new_tokens)
    task = get_task("arithmetic")
    out = []
    for e, text in zip(examples, completions):
        if task.is_correct(e, text):
            continue
        i = next((k for k, (a, b) in enumerate(zip(text, e.completion)) if a != b), min(len(text), len(e.completion)))
        if i >= len(text):  # stopped early: the first mistake is the missing text, not a wrong character
            continue
        out.append(Example(prompt=e.prompt + text[:i + 1], completion=e.completion[i + 1:], answer=e.answer))
    return out


def continuation_accuracy(model, tokenizer, prefixed: list[Example], max_new_tokens: int,
                          batch_size: int = 256) -> float:
    """Share of `prefixed` examples (prompt = problem + a prefix) on which `model`, continuing greedily, states the
    right answer. The prefix counts too: an answer already begun in the prefix is read from prefix + continuation."""
    if not prefixed:
        raise ValueError("no prefixes to continue from; draw more problems")
    task = get_task("arithmetic")
    right = 0
    for start in range(0, len(prefixed), batch_size):
        chunk = prefixed[start:start + batch_size]
        texts = generate_greedy(model.eval(), tokenizer, [e.prompt for e in chunk], max_new_tokens)
        # The problem itself ("a+b=") holds no answer marker, so the first one found is in the prefix or continuation.
        right += sum(task.is_correct(e, e.prompt + t) for e, t in zip(chunk, texts))
    return right / len(prefixed)


def recovery_teacher(base_dir: str | Path, out_dir: Path, steps: int, batch_size: int, lr: float,
                     corrupt_share: float, seed: int = 0, progress: bool = True):
    """A copy of the teacher in `base_dir` fine-tuned on training problems of which `corrupt_share` are corrupted
    (`noisy_mix`); saved to (and, with the same settings and base weights, loaded from) `out_dir`.

    Returns (model, tokenizer, info); info["recovery"] holds the settings, info["train_wall_s"] the training time.
    """
    import time

    base_id = hashlib.sha256((Path(base_dir) / "model.safetensors").read_bytes()).hexdigest()[:16]
    settings = dict(version=RECOVERY_VERSION, base=base_id, steps=steps, batch_size=batch_size, lr=lr,
                    corrupt_share=corrupt_share, seed=seed)
    if (out_dir / "info.json").is_file():
        model, tok, info = load_teacher(out_dir)
        if info.get("recovery") == settings:
            return model, tok, info
    model, tokenizer = load_model(str(base_dir)), load_tokenizer(str(base_dir))
    # Problems drawn with a seed of their own: not the students' training prompts (seed 0), not the teacher's draws.
    train = get_task("arithmetic").examples(steps * batch_size, seed=1000 + seed, split="train")
    t0 = time.perf_counter()
    losses = train_supervised(model, tokenizer, noisy_mix(train, corrupt_share, seed), steps, batch_size, lr, seed,
                              progress=progress, desc="recovery teacher")
    info = dict(recovery=settings, final_loss=sum(losses[-20:]) / len(losses[-20:]),
                train_wall_s=round(time.perf_counter() - t0, 1))
    save_teacher(model, tokenizer, info, out_dir)
    return model, tokenizer, info


def sample_match_rate(model, tokenizer, examples: list[Example], max_new_tokens: int, seed: int = 0) -> float:
    """Share of completions sampled at temperature 1 (full vocabulary) that are exactly the true worked solution:
    how close SFT on this model's samples is to SFT on ground truth."""
    import torch

    from opd.lm.eval import prompt_token_ids

    if not examples:
        raise ValueError("sample_match_rate needs at least one example")
    torch.manual_seed(seed)
    batch = tokenizer.pad({"input_ids": prompt_token_ids(tokenizer, [e.prompt for e in examples])},
                          return_tensors="pt")
    with torch.no_grad():
        out_BL = model.eval().generate(**batch, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                       max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out_BL[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(t == e.completion for e, t in zip(examples, texts)) / len(examples)
