"""Evaluation: task accuracy under greedy decoding, and per-token reverse KL to a teacher on held-out prompts."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.args import EvalArgs  # noqa: F401 (re-exported)
from opd.tasks.base import Example, Task
from opd.tasks.prompts import format_prompt, prompt_token_ids  # noqa: F401 (re-exported)


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
) -> list[str]:
    """Greedy completions of `prompts` (one left-padded batch), decoded from the new tokens only, stopped at eos."""
    return greedy_completions(model, tokenizer, prompt_token_ids(tokenizer, prompts), max_new_tokens)


def accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: list[Example],
    batch_size: int = 256,
    max_new_tokens: int = 64,
    progress: bool = False,
) -> float:
    """Share of `examples` whose greedy completion `task.is_correct` accepts. A task solved with a tool
    (`arithmetic-tools`) is run as conversations with it, `max_new_tokens` per turn; `tool_conversations` also gives
    how its calls went."""
    return tool_conversations(model, tokenizer, task, examples, batch_size, max_new_tokens, progress)["accuracy"]


def tool_conversations(model, tokenizer, task: Task, examples: list[Example], batch_size: int = 256,
                       max_new_tokens: int = 64, progress: bool = False) -> dict:
    """`accuracy` over `examples` and, for a task solved with a tool, `tool_calls` (per example) and
    `tool_call_valid` (the share of calls the tool could carry out)."""
    from opd.lm.rollouts.tools import call_validity, greedy_conversations, task_tool_use

    if not examples:
        raise ValueError("accuracy needs at least one example")
    tools = task_tool_use(task, tokenizer, max_new_tokens)
    was_training = model.training
    model.eval()
    correct, calls, errors = 0, 0, 0
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="accuracy", disable=not progress):
        chunk = examples[start : start + batch_size]
        if tools is None:
            completions = generate_greedy(model, tokenizer, [e.prompt for e in chunk], max_new_tokens)
        else:
            completions, talks = greedy_conversations(model, tokenizer, tools, prompt_token_ids(
                tokenizer, [e.prompt for e in chunk]), rows=list(range(start, start + len(chunk))))
            calls, errors = calls + sum(c.calls for c in talks), errors + sum(c.errors for c in talks)
        correct += sum(task.is_correct(e, c) for e, c in zip(chunk, completions))
    model.train(was_training)
    result = {"accuracy": correct / len(examples)}
    if tools is not None:
        result.update(tool_calls=calls / len(examples), tool_call_valid=call_validity(calls, errors))
    return result


@torch.no_grad()
def greedy_completions(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy completions of already-encoded prompts (one left-padded batch), decoded from the new tokens only."""
    if tokenizer.padding_side != "left":
        raise ValueError("generation needs a left-padding tokenizer; set tokenizer.padding_side = 'left'")
    batch = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt").to(model.device)
    out_BL = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out_BL[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def checked_accuracy(model, tokenizer, prompts, checker, max_new_tokens: int = 64, batch_size: int = 256,
                     progress: bool = False, samples: list[dict] | None = None, tools=None) -> float:
    """Mean score `checker(row, completion)` over a `PromptSet` (`opd.lm.data.prompts`), completions decoded
    greedily. `samples`: a list that gets each row's prompt, answer (if any), completion and score, in order.
    `tools`: a `ToolUse` (`opd.lm.rollouts.tools`); the completion is then the whole conversation after the prompt
    (the model's turns and the tool's answers), and each sample also says how many calls it made and how many failed."""
    from opd.lm.data.checkers import score

    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="evaluate", disable=not progress):
            stop = start + batch_size
            extra = [{}] * len(prompts.rows[start:stop])
            if tools is None:
                completions = greedy_completions(model, tokenizer, prompts.prompt_ids[start:stop], max_new_tokens)
            else:
                from opd.lm.rollouts.tools import greedy_conversations

                completions, talks = greedy_conversations(model, tokenizer, tools, prompts.prompt_ids[start:stop],
                                                          rows=list(range(start, stop)))
                extra = [{"tool_calls": c.calls, "tool_call_errors": c.errors} for c in talks]
            scores = score(checker, prompts.rows[start:stop], completions)
            total += sum(scores)
            if samples is not None:
                samples.extend({"prompt": row["prompt"], **({"answer": row["answer"]} if "answer" in row else {}),
                                "completion": c, "score": v, **more}
                               for row, c, v, more in zip(prompts.rows[start:stop], completions, scores, extra,
                                                          strict=True))
    finally:
        model.train(was_training)
    return total / len(prompts)


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
    from opd.lm.batch import encode_prompts

    ids = encode_prompts(tokenizer, prompts, max_prompt_len=1 << 30)
    return heldout_reverse_kl_ids(student, teacher, tokenizer, ids, max_new_tokens, batch_size, temperature, seed,
                                  chunk_size)


