"""Multi-turn rollouts with tools: the model writes a turn, a tool answers, the model goes on (`--tools`).

A tool is a Python function `tool(turn: str) -> str | None`, called on the text of each turn the model ends with its
end-of-sequence token (what ends an assistant turn in a chat model). It returns its answer to the call the turn holds,
or None when the turn holds no call, which ends the conversation (the turn was the final answer). A turn cut at
--sampling.max-new-tokens, or the --max-turns-th turn, also ends it. `calculator` is the built-in tool (`--tools
calc`); `module:function` names yours. A tool that cannot carry out a call says so in text that starts with "error"
(the calculator does); the `tool_call_errors` metric counts those answers.

The answer goes into the conversation as the tokenizer's chat template writes a `tool` message and the next assistant
turn's header (`ToolChat`); a tokenizer without a chat template gets the answer's text alone. The model's own tokens
are kept exactly as sampled (never re-rendered), so the batch holds what the model saw when it wrote each turn.

In the batch (`conversation_batch`) the completion is the whole conversation after the prompt, and `mask_BT` marks
only the model's own tokens: tool answers and template tokens get no loss and no gradient, while the teacher, which
scores the whole sequence in one forward pass, grades each of the model's tokens given the conversation so far.
"""

from __future__ import annotations

import ast
import operator
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable

from opd.lm.batch import Batch, layout

Tool = Callable[[str], "str | None"]
"""`tool(turn_text) -> answer`, or None when the turn makes no call."""

ERROR_PREFIX = "error"
"""A tool's answer that starts with this reports a call it could not carry out (`tool_call_errors`)."""

TURN_SEED_STRIDE = 1_000_003
"""Turn k of a step samples with seed + k × this (samplers seeded per row: no turn repeats another's draws)."""

_CALL = re.compile(r"calc\(([^()]*(?:\([^()]*\)[^()]*)*)\)")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
              ast.UAdd: operator.pos}


class ToolFailed(Exception):
    """A tool raised, or answered something that is not text; the message names the row and the turn."""


