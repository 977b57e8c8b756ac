"""What a `DistillConfig` names, built: the teacher, the prompt sets and their checker, and the actor.

Kept apart from the loop (`opd.lm.train`) so the loop reads top to bottom, and so evaluation can check vocabularies
without importing the loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opd import losses
from opd.config import DistillConfig, teacher_specs
from opd.lm.data.prompts import PromptSet, as_rows, encode, load_rows, task_rows
from opd.lm.hf.model import (check_same_vocabulary, context_length, load_model, load_tokenizer, tokenizer_differences,
                              unwrap)
from opd.lm.rollouts.actors import Actor, Ahead, DataActor, LocalActor, Mixture, Plans, SamplerActor
from opd.lm.rollouts.tools import ToolActor, ToolUse, load_tool
from opd.lm.teachers.base import Teacher
from opd.lm.teachers.local import LocalTeacher
from opd.tasks import get_task


def make_teacher(cfg: DistillConfig, student, tokenizer, device="cpu", resumed: bool = False,
                 prompts: PromptSet | None = None) -> Teacher | None:
    """The teacher the config names: a local HF model (vocabularies checked), an OpenAI-compatible server, the
    student's starting weights (`self`; `resumed`: the student holds a checkpoint's weights, not the start), an EMA of
    the student (`ema`: `opd.lm.teachers.ema`), or
    several of these routed by a data column (--teachers: `opd.lm.teachers.routed.Teachers`). With --cross-tokenizer, a
    local model with its own tokenizer (`opd.lm.xtok.teacher`), which renders each of `prompts` with its own
    template."""
    if cfg.teacher is None and cfg.teachers is None:
        if cfg.loss != "sft" or cfg.source not in ("data",):
            raise ValueError(f"source={cfg.source} with loss={cfg.loss} needs a teacher; pass --teacher")
        return None
    if cfg.loss == "sft" and cfg.source == "data":
        return None  # plain SFT: no teacher pass (several teachers still split the metrics by the data's column)
    if cfg.teachers is not None:
        from opd.lm.teachers.routed import Teachers

        return Teachers({name: _one_teacher(cfg, spec, student, tokenizer, device, resumed)
                         for name, spec in teacher_specs(cfg.teachers).items()})
    if cfg.cross_tokenizer:
        from opd.lm.xtok.teacher import cross_tokenizer_teacher

        return cross_tokenizer_teacher(cfg.teacher, cfg, student, tokenizer, prompts, device)
    return _one_teacher(cfg, cfg.teacher, student, tokenizer, device, resumed)


def _one_teacher(cfg: DistillConfig, spec: str, student, tokenizer, device, resumed: bool) -> Teacher:
    """One teacher from `spec` (--teacher, or one entry of --teachers)."""
    # only the sampled loss reads the teacher's log-prob of the taken token; the divergences use the hidden states
    with_taken_logp = cfg.loss not in losses.DIVERGENCES
    if spec == "self":
        from opd.lm.teachers.self import self_teacher

        return self_teacher(cfg, student, device, resumed, with_taken_logp)
    if spec == "ema":  # a copy of the student as it is now; on --resume RunDir.restore puts the saved averages back
        from opd.lm.teachers.ema import EmaTeacher

        return EmaTeacher(student, cfg.ema_decay, cfg.chunk_size, with_taken_logp)
    if spec.startswith(("http://", "https://")) and cfg.teacher_payload == "hidden":
        from opd.lm.remote.hidden import HiddenStateTeacher

        teacher = HiddenStateTeacher(spec, api_key=cfg.remote_api_key, timeout=cfg.remote_timeout,
                                     max_retries=cfg.remote_max_retries, chunk_size=cfg.chunk_size,
                                     with_taken_logp=with_taken_logp)
        teacher.check_student(student)  # the served vocabulary, before any step
        return teacher
    if spec.startswith(("http://", "https://")):
        from opd.lm.remote.teacher import RemoteTeacher

        teacher = RemoteTeacher(spec, model=None, top_k=cfg.top_k, api_key=cfg.remote_api_key,
                                timeout=cfg.remote_timeout, max_retries=cfg.remote_max_retries)
        teacher.check(tokenizer, student.get_output_embeddings().weight.shape[0])  # before any step
        return teacher
    teacher_tokenizer = load_tokenizer(spec)
    differences = tokenizer_differences(tokenizer, teacher_tokenizer)
    if differences and not cfg.allow_tokenizer_mismatch:  # before the teacher's weights load
        raise ValueError(f"the teacher {spec} shares the student's vocabulary but not its conventions: "
                         f"{'; '.join(differences)}; give the student the teacher's (save its tokenizer with them) or "
                         f"pass --allow-tokenizer-mismatch to train anyway")
    model = load_model(spec, dtype=cfg.teacher_dtype, device=device)
    check_same_vocabulary(student, model, tokenizer, teacher_tokenizer)
    return LocalTeacher(model, chunk_size=cfg.chunk_size, with_taken_logp=with_taken_logp)


def prompt_room(cfg) -> int:
    """How many tokens a prompt may take: the student's context minus --sampling.max-new-tokens (read from its config,
    before any weights load). A one-line ValueError when the completions alone do not fit."""
    context, new = context_length(cfg.student), cfg.sampling.max_new_tokens
    if new >= context:
        raise ValueError(f"--sampling.max-new-tokens {new} leaves no room for a prompt in the student's context of "
                         f"{context} tokens; lower it below {context}")
    return context - new


def check_token_budget(cfg: DistillConfig, train: PromptSet) -> None:
    """Refuse (one line) a --max-tokens-per-microbatch that cannot hold the longest sequence a step may see: the
    longest prompt plus --sampling.max-new-tokens, or plus its reference completion and end-of-sequence token when
    the rows' own completions are trained on."""
    budget = getattr(cfg, "max_tokens_per_microbatch", None)
    if budget is None:
        return
    new = cfg.sampling.max_new_tokens
    references = train.completion_ids if cfg.source in ("data", "mixture") else None
    longest, prompt, completion = max(
        (len(p) + c, len(p), c) for p, c in zip(train.prompt_ids, (
            [max(new, len(r) + 1) for r in references] if references is not None else [new] * len(train))))
    if longest > budget:
        raise ValueError(f"--max-tokens-per-microbatch {budget} is smaller than the longest sequence a step may hold "
                         f"({longest} tokens: a {prompt}-token prompt and a {completion}-token completion); raise it "
                         f"to at least {longest}")


