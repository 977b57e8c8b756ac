"""The `opd` command: one subcommand per entry point, each a config dataclass parsed by tyro.

Errors the user can act on (bad input, a diverged run, an unreachable server) print one line and exit 2;
set OPD_DEBUG=1 to see the traceback instead.
"""

import os
import sys

from typing import Annotated

import tyro

# Flags without the argument's name in front: `opd train --student X`, not `--cfg.student X`.
_NO_PREFIX = tyro.conf.arg(name="")


def _commands() -> dict:
    # Imported here so that `opd --help` does not pay for every subcommand's dependencies twice.
    from opd.config import DistillConfig
    from opd.quickstart import QuickstartArgs
    from opd.lm.eval import EvalArgs
    from opd.lm.lora import MergeArgs
    from opd.lm.serve import ServeArgs
    from opd.lm.task_teacher import TeacherArgs

    def quickstart(args: Annotated[QuickstartArgs, _NO_PREFIX]) -> None:
        """Teacher → warm-started student → on-policy distillation vs SFT on teacher samples, as a table."""
        from opd.quickstart import quickstart

        quickstart(args)

    def train(cfg: Annotated[DistillConfig, _NO_PREFIX]) -> None:
        """Train a student: on-policy distillation, GKD mixture, sequence-level KD or SFT (see --source, --loss)."""
        from accelerate import PartialState

        from opd.lm.train import distill

        try:
            final = distill(cfg)
        finally:
            # Under `accelerate launch`: tear the process group down before exit. Left to the interpreter's shutdown,
            # gloo's threads can abort a finished run ("terminate called without an active exception", SIGABRT).
            PartialState().destroy_process_group()
        print(f"done: step {final.get('step')}, accuracy {final.get('accuracy')}, checkpoint in {cfg.out_dir}/checkpoint")

    def teacher(args: Annotated[TeacherArgs, _NO_PREFIX]) -> None:
        """Train the task's teacher here, measure its held-out accuracy and cache it."""
        from opd.lm.task_teacher import train_teacher_main

        train_teacher_main(args)

    def evaluate(args: Annotated[EvalArgs, _NO_PREFIX]) -> None:
        """Held-out accuracy of a model, and its per-token reverse KL to a teacher on its own samples."""
        from opd.lm.eval import eval_main

        eval_main(args)

    def serve(args: Annotated[ServeArgs, _NO_PREFIX]) -> None:
        """Serve a local model over the OpenAI-compatible completions API (vLLM's subset: prompt_logprobs, ...)."""
        from opd.lm.serve import serve_main

        serve_main(args)

    def merge(args: Annotated[MergeArgs, _NO_PREFIX]) -> None:
        """Fold a LoRA run's adapter into its base model: a plain Hugging Face model directory (+ tokenizer)."""
        from opd.lm.lora import merge_main

        merge_main(args)

    return {"quickstart": quickstart, "train": train, "teacher": teacher, "eval": evaluate, "serve": serve,
            "merge": merge}


def _user_errors() -> tuple[type[BaseException], ...]:
    from opd.lm.train import TrainingError

    return (ValueError, OSError, TrainingError)


BENCHMARKS = {
    "quickstart": "quickstart.py",
    "table31": "table31.py",
    "control": "control.py",
    "reliability": "reliability.py",
    "perf": "perf/run.py",
    "realdata": "realdata.py",
}
"""`opd bench NAME [flags]` runs benchmarks/<file> of the source checkout (benchmarks are not installed)."""


def _bench(argv: list[str]) -> None:
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    available = {name: root / f for name, f in BENCHMARKS.items() if (root / f).exists()}
    if not argv or argv[0] not in available:
        names = ", ".join(available) or "none (benchmarks live in a clone of the repository, install it with -e)"
        raise ValueError(f"usage: opd bench NAME [--quick] [flags]; NAME is one of: {names}")
    path = available[argv[0]]
    sys.argv = [f"opd bench {argv[0]}", *argv[1:]]
    sys.path.insert(0, str(root.parent))
    runpy.run_path(str(path), run_name="__main__")
    # Every benchmark writes its own section; RESULTS.md is rebuilt from all of them.
    runpy.run_path(str(root / "report.py"), run_name="__main__")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `opd` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _guarded(_bench, argv[1:])
    commands = _commands()
    _guarded(lambda a: tyro.extras.subcommand_cli_from_dict(
        commands, args=a, prog="opd", description="On-policy distillation. Benchmarks: opd bench NAME [--quick]."
    ), argv)


def _guarded(fn, argv) -> None:
    """Run fn(argv), turning the errors a user can act on into one line on stderr and exit code 2."""
    try:
        fn(argv)
    except _user_errors() as e:
        if os.environ.get("OPD_DEBUG"):
            raise
        # Library messages can span lines (HF's OSError does); the contract is one line.
        print("opd: error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"opd: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
