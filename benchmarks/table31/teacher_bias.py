"""Teacher bias (MISSION row 15): a teacher with one planted systematic error, and whose answers a student adopts.

The planted error: the carry out of a column whose digits (plus incoming carry) sum to exactly 10 is dropped, so
`5+5+0=10` is followed by `...+0=` in the next column instead of `...+1=`. It is a consistent rule, not noise: the
teacher writes a well-formed worked solution with a wrong answer, and only on problems that have such a column
before the last one (the last column's carry is written out in full, so nothing is dropped there).

`plant_bias` fine-tunes a copy of the good teacher on solutions written with that rule; `answer_agreement` then says,
on the problems the rule affects, how often a model's answer is the true one, the biased teacher's, or neither.
"""

from __future__ import annotations

import re
from pathlib import Path

from opd.lm.eval import generate_greedy
from opd.tasks.arithmetic import ANSWER_MARKER, solve
from opd.tasks.base import Example
from opd.lm.recipes.supervised import load_teacher, save_teacher, train_supervised

RULE = "the carry out of a column that sums to exactly 10 is dropped (written 0)"
_PROMPT_RE = re.compile(r"^(\d+)\+(\d+)=$")
_ANSWER_RE = re.compile(re.escape(ANSWER_MARKER) + r"(\d+)")


def solve_biased(a: int, b: int) -> Example:
    """The worked example for `a + b` written with the planted error (see module docstring)."""
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    carry, steps, written = 0, [], []
    for i in range(max(len(digits_a), len(digits_b))):
        x = int(digits_a[i]) if i < len(digits_a) else 0
        y = int(digits_b[i]) if i < len(digits_b) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total:02d}")
        written.append(total)
        carry = 0 if total == 10 else total // 10
    # The answer is read back from the steps, as the correct procedure does: the last sum in full, then the units.
    answer = str(int(str(written[-1]) + "".join(str(t % 10) for t in reversed(written[:-1]))))
    return Example(prompt=f"{a}+{b}=", completion=" ".join(steps) + f" {ANSWER_MARKER}{answer}", answer=answer)


def biased_version(example: Example) -> Example:
    """`example` (an arithmetic problem) solved with the planted error."""
    match = _PROMPT_RE.match(example.prompt)
    if match is None:
        raise ValueError(f"not an arithmetic prompt of the form 'a+b=': {example.prompt!r}")
    return solve_biased(int(match.group(1)), int(match.group(2)))


def affected(examples: list[Example]) -> list[tuple[Example, Example]]:
    """(truth, biased) pairs of the problems whose biased answer differs from the true one."""
    pairs = [(e, biased_version(e)) for e in examples]
    return [(e, b) for e, b in pairs if b.answer != e.answer]


def plant_bias(
    teacher, tokenizer, train: list[Example], steps: int, batch_size: int, lr: float, seed: int, out_dir: Path,
    base_id: str, progress: bool = True,
):
    """Fine-tune `teacher` (in place) on `train` rewritten with the planted error; cache it in `out_dir`.

    Returns (model, tokenizer, info). A directory that already holds a teacher planted with the same settings from
    the same base teacher (`base_id`, e.g. a hash of its weights) is loaded instead of training again.
    """
    settings = dict(rule=RULE, base=base_id, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                    train_examples=len(train))
    if (out_dir / "info.json").is_file():
        model, tok, info = load_teacher(out_dir)
        if info.get("bias") == settings:
            return model, tok, info
    losses = train_supervised(teacher, tokenizer, [biased_version(e) for e in train], steps, batch_size, lr, seed,
                              progress=progress, desc="plant bias")
    info = dict(bias=settings, final_loss=sum(losses[-20:]) / len(losses[-20:]))
    save_teacher(teacher, tokenizer, info, out_dir)
    return teacher, tokenizer, info


def answer_agreement(model, tokenizer, pairs: list[tuple[Example, Example]], max_new_tokens: int) -> dict:
    """On affected problems: the shares of greedy answers equal to the truth, to the biased teacher's, or neither."""
    if not pairs:
        raise ValueError("no affected problems to measure agreement on; draw more held-out problems")
    was_training = model.training
    completions = generate_greedy(model.eval(), tokenizer, [t.prompt for t, _ in pairs], max_new_tokens)
    model.train(was_training)
    truth = teacher = 0
    for (t, b), text in zip(pairs, completions):
        match = _ANSWER_RE.search(text)
        answer = match.group(1) if match else None
        truth += answer == t.answer
        teacher += answer == b.answer
    n = len(pairs)
    return {"truth": truth / n, "teacher": teacher / n, "neither": (n - truth - teacher) / n, "n": n}