def check_teacher_prompts(cfg: DistillConfig) -> None:
    """Refuse (one line) what cannot grade a completion under another prompt than the student's."""
    for refused, why in (
        (cfg.cross_tokenizer, "--cross-tokenizer re-tokenizes the student's sequence for the teacher"),
        (cfg.source in ("teacher", "speculative"), f"--source {cfg.source} has the teacher act on the student's prompt"),
        (cfg.loss == "sft", "loss=sft never asks the teacher"),
        (cfg.overlap and cfg.sampler is None, "--overlap's sampler process grades rows with the student's prompt"),
        (cfg.tools is not None, "--tools conversations hold tool answers that a teacher prompt does not carry over"),
    ):
        if refused:
            raise ValueError(f"the data has teacher prompts (teacher_prompt / teacher_messages) but {why}; drop the "
                             f"column or that setting")


def prompt_sets(cfg: DistillConfig, tokenizer, max_prompt_len: int, prompts: Any = None, eval_prompts: Any = None,
                checker: Any = None) -> tuple[PromptSet, PromptSet | None, Any]:
    """The training prompts, the held-out prompts (or None) and the checker that scores them.

    Python arguments win over the config's flags (`prompts` over --data, `eval_prompts` over --eval-data, `checker`
    over --checker); with neither, the built-in task gives both splits and its own checker. Everything is checked
    here, before any model loads.
    """
    from opd.lm.data.checkers import check_columns, get_checker, try_checker

    if getattr(cfg, "tools", None) is not None:
        load_tool(cfg.tools)  # a tool that does not import fails now, before any weights load
    task = get_task(cfg.task)
    if prompts is not None:
        train_rows = as_rows(prompts, "prompts", cfg.data_fields)
    elif cfg.data is not None:
        train_rows = load_rows(cfg.data, cfg.data_split, cfg.data_fields, "--data")
    else:
        train_rows = task_rows(task, cfg.train_examples, "train")
        if getattr(task, "tools", None) is not None and getattr(cfg, "tools", None) is None:
            raise ValueError(f"task {cfg.task} is solved with a tool: pass --tools {task.tools}")
    spec, what = checker if checker is not None else cfg.checker, "--eval-data"
    if eval_prompts is not None:
        eval_rows, what = as_rows(eval_prompts, "eval_prompts", cfg.data_fields), "eval_prompts"
    elif cfg.eval_data is not None:
        eval_rows = load_rows(cfg.eval_data, cfg.eval_split, cfg.data_fields, "--eval-data")
    elif prompts is None and cfg.data is None:
        eval_rows, spec = task_rows(task, cfg.eval_examples, "test"), spec or f"task:{cfg.task}"
    else:
        eval_rows = None  # your own training data and no held-out set: nothing to score
    check = None
    if eval_rows is not None:
        if spec is None:
            raise ValueError(f"{what} needs a checker to score completions: pass --checker exact | numeric | "
                             f"regex:PATTERN | ifeval | module:function")
        eval_rows = eval_rows.select(range(min(len(eval_rows), cfg.eval_examples)))
        if isinstance(spec, str):
            check_columns(spec, eval_rows.column_names, what)
            check = get_checker(spec)
        elif callable(spec):
            check = spec
        else:
            raise ValueError(f"checker must be a spec string or a callable (row, completion) -> float, "
                             f"not {type(spec).__name__}")
    train = encode(tokenizer, train_rows, max_prompt_len, "--data" if cfg.data and prompts is None else "prompts")
    # each row's teacher, checked before any model loads (the RL baseline's config has no teachers)
    if getattr(cfg, "teachers", None) is not None:
        from opd.lm.teachers.routed import check_routes

        train.routes = check_routes(train, cfg.teacher_column, list(teacher_specs(cfg.teachers)),
                                    "--data" if cfg.data and prompts is None else "prompts")
    if getattr(cfg, "source", None) in ("data", "mixture") and train.completion_ids is None:
        raise ValueError(f"source={cfg.source} trains on reference completions, and these rows have no 'completion' "
                         f"(or a final assistant message); add them, map one with --data-fields completion=COLUMN, "
                         f"or use source=student/teacher")
    check_token_budget(cfg, train)
    if train.teacher_prompt_ids is not None and isinstance(cfg, DistillConfig):  # (the RL baseline has no teacher)
        check_teacher_prompts(cfg)
    held_out = None if eval_rows is None else encode(tokenizer, eval_rows, max_prompt_len, what)
    if held_out is not None and held_out.rows:
        try_checker(check, held_out.rows[0], what)
    return train, held_out, check


