"""Prompts for the LM loop: a user's files and datasets (read with `datasets`) or a built-in task, encoded once.

A row holds `prompt` (text) or `messages` (a chat list, rendered with the student's chat template and a generation
prompt), and optionally `completion` (the reference answer that source=data, SFT and GKD's data batches train on),
`answer` (what a checker compares with) and `teacher_prompt` (text) or `teacher_messages` (a chat): what the teacher
sees instead of the prompt when it grades the student's completion (privileged context: the reference solution, a
demonstration, a document; SDFT, OPSD). Other columns are kept: a checker sees the whole row (IFEval's
`instruction_id_list` and `kwargs`, a user's own fields). A chat row whose last message is the assistant's and that
has no `completion` is split there: the earlier turns are the prompt, the last reply the completion (the usual
layout of chat SFT data).

    rows = load_rows("prompts.jsonl", fields="prompt=question,answer=final")
    prompts = encode(tokenizer, rows, max_prompt_len=2048 - 256)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import datasets

from opd.tasks.prompts import chat_token_ids, text_token_ids

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""File suffix -> the `datasets` builder that reads it."""


KNOWN_COLUMNS = ("prompt", "messages", "completion", "answer", "teacher_prompt", "teacher_messages")


def parse_fields(spec: str) -> dict[str, str]:
    """`"prompt=question,answer=final"` -> {"question": "prompt", "final": "answer"} (source column -> opd's name)."""
    mapping = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        ours, sep, theirs = item.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise ValueError(f"--data-fields entry {item!r} is not NAME=COLUMN; write e.g. prompt=question,answer=final")
        if ours.strip() not in KNOWN_COLUMNS:
            raise ValueError(f"--data-fields maps to {ours.strip()!r}; opd reads {', '.join(KNOWN_COLUMNS)}")
        mapping[theirs.strip()] = ours.strip()
    return mapping


def load_rows(path: str, split: str = "train", fields: str = "", what: str = "--data") -> datasets.Dataset:
    """Rows from a JSONL/JSON/Parquet/CSV file, a `Dataset.save_to_disk` directory or a hub dataset name.

    `fields` renames columns to opd's names (`parse_fields`); `what` names the flag in error messages. Raises a
    one-line ValueError for a missing path, an unreadable file, rows with neither prompt nor messages, or no rows.
    """
    p = Path(path).expanduser()
    if p.is_file():
        builder = FILE_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise ValueError(f"{what} {path}: unknown file type {p.suffix!r}; use .jsonl, .json, .parquet or .csv")
        try:
            rows = datasets.load_dataset(builder, data_files=str(p), split="train")
        except Exception as e:  # datasets wraps parser errors in its own classes; the first line says what broke
            raise ValueError(f"{what} {path} is not a valid {p.suffix[1:].upper()} file: {_first_line(e)}") from None
    elif p.is_dir():
        rows = _from_disk(p, split, what)
    elif path.startswith(("/", ".", "~")) or p.suffix.lower() in FILE_BUILDERS:
        raise ValueError(f"{what} {path} does not exist; pass a .jsonl/.json/.parquet/.csv file, a directory written "
                         f"by Dataset.save_to_disk, or a hub dataset name")
    else:
        try:
            rows = datasets.load_dataset(path, split=split)
        except Exception as e:
            raise ValueError(f"{what} {path} is neither a local file nor a loadable hub dataset: {_first_line(e)}") \
                from None
    return _standardise(rows, parse_fields(fields), f"{what} {path}")


def as_rows(prompts: Any, what: str = "prompts", fields: str = "") -> datasets.Dataset:
    """What the Python API accepts as prompts: a `datasets.Dataset`, a list of dicts, a list of prompt strings or a
    path (anything `load_rows` reads). `fields` renames columns as for `load_rows` (`DistillConfig.data_fields`)."""
    if isinstance(prompts, datasets.Dataset):
        rows = prompts
    elif isinstance(prompts, (str, Path)):
        return load_rows(str(prompts), fields=fields, what=what)
    elif isinstance(prompts, Sequence) and all(isinstance(p, str) for p in prompts):
        rows = datasets.Dataset.from_dict({"prompt": list(prompts)})
    elif isinstance(prompts, Sequence) and all(isinstance(p, dict) for p in prompts):
        rows = datasets.Dataset.from_list(list(prompts))
    else:
        raise ValueError(f"{what} must be a datasets.Dataset, a list of dicts, a list of strings or a path, "
                         f"not {type(prompts).__name__}")
    return _standardise(rows, parse_fields(fields), what)


def task_rows(task, n: int, split: str) -> datasets.Dataset:
    """A built-in task's examples as rows (prompt, completion, answer): tasks go through the same path as files."""
    examples = task.examples(n, seed=0, split=split)
    return datasets.Dataset.from_dict({"prompt": [e.prompt for e in examples],
                                       "completion": [e.completion for e in examples],
                                       "answer": [e.answer for e in examples]})


@dataclass
class PromptSet:
    """Rows ready for the loop: token ids of every prompt (and reference completion), and the rows themselves."""

    prompt_ids: list[list[int]]
    """Each row's prompt as the model sees it (chat template applied where one is used)."""
    completion_ids: list[list[int]] | None
    """Each row's reference completion (no end-of-sequence token; the batch adds it), or None without completions."""
    rows: list[dict]
    """The rows as plain dicts, with `prompt` set to the prompt's text (a chat's last user message) for checkers."""
    routes: list[str] | None = None
    """With several teachers (--teachers): the name of each row's teacher, from its --teacher-column
    (`opd.lm.teachers.routed.check_routes`); None with one teacher."""
    teacher_prompt_ids: list[list[int]] | None = None
    """Each row's teacher prompt (its `teacher_prompt` or `teacher_messages`, encoded like the prompt), or None when
    the teacher sees the student's prompt."""

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def teacher_prompts(self, rows: Sequence[int]) -> list[list[int]] | None:
        """The teacher prompts of prompt indices `rows` (a batch's rows), or None when the teacher sees the prompts."""
        return None if self.teacher_prompt_ids is None else [self.teacher_prompt_ids[i] for i in rows]