@torch.no_grad()
def heldout_reverse_kl_ids(student, teacher, tokenizer, ids: list[list[int]], max_new_tokens: int = 64,
                           batch_size: int = 64, temperature: float = 1.0, seed: int = 0,
                           chunk_size: int | None = None) -> float:
    """`heldout_reverse_kl` over already-encoded prompts (a `PromptSet`'s `prompt_ids`)."""
    from opd.chunked import chunked_divergence
    from opd.lm.hf.model import final_hidden, lm_head
    from opd.lm.rollouts.local import sample
    from opd.losses import reverse_kl

    was_training = student.training
    student.eval()
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


def eval_main(args: EvalArgs) -> dict:
    """`opd eval`: print held-out accuracy (greedy) and, with a teacher, the per-token reverse KL to it. MODEL may be
    a model directory, a hub id, a checkpoint (LoRA ones too) or an `opd train` run directory (its checkpoint)."""
    from opd.lm.hf.model import library_bars

    with library_bars(True):  # datasets' bars for reading a small file say nothing
        return _evaluate(args)


def eval_tools(args: EvalArgs, tokenizer, context: int):
    """The tool conversations `opd eval` holds: --tools, else the task's own tool (with its own turn limits) when no
    --data replaces it."""
    from opd.lm.rollouts.tools import ToolUse, task_tool_use
    from opd.tasks import get_task

    if args.tools is not None:
        return ToolUse.build(args.tools, tokenizer, args.max_turns, args.max_new_tokens, context)
    return task_tool_use(get_task(args.task), tokenizer, args.max_new_tokens) if args.data is None else None


def _evaluate(args: EvalArgs) -> dict:
    import json

    from opd.lm.data.checkers import check_columns, get_checker, try_checker
    from opd.lm.data.prompts import encode, load_rows, task_rows
    from opd.lm.hf.model import check_same_vocabulary, context_length, load_model, load_tokenizer, run_checkpoint
    from opd.tasks import get_task
    from opd.threads import set_threads

    if min(args.examples, args.max_new_tokens, args.max_turns) < 1:
        raise ValueError(f"--examples, --max-new-tokens and --max-turns must be >= 1, got {args.examples}, "
                         f"{args.max_new_tokens} and {args.max_turns}")
    set_threads(args.threads)
    for out in (args.out_json, args.samples):  # their folders now, not after the whole evaluation has run
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
    if args.data is not None:
        rows, spec = load_rows(args.data, args.data_split, args.data_fields, "--data"), args.checker
        if spec is None:
            raise ValueError("--data needs a --checker to score completions: exact | numeric | regex:PATTERN | ifeval "
                             "| module:function")
    else:
        rows, spec = task_rows(get_task(args.task), args.examples, "test"), args.checker or f"task:{args.task}"
    rows = rows.select(range(min(len(rows), args.examples)))
    check_columns(spec, rows.column_names, "--data")
    checker = get_checker(spec)
    if len(rows):  # your checker on one row now, in one line, rather than a traceback after generating
        try_checker(checker, rows[0], "--data" if args.data is not None else f"task {args.task}")
    model_dir = run_checkpoint(args.model)  # a run directory: its checkpoint
    tokenizer = load_tokenizer(model_dir)
    prompts = encode(tokenizer, rows, context_length(model_dir) - args.max_new_tokens, "--data")
    from opd.lm.rollouts.tools import call_validity

    tools = eval_tools(args, tokenizer, context_length(model_dir))  # a tool that does not import: before the weights
    model = load_model(model_dir)
    samples: list[dict] = []
    result = {"model": args.model, "data": args.data or f"task:{args.task}", "checker": spec, "examples": len(prompts),
              "accuracy": checked_accuracy(model, tokenizer, prompts, checker, args.max_new_tokens, progress=True,
                                           samples=samples, tools=tools)}
    if tools is not None:
        calls, errors = sum(s["tool_calls"] for s in samples), sum(s["tool_call_errors"] for s in samples)
        result.update(tools=tools.name, tool_calls=calls / len(samples), tool_call_valid=call_validity(calls, errors))
    for row in samples[:args.show]:  # a few, to see what the checker saw (stderr: stdout is the JSON result)
        print(f"score {row['score']:g} | {row['prompt']!r} -> {row['completion']!r}", file=sys.stderr)
    if args.samples:
        Path(args.samples).write_text("".join(json.dumps(row) + "\n" for row in samples))
    if args.teacher:
        teacher = load_model(args.teacher)
        check_same_vocabulary(model, teacher, tokenizer, load_tokenizer(args.teacher))
        result["teacher"] = args.teacher
        result["reverse_kl"] = heldout_reverse_kl_ids(model, teacher, tokenizer, prompts.prompt_ids,
                                                      args.max_new_tokens, seed=args.seed)
    print(json.dumps(result))
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(result, f, indent=2)
    return result