def calculator(turn: str) -> str | None:
    """The built-in tool (`--tools calc`): the value of the turn's last `calc(EXPRESSION)`, where EXPRESSION is
    numbers with + - * / // % ** and parentheses; None when the turn has no call, "error: ..." when it cannot be
    evaluated. Integral results are written without a decimal point (calc(7+6+0) -> "13")."""
    calls = _CALL.findall(turn)
    if not calls:
        return None
    try:
        value = _evaluate(ast.parse(calls[-1].strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
        return f"{ERROR_PREFIX}: {type(e).__name__}"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:  # 9**9**9 would run for minutes
            raise OverflowError("exponent too large")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError("not arithmetic")


def load_tool(spec: str) -> Tool:
    """The tool `--tools` names: `calc` (the built-in `calculator`) or `module:function` (yours)."""
    if spec == "calc":
        return calculator
    if ":" not in spec:
        raise ValueError(f"--tools {spec!r} is neither calc nor module:function; name the built-in calculator or your "
                         f"function (turn text) -> answer text or None")
    from opd.lm.data.checkers import user_function

    return user_function(spec, "tool", "a (turn text) -> str | None")


class ToolChat:
    """How a tool's answer is written into a conversation for one tokenizer: the chat template's tool message (a
    user message where the template knows no tool role, with a warning) and the next assistant header after it; the
    bare answer text for a tokenizer without a template."""

    _SENTINEL = "\u2063opd-assistant-turn\u2063"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.role = "tool"

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids that follow the model's end-of-turn token: the answer as a message, then the next turn's header."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            return list(tok(answer, add_special_tokens=False)["input_ids"])
        text = self._render(answer)
        after = text.split(self._SENTINEL, 1)[1]
        # the model's turn already ended with its end-of-sequence token; the template writes it too
        if tok.eos_token and after.startswith(tok.eos_token):
            after = after[len(tok.eos_token):]
        return list(tok(after, add_special_tokens=False)["input_ids"])

    def _render(self, answer: str) -> str:
        messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": self._SENTINEL}]
        try:
            text = self.tokenizer.apply_chat_template(messages + [{"role": self.role, "content": answer}],
                                                      add_generation_prompt=True, tokenize=False)
            if answer in text.split(self._SENTINEL, 1)[-1]:
                return text
        except Exception:  # noqa: BLE001  (templates raise their own errors for a role they do not know)
            pass
        if self.role == "user":
            raise ValueError("the tokenizer's chat template renders neither a tool nor a user message after an "
                             "assistant turn; give the model a template that does")
        warnings.warn("the chat template has no tool role; tool answers are written as user messages", stacklevel=2)
        self.role = "user"
        return self._render(answer)


@dataclass
class Conversation:
    """One row's turns after its prompt."""

    tokens: list[int] = field(default_factory=list)
    own: list[bool] = field(default_factory=list)
    """Which of `tokens` the model wrote (the rest are tool answers and template tokens)."""
    logps: list[float] | None = field(default_factory=list)
    """The sampler's log-prob of each of the model's tokens, when the sampler reports them (else None)."""
    turns: int = 0
    calls: int = 0
    errors: int = 0

    def add(self, ids: list[int], own: bool, logps: list[float] | None = None) -> None:
        self.tokens += ids
        self.own += [own] * len(ids)
        if own:
            self.logps = None if logps is None or self.logps is None else self.logps + list(logps)


@dataclass(frozen=True)
class ToolUse:
    """A tool, how its answers are written (`ToolChat`) and the limits of one conversation."""

    tool: Tool
    name: str
    chat: ToolChat
    max_turns: int
    max_new_tokens: int
    """The most tokens of one turn (--sampling.max-new-tokens)."""
    context: int
    """The model's context: a conversation that would outgrow it before its next turn stops the run."""
    eos_id: int | None

    @classmethod
    def build(cls, spec: str, tokenizer, max_turns: int, max_new_tokens: int, context: int) -> "ToolUse":
        """The tool `spec` names (`load_tool`), its answers written for `tokenizer`, within these limits."""
        return cls(load_tool(spec), spec, ToolChat(tokenizer), max_turns, max_new_tokens, context,
                   tokenizer.eos_token_id)

    def converse(self, sample_turn: Callable, prompt_ids: list[list[int]], rows: list[int] | None = None
                 ) -> list[Conversation]:
        """Each prompt's conversation. `sample_turn(token_ids, turn) -> (completions, log-probs or None)` writes one
        turn for every conversation still going; `rows` name the prompts in errors (their index in the data)."""
        rows = list(range(len(prompt_ids))) if rows is None else rows
        conversations = [Conversation() for _ in prompt_ids]
        going = list(range(len(prompt_ids)))
        for turn in range(self.max_turns):
            if not going:
                break
            completions, logps = sample_turn([prompt_ids[i] + conversations[i].tokens for i in going], turn)
            still = []
            for j, (i, ids) in enumerate(zip(going, completions, strict=True)):
                c = conversations[i]
                c.add(list(ids), own=True, logps=None if logps is None else logps[j])
                c.turns += 1
                ended = bool(ids) and self.eos_id is not None and ids[-1] == self.eos_id
                if not ended or turn + 1 == self.max_turns:
                    continue
                answer = self.call(self.chat.tokenizer.decode(ids, skip_special_tokens=True), rows[i], turn)
                if answer is None:
                    continue
                c.calls += 1
                c.errors += answer.lstrip().lower().startswith(ERROR_PREFIX)
                answer_ids = self.chat.answer_ids(answer)
                length = len(prompt_ids[i]) + len(c.tokens) + len(answer_ids)
                if length + self.max_new_tokens > self.context:
                    raise ToolFailed(
                        f"row {rows[i]}: after turn {turn + 1} and the tool's answer the conversation is {length} "
                        f"tokens, and another turn of up to {self.max_new_tokens} would pass the model's context of "
                        f"{self.context}; lower --max-turns or --sampling.max-new-tokens")
                c.add(answer_ids, own=False)
                still.append(i)
            going = still
        return conversations

    def call(self, turn_text: str, row: int, turn: int) -> str | None:
        """The tool's answer to one turn; a tool that raises or answers something else than text stops in one line."""
        where = f"row {row}, turn {turn + 1} ({turn_text[:60]!r})"
        try:
            answer = self.tool(turn_text)
        except Exception as e:  # noqa: BLE001  (your tool can fail in any way; its first line says how)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ToolFailed(f"the tool {self.name} raised {type(e).__name__}: {first} on {where}; fix the tool") from e
        if answer is not None and not isinstance(answer, str):
            raise ToolFailed(f"the tool {self.name} answered a {type(answer).__name__} on {where}; return the answer "
                             f"as text (a str), or None when the turn makes no call")
        return answer


def conversation_batch(prompt_ids: list[list[int]], conversations: list[Conversation], pad_id: int) -> Batch:
    """The conversations laid out as a `Batch`: the model's own tokens are the targets, tool answers are context.
    `rollout_metrics` holds the mean turns and tool calls per conversation and the share of calls that failed."""
    logps = [c.logps for c in conversations]
    batch = layout(prompt_ids, [c.tokens for c in conversations], pad_id,
                   None if any(lp is None for lp in logps) else logps, own=[c.own for c in conversations])
    batch.rollout_metrics = tool_metrics(conversations)
    return batch


def tool_metrics(conversations: list[Conversation]) -> dict:
    """`turns` and `tool_calls` (means per conversation) and `tool_call_errors` (share of calls answered "error")."""
    n = max(1, len(conversations))
    calls = sum(c.calls for c in conversations)
    return {"turns": sum(c.turns for c in conversations) / n, "tool_calls": calls / n,
            "tool_call_errors": sum(c.errors for c in conversations) / calls if calls else 0.0}


class ToolActor:
    """An actor whose model holds multi-turn conversations with a tool: each turn is sampled by the inner actor's
    `sample` (a local model, a sampler server, a teacher's server), then the tool answers. Batches from another
    source (the data's, in a mixture) pass through."""

    def __init__(self, inner, tools: ToolUse, prompts, pad_id: int):
        self.inner, self.tools, self.prompts, self.pad_id = inner, tools, prompts, pad_id
        self.source = inner.source

    def choose(self, rng) -> str:
        return self.inner.choose(rng)

    def sync(self, student, step: int) -> None:
        self.inner.sync(student, step)

    def close(self) -> None:
        self.inner.close()

    def rollouts(self, draw) -> Batch:
        prompt_ids = [self.prompts.prompt_ids[i] for i in draw.rows]
        sampled_by = []

        def sample_turn(ids: list[list[int]], turn: int):
            batch = self.inner.sample(ids, draw.seed + turn * TURN_SEED_STRIDE)
            sampled_by.append(batch.sampled_by)
            logps = None
            if batch.sampling_logp_BT is not None:
                mask = batch.mask_BT.bool()
                logps = [row[m].tolist() for row, m in zip(batch.sampling_logp_BT, mask)]
            return batch.completion_ids(), logps

        batch = conversation_batch(prompt_ids, self.tools.converse(sample_turn, prompt_ids, draw.rows), self.pad_id)
        batch.sampled_by = sampled_by[0] if sampled_by else None
        return batch


def greedy_conversations(model, tokenizer, tools: ToolUse, prompt_ids: list[list[int]],
                         rows: list[int] | None = None) -> tuple[list[str], list[Conversation]]:
    """Each prompt's conversation with the tool under greedy decoding (evaluation): its text after the prompt (the
    model's turns and the tool's answers, special tokens dropped), and the conversation itself."""
    from opd.lm.hf.decode import sample_completions

    def sample_turn(ids: list[list[int]], turn: int):
        return sample_completions(model, ids, tokenizer.pad_token_id, tools.eos_id, tools.max_new_tokens,
                                  temperature=0.0), None

    talks = tools.converse(sample_turn, prompt_ids, rows)
    return [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in talks], talks


def call_validity(calls: int, errors: int) -> float | None:
    """The share of tool calls the tool could carry out; None without any call."""
    return 1 - errors / calls if calls else None


def task_tool_use(task, tokenizer, max_new_tokens: int) -> ToolUse | None:
    """The tool conversations a built-in task is solved with (`arithmetic-tools`: the calculator), or None. A turn
    gets at most `max_new_tokens`, and no more than the task's longest turn needs (`max_turn_tokens`), so that a
    conversation of `max_turns` full turns fits the task's context."""
    spec = getattr(task, "tools", None)
    if spec is None:
        return None
    return ToolUse.build(spec, tokenizer, task.max_turns, min(max_new_tokens, task.max_turn_tokens),
                         tokenizer.model_max_length)