def encode(tokenizer, rows: datasets.Dataset, max_prompt_len: int, what: str = "--data") -> PromptSet:
    """Token ids of every row's prompt and completion. Refuses (one line) a prompt that leaves no room for the
    completion, and chat `messages` with a tokenizer that has no chat template."""
    if len(rows) == 0:
        raise ValueError(f"{what} has no rows; pass a file or dataset with at least one prompt")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = "messages" in rows.column_names
    if chat and not has_template:
        raise ValueError(f"{what} rows hold chat 'messages' but the student's tokenizer has no chat template; give "
                         f"plain 'prompt' text, or use a model whose tokenizer has one")
    privileged = [c for c in ("teacher_prompt", "teacher_messages") if c in rows.column_names]
    if "teacher_messages" in privileged and not has_template:
        raise ValueError(f"{what} rows hold chat 'teacher_messages' but the tokenizer has no chat template; give "
                         f"plain 'teacher_prompt' text")
    prompt_ids, completions, plain_rows, teacher_ids = [], [], [], []
    for i, row in enumerate(rows):
        row = dict(row)
        if chat and row.get("messages"):
            messages = list(row["messages"])
            if messages[-1].get("role") == "assistant" and row.get("completion") is None:
                row["completion"] = messages.pop()["content"]
            ids = chat_token_ids(tokenizer, messages)
            users = [m["content"] for m in messages if m.get("role") == "user"]
            row.setdefault("prompt", None)
            row["prompt"] = row["prompt"] or (users[-1] if users else "")
        else:  # plain text: one user turn for a chat model
            ids = text_token_ids(tokenizer, row["prompt"])
        if len(ids) > max_prompt_len:
            raise ValueError(f"{what} row {i}: the prompt is {len(ids)} tokens but the model's context leaves room for "
                             f"{max_prompt_len} (context minus max_new_tokens); shorten it or lower max_new_tokens")
        prompt_ids.append(list(ids))
        completions.append(row.get("completion"))
        plain_rows.append(row)
        if privileged:
            teacher_ids.append(_teacher_prompt_ids(tokenizer, row, i, max_prompt_len, what))
    completion_ids = None
    if all(c is not None for c in completions):
        completion_ids = tokenizer([str(c) for c in completions], add_special_tokens=False)["input_ids"]
    return PromptSet(prompt_ids, completion_ids, plain_rows, teacher_prompt_ids=teacher_ids if privileged else None)


def _teacher_prompt_ids(tokenizer, row: dict, i: int, max_prompt_len: int, what: str) -> list[int]:
    """Row i's teacher prompt, encoded as a prompt is; one line when it has none or it does not fit."""
    if row.get("teacher_messages"):
        ids = chat_token_ids(tokenizer, list(row["teacher_messages"]))
    elif row.get("teacher_prompt"):
        ids = text_token_ids(tokenizer, row["teacher_prompt"])
    else:
        raise ValueError(f"{what} row {i} has no teacher_prompt (or teacher_messages); every row needs one when the "
                         f"column is there")
    if len(ids) > max_prompt_len:
        raise ValueError(f"{what} row {i}: the teacher prompt is {len(ids)} tokens but the model's context leaves room "
                         f"for {max_prompt_len}; shorten it or lower max_new_tokens")
    return list(ids)


def _from_disk(p: Path, split: str, what: str) -> datasets.Dataset:
    if not ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        raise ValueError(f"{what} {p} is a directory but not one written by Dataset.save_to_disk (no state.json or "
                         f"dataset_dict.json); pass the data file itself")
    loaded = datasets.load_from_disk(str(p))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{what} {p} has no split {split!r}; it has {', '.join(loaded)} (choose with the split "
                             f"flag)")
        loaded = loaded[split]
    return loaded


def _standardise(rows: datasets.Dataset, mapping: dict[str, str], what: str) -> datasets.Dataset:
    """Rename columns to opd's names and drop rows without a prompt; one line if nothing usable is left."""
    missing = [src for src in mapping if src not in rows.column_names]
    if missing:
        raise ValueError(f"{what} has no column {missing[0]!r} (--data-fields); its columns: "
                         f"{', '.join(rows.column_names)}")
    clashes = [dst for src, dst in mapping.items() if dst in rows.column_names and dst not in mapping]
    if clashes:
        rows = rows.remove_columns(clashes)  # the mapped column replaces a same-named one
    if mapping:
        rows = rows.rename_columns(mapping)
    if "prompt" not in rows.column_names and "messages" not in rows.column_names:
        raise ValueError(f"{what} rows have neither 'prompt' nor 'messages' (columns: {', '.join(rows.column_names)}); "
                         f"map one with --data-fields prompt=COLUMN")
    key = "messages" if "messages" in rows.column_names else "prompt"
    before = len(rows)
    rows = rows.filter(lambda r: bool(r[key]))
    if len(rows) == 0:
        dropped = f" after dropping {before} rows with an empty {key}" if before else ""
        raise ValueError(f"{what} has no usable rows{dropped}; pass a file with at least one prompt")
    return rows


def _first_line(e: BaseException) -> str:
    cause = e
    while cause.__cause__ is not None:  # datasets' own error wraps the parser's, which says what is wrong
        cause = cause.__cause__
    text = str(cause).strip() or type(cause).__name__
    return text.splitlines()[0][:200]
