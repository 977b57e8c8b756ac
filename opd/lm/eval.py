"""Evaluation: task accuracy under greedy decoding, and per-token reverse KL to a teacher on held-out prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import tyro
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


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as the model sees it: through the chat template if there is one (which writes
    any special tokens itself), else with whatever special tokens the tokenizer adds (none for ours)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    texts = [format_prompt(tokenizer, p) for p in prompts]
    return tokenizer(texts, add_special_tokens=not has_template)["input_ids"]


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
    batch = tokenizer.pad({"input_ids": prompt_token_ids(tokenizer, prompts)}, return_tensors="pt").to(model.device)
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


@torch.no_grad()
def heldout_reverse_kl(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    chunk_size: int | None = None,
) -> float:
    """Mean per-token KL(student ‖ teacher) over completions the student samples for `prompts` (exact, full vocabulary).

    This is the quantity on-policy distillation minimises, measured on held-out prompts: 0 means the student's
    next-token distribution equals the teacher's at every state it visits.
    """
    from opd.chunked import chunked_divergence
    from opd.lm.model import final_hidden, lm_head
    from opd.lm.rollout import encode_prompts, sample
    from opd.losses import reverse_kl

    was_training = student.training
    student.eval()
    ids = encode_prompts(tokenizer, prompts, max_prompt_len=1 << 30)
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    total, count = 0.0, 0
    try:
        for start in range(0, len(ids), batch_size):
            b = sample(student, ids[start : start + batch_size], tokenizer.pad_token_id, tokenizer.eos_token_id,
                       max_new_tokens, temperature)
            b = b.to(next(student.parameters()).device)
            m = b.mask_BT.bool()
            s_hidden = final_hidden(student, b.input_ids_BL, b.attention_mask_BL)[:, :-1][m]
            t_hidden = final_hidden(teacher, b.input_ids_BL, b.attention_mask_BL)[:, :-1][m]
            kl_N = chunked_divergence(reverse_kl, s_hidden, lm_head(student), teacher_hidden_ND=t_hidden,
                                      teacher_head=lm_head(teacher), chunk_size=chunk_size)
            total += kl_N.sum().item()
            count += kl_N.numel()
    finally:
        torch.set_rng_state(generator_state)
        student.train(was_training)
    return total / max(count, 1)


@dataclass(frozen=True)
class EvalArgs:
    """Evaluate a model on a task's held-out split (and against a teacher, if given)."""

    model: tyro.conf.Positional[str]
    """The model to evaluate: hub id or local directory (e.g. runs/opd/checkpoint)."""
    teacher: str | None = None
    """If set, also report the mean per-token reverse KL KL(model ‖ teacher) on the model's own samples."""
    task: str = "arithmetic"
    """Task whose held-out ("test") split is used."""
    examples: int = 500
    """Number of held-out problems."""
    max_new_tokens: int = 64
    """Longest completion."""
    seed: int = 0
    """Seed of the sampling for the KL estimate (accuracy is greedy)."""
    out_json: str | None = None
    """Also write the numbers to this JSON file."""


def eval_main(args: EvalArgs) -> dict:
    """`opd eval`: print held-out accuracy (greedy) and, with a teacher, the per-token reverse KL to it."""
    import json

    from opd.lm.model import load_model, load_tokenizer
    from opd.tasks import get_task

    task = get_task(args.task)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    test = task.examples(args.examples, seed=0, split="test")
    result = {"model": args.model, "task": args.task, "examples": len(test),
              "accuracy": accuracy(model, tokenizer, task, test, max_new_tokens=args.max_new_tokens, progress=True)}
    if args.teacher:
        from opd.lm.train import check_same_vocabulary

        teacher = load_model(args.teacher)
        check_same_vocabulary(model, teacher, tokenizer, load_tokenizer(args.teacher))
        result["teacher"] = args.teacher
        result["reverse_kl"] = heldout_reverse_kl(model, teacher, tokenizer, [e.prompt for e in test],
                                                  args.max_new_tokens, seed=args.seed)
    print(json.dumps(result))
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(result, f, indent=2)
    return result
