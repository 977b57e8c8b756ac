"""The `opd` command: one subcommand per entry point, each a config dataclass parsed by tyro.

Errors the user can act on (bad input, a diverged run, an unreachable server) print one line and exit 2;
set OPD_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import os
import sys

import tyro

from opd.config import DistillConfig


def _train(cfg: DistillConfig) -> None:
    """Train a student: on-policy distillation, GKD mixture, sequence-level KD or SFT (see --source, --loss)."""
    from opd.lm.train import distill

    print(distill(cfg))


def _quickstart(args: "QuickstartArgs") -> None:  # noqa: F821 (resolved below)
    """Teacher → warm-started student → on-policy distillation vs SFT on teacher samples, as a table."""
    from opd.quickstart import quickstart

    quickstart(args)


def _teacher(args: "TeacherArgs") -> None:  # noqa: F821
    """Train the task's teacher here, measure it and cache it."""
    from opd.tasks.train import train_teacher_main

    train_teacher_main(args)


def _eval(args: "EvalArgs") -> None:  # noqa: F821
    """Held-out accuracy and mean per-token reverse KL to a teacher."""
    from opd.lm.eval import eval_main

    eval_main(args)


def _commands() -> dict:
    from opd.lm.eval import EvalArgs
    from opd.quickstart import QuickstartArgs
    from opd.tasks.train import TeacherArgs

    _quickstart.__annotations__["args"] = QuickstartArgs
    _teacher.__annotations__["args"] = TeacherArgs
    _eval.__annotations__["args"] = EvalArgs
    return {"quickstart": _quickstart, "train": _train, "eval": _eval, "teacher": _teacher}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `opd` console script."""
    commands = _commands()
    try:
        tyro.extras.subcommand_cli_from_dict(commands, args=argv, prog="opd")
    except (ValueError, RuntimeError, FileNotFoundError, KeyboardInterrupt) as e:
        if os.environ.get("OPD_DEBUG"):
            raise
        print(f"opd: error: {e}" if not isinstance(e, KeyboardInterrupt) else f"opd: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
