"""The `opd` command: one subcommand per entry point, each a config dataclass parsed by tyro.

Errors the user can act on (bad input, a diverged run, an unreachable server) print one line and exit 2;
set OPD_DEBUG=1 to see the traceback instead.
"""

import dataclasses
import os
import re
import sys

from typing import Annotated

import tyro
from tyro.constructors import ConstructorRegistry, StructConstructorSpec

# Only settings here: each command imports what it runs (torch, transformers, fastapi) when it runs, so that
# `opd --help` and `opd train --help` answer in well under a second.
from opd.args import EvalArgs, InterpretArgs, MergeArgs, QuickstartArgs, ServeArgs, TeacherArgs
from opd.config import DistillConfig

# Flags without the argument's name in front: `opd train --student X`, not `--cfg.student X`.
_NO_PREFIX = tyro.conf.arg(name="")


def _flowing_help() -> ConstructorRegistry:
    """A tyro registry under which the help of every dataclass field flows.

    Our docstrings are hard-wrapped at 120 columns. tyro 1.0 joins a docstring's lines only where the next one starts
    with a letter, and it looks before it dedents, so each indented continuation line stayed a line of its own and
    --help left a word or two alone on a line. Here a single line break becomes a space; a blank line stays a
    paragraph break. tyro has no setting for this: the rule defers to tyro's own dataclass rule and changes only the
    help text.
    """
    registry = ConstructorRegistry()
    inner = False

    @registry.struct_rule
    def flowing(info):
        nonlocal inner
        if inner or not dataclasses.is_dataclass(info.type):
            return None
        inner = True
        try:
            spec = ConstructorRegistry.get_struct_spec(info)  # tyro's own rule (this one returns None while inner)
        finally:
            inner = False
        if not isinstance(spec, StructConstructorSpec):
            return spec
        return dataclasses.replace(spec, fields=tuple(dataclasses.replace(f, helptext=_flowed(f.helptext))
                                                      for f in spec.fields))

    return registry


def _flowed(helptext):
    """`helptext` (a string, None, or tyro's lazy docstring lookup) with single line breaks joined, still lazy."""
    def text():
        raw = helptext() if callable(helptext) else helptext
        return None if raw is None else re.sub(r"[ \t]*(?<!\n)\n(?!\n)[ \t]*", " ", raw)

    return text


def _commands() -> dict:
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
        from opd.lm.recipes.supervised import train_teacher_main

        train_teacher_main(args)

    def evaluate(args: Annotated[EvalArgs, _NO_PREFIX]) -> None:
        """Held-out accuracy of a model, and its per-token reverse KL to a teacher on its own samples."""
        from opd.lm.eval import eval_main

        eval_main(args)

    def serve(args: Annotated[ServeArgs, _NO_PREFIX]) -> None:
        """Serve a local model over the OpenAI-compatible completions API (vLLM's subset: prompt_logprobs, ...)."""
        from opd.lm.serve.app import serve_main

        serve_main(args)

    def merge(args: Annotated[MergeArgs, _NO_PREFIX]) -> None:
        """Fold a LoRA run's adapter into its base model: a plain Hugging Face model directory (+ tokenizer)."""
        from opd.lm.hf.lora import merge_main

        merge_main(args)

    def interpret(args: Annotated[InterpretArgs, _NO_PREFIX]) -> None:
        """Print a distilled decision tree as if/else rules, and a linear policy and a formula as equations."""
        from opd.control.interpretable import interpret_main

        interpret_main(args)

    return {"quickstart": quickstart, "train": train, "teacher": teacher, "eval": evaluate, "serve": serve,
            "merge": merge, "interpret": interpret}


def _is_user_error(e: Exception) -> bool:
    """Bad input, a diverged run, an unreachable server: errors a user can act on."""
    # TrainingError is raised only by the training loop, so it is looked up only once that is loaded (importing it
    # here would cost torch's import on every error, --help's exit included).
    train = sys.modules.get("opd.lm.train")
    return isinstance(e, (ValueError, OSError)) or (train is not None and isinstance(e, train.TrainingError))


BENCHMARKS = {
    "quickstart": "quickstart.py",
    "table31": "table31/run.py",
    "control": "control/run.py",
    "reliability": "reliability/run.py",
    "perf": "perf/run.py",
    "realdata": "realdata.py",
    "remote_hidden": "remote_hidden.py",
    "shared_cpu": "shared_cpu.py",
    "skd": "skd.py",
    "opd_wins": "opd_wins/run.py",
    "opd_wins_control": "opd_wins/control.py",
    "xtok": "xtok/run.py",
    "vllm": "vllm.py",
    "robotics": "robotics/run.py",
    "continual": "continual/run.py",
}
"""`opd bench NAME [flags]` runs benchmarks/<file> of the source checkout (benchmarks are not installed). Results record
`opd bench NAME`, not the file, so a file may move without breaking a recorded command."""


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
        commands, args=a, prog="opd", description="On-policy distillation. Benchmarks: opd bench NAME [--quick].",
        registry=_flowing_help(),
    ), argv)


def _guarded(fn, argv) -> None:
    """Run fn(argv), turning the errors a user can act on into one line on stderr and exit code 2."""
    try:
        fn(argv)
    except KeyboardInterrupt as e:
        print(f"opd: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `opd train --help | head`: the reader left, nothing to report
        sys.stderr.close()
        sys.exit(0)
    except Exception as e:
        if not _is_user_error(e) or os.environ.get("OPD_DEBUG"):
            raise
        # Library messages can span lines (HF's OSError does); the contract is one line.
        print("opd: error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
