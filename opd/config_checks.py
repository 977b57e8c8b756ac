"""The checks of a `DistillConfig` that concern several flags at once, run by its `__post_init__`: one line naming
what does not go together and what to do (kept apart so the config stays readable as a list of documented fields)."""

from __future__ import annotations


def check_cross_tokenizer(cfg) -> None:
    """--cross-tokenizer: one local teacher, and a divergence over the student's own tokens."""
    if not cfg.cross_tokenizer:
        return
    remote = (cfg.teacher or "").startswith(("http://", "https://"))
    if cfg.teachers is not None or cfg.teacher in (None, "self", "ema") or remote:
        raise ValueError("--cross-tokenizer needs one local --teacher model (a directory or hub id): it "
                         "re-tokenizes every completion for the teacher, which a server or --teachers cannot do "
                         "yet")
    if cfg.loss in ("sampled", "sft") or cfg.source not in ("student", "data", "mixture"):
        raise ValueError(f"--cross-tokenizer compares distributions of completions in the student's tokens: use a "
                         f"divergence loss with source student, data or mixture, not loss={cfg.loss} "
                         f"source={cfg.source}")


def check_speculative(cfg) -> None:
    """--source speculative: one local teacher, drafting in this process."""
    if cfg.source != "speculative":
        return
    # SKD's teacher checks every proposed block as it is drafted, through its own KV cache, in this process
    if cfg.teachers is not None or cfg.teacher is None or cfg.teacher.startswith(("http://", "https://")):
        raise ValueError("--source speculative needs one local --teacher (a model directory, hub id or self); "
                         "a teacher server or --teachers cannot check the student's proposals as they are drafted")
    for flag, used in (("--sampler", cfg.sampler), ("--overlap", cfg.overlap)):
        if used:
            raise ValueError(f"--source speculative drafts with the student and the teacher in this process; "
                             f"drop {flag}")


def check_ema(cfg) -> None:
    """--teacher ema: one teacher that grades and never samples."""
    if "ema" in teacher_specs(cfg.teachers).values():
        raise ValueError("--teachers cannot name ema: an EMA of the student is one teacher; pass --teacher ema")
    if cfg.teacher == "ema" and cfg.source not in ("student", "mixture", "data"):
        raise ValueError(f"--teacher ema grades the student's samples or the data's; it does not sample itself: "
                         f"use --source student, mixture or data, not {cfg.source}")


def check_teachers(cfg) -> None:
    """--teachers: instead of --teacher, with the column that routes rows."""
    if cfg.teachers is None:
        return
    if cfg.teacher is not None:
        raise ValueError("pass either --teacher or --teachers, not both (--teachers NAME=MODEL,... routes rows "
                         "by --teacher-column)")
    teacher_specs(cfg.teachers)
    if not cfg.teacher_column:
        raise ValueError("--teachers needs --teacher-column COLUMN: the data column that names each row's teacher")


def teacher_specs(spec: str | None) -> dict[str, str]:
    """`--teachers "math=DIR,code=URL"` -> {"math": "DIR", "code": "URL"} in order; one line for a malformed list."""
    specs: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, sep, model = (x.strip() for x in item.partition("="))
        if not sep or not name or not model:
            raise ValueError(f"--teachers entry {item!r} is not NAME=MODEL; write e.g. "
                             f"math=DIR,code=http://host:8000/v1")
        if name in specs:
            raise ValueError(f"--teachers names {name!r} twice; give each teacher its own name")
        specs[name] = model
    if spec is not None and not specs:
        raise ValueError("--teachers is empty; write NAME=MODEL pairs, e.g. math=DIR,code=http://host:8000/v1")
    return specs


def check_tools(cfg) -> None:
    """--tools: who acts must write turns in this process or through a sampler that answers token ids."""
    if cfg.tools is None:
        return
    for refused, why in (
        (cfg.source in ("data", "speculative"), f"source={cfg.source} has nobody to talk to the tool: use source "
                                                f"student, teacher or mixture"),
        (cfg.overlap and cfg.sampler is None, "--overlap's sampler process samples one turn per batch; drop --overlap"),
        (cfg.cross_tokenizer, "--cross-tokenizer re-tokenizes a completion as one text; drop one of the two"),
        (cfg.teachers is not None and cfg.source == "teacher", "several teachers sampling (--teachers with source "
                                                               "teacher) lay out single turns; use source student"),
    ):
        if refused:
            raise ValueError(f"--tools: {why}")