def make_actor(cfg: DistillConfig, student, teacher, prompts: PromptSet, tokenizer, accelerator, out: Path,
               plans: Plans) -> Actor:
    """Who acts, as the config says (source, --sampler, --overlap); `plans` lets `--overlap` draw a step ahead."""
    pad, eos, s = tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.sampling
    if cfg.source == "data":
        return DataActor(prompts, pad, eos)
    tools = tool_use(cfg, tokenizer)
    if cfg.source == "teacher":
        from opd.lm.rollouts.teacher import teacher_actor

        actor = teacher_actor(cfg, teacher, prompts, pad, eos)
        return actor if tools is None else ToolActor(actor, tools, prompts, pad)
    if cfg.source == "speculative":
        from opd.lm.rollouts.speculative import speculative_actor

        return speculative_actor(cfg, unwrap(student), teacher, prompts, pad, eos)
    sampler = None
    if cfg.sampler:
        from opd.lm.rollouts.server import ServerRollouts

        sampler = ServerRollouts(cfg.sampler, out, cfg.remote_timeout, cfg.remote_max_retries, cfg.remote_api_key)
        sampler.check(tokenizer, unwrap(student).get_output_embeddings().weight.shape[0])  # before any step
    elif cfg.overlap:  # no server: a second process on this machine samples (opd.lm.rollouts.process)
        from opd.lm.rollouts.process import ProcessRollouts

        # with a local teacher, the sampler process grades part of each batch too
        sampler = ProcessRollouts(student, eos, teacher=teacher if isinstance(teacher, LocalTeacher)
                                  and cfg.loss != "sft" else None)
    actor = (SamplerActor(sampler, accelerator, prompts, pad, s) if sampler is not None
             else LocalActor(unwrap(student), prompts, pad, eos, s))
    if tools is not None:  # the student's turns; a mixture's data batches stay as they are
        actor = ToolActor(actor, tools, prompts, pad)
    if cfg.source == "mixture":
        actor = Mixture(actor, DataActor(prompts, pad, eos), cfg.lmbda)
    if cfg.overlap:
        actor = Ahead(actor, plans, cfg.steps, on_wait=getattr(sampler, "waited", None))
    return actor


def tool_use(cfg: DistillConfig, tokenizer) -> ToolUse | None:
    """The tool conversations --tools asks for (None without), for the student's tokenizer and context."""
    if cfg.tools is None:
        return None
    return ToolUse.build(cfg.tools, tokenizer, cfg.max_turns, cfg.sampling.max_new_tokens, context_length(cfg.student))
