"""The `opd` command: one subcommand per entry point, each a config dataclass parsed by tyro.

Errors the user can act on (bad input, a diverged run, an unreachable server) print one line and exit 2;
set OPD_DEBUG=1 to see the traceback instead.
"""

import dataclasses
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Literal

import tyro
from tyro.constructors import ConstructorRegistry, StructConstructorSpec

# Only settings here: each command imports what it runs (torch, transformers, fastapi) when it runs, so that
# `opd --help` and `opd train --help` answer in well under a second.
from opd.args import (EvalArgs, InterpretArgs, MergeArgs, PlotArgs, QuickstartArgs, ServeArgs, StudentArgs,
                      TeacherArgs)
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
        """Train a student: on-policy distillation, GKD mixture, sequence-level KD or SFT (see --source, --loss).
        --config FILE (YAML or JSON, e.g. a run's config.json) sets the defaults of every flag; flags override it."""
        run_train(cfg)

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

    def student(args: Annotated[StudentArgs, _NO_PREFIX]) -> None:
        """Make a student from a subset of a teacher's layers (its embeddings, head and tokenizer kept)."""
        from opd.lm.hf.cut import student_main

        student_main(args)

    def plot(args: Annotated[PlotArgs, _NO_PREFIX]) -> None:
        """Plot runs' loss, held-out accuracy, completion tokens and step time against step, one line per run."""
        from opd.plot import plot_main

        plot_main(args)

    def interpret(args: Annotated[InterpretArgs, _NO_PREFIX]) -> None:
        """Print a distilled decision tree as if/else rules, and a linear policy and a formula as equations."""
        from opd.control.interpretable import interpret_main

        interpret_main(args)

    return {"quickstart": quickstart, "train": train, "teacher": teacher, "eval": evaluate, "serve": serve,
            "merge": merge, "student": student, "plot": plot, "interpret": interpret}


def run_train(cfg: DistillConfig) -> None:
    """`opd train`'s work, once its flags (and --config) are parsed."""
    from accelerate import PartialState

    from opd.lm.train import distill

    try:
        final = distill(cfg)
    finally:
        # Under `accelerate launch`: tear the process group down before exit. Left to the interpreter's shutdown,
        # gloo's threads can abort a finished run ("terminate called without an active exception", SIGABRT).
        PartialState().destroy_process_group()
    print(f"done: step {final.get('step')}, accuracy {final.get('accuracy')}, checkpoint in {cfg.out_dir}/checkpoint")


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(FILE of `--config FILE` or `--config=FILE`, the other arguments) of `opd train`'s arguments."""
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 == len(argv):
                raise ValueError("--config needs a file: opd train --config FILE.yaml [flags that override it]")
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def load_config(path: str) -> DistillConfig:
    """The DistillConfig a YAML or JSON file (such as a run's config.json) describes; one line for a bad file."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(file.read_text())
        else:
            data = json.loads(file.read_text())
    except Exception as err:  # yaml's and json's parse errors share no base class
        raise ValueError(f"--config {path} is not valid {'YAML' if file.suffix != '.json' else 'JSON'}: "
                         f"{err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of settings (student: ..., teacher: ...)")
    if data.get("remote_api_key") == "<set>":  # config.json records only that a key was set, never the key
        del data["remote_api_key"]
    if isinstance(data.get("report_to"), str):  # one name or "none": config.json before --report-to took several
        data["report_to"] = [data["report_to"]]
    if "student" not in data:
        raise ValueError(f"--config {path} has no 'student'; every run needs one (a hub id or a model directory)")
    return _build(DistillConfig, data, path, "")


def _build(cls, data: dict, path: str, prefix: str):
    """`cls(**data)`, each value checked against its field's type; nested dataclasses from nested mappings."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ValueError(f"--config {path}: unknown setting {prefix + str(key)!r}; `opd train --help` lists them "
                             f"(--{(prefix + str(key)).replace('_', '-')} is not one)")
    return cls(**{key: _typed(hints[key], value, path, prefix + key) for key, value in data.items()})


def _typed(tp, value, path: str, key: str):
    """`value` as type `tp` (bool, int, float, str, Literal, X | None, tuple[X, ...], a dataclass), or one line."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _build(tp, value, path, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _typed(arg, value, path, key)
            except ValueError:
                pass
    elif origin is Literal:
        if value in args:
            return value
    elif origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_typed(args[0], v, path, key) for v in value)
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        # YAML 1.1 (PyYAML) reads `1e-3` as a string; it is the way people write learning rates.
        try:
            return float(value)
        except ValueError:
            pass
    elif tp is str and isinstance(value, str):
        return value
    want = " or ".join(map(repr, args)) if origin is Literal else getattr(tp, "__name__", str(tp))
    raise ValueError(f"--config {path}: {key} must be {want}, not {value!r:.60}")


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
    "privileged": "privileged.py",
    "tools": "tools.py",
    "scale": "scale/run.py",
    "gpu": "gpu/run.py",
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
    _guarded(_run, argv)


def _run(argv: list[str]) -> None:
    path, rest = split_config(argv[1:]) if argv[:1] == ["train"] else (None, argv)
    if path is not None:
        # --config is read here, not by tyro: the file's settings become the defaults of train's flags (tyro's
        # `default=`), so every flag on the command line overrides the file.
        cfg = tyro.cli(Annotated[DistillConfig, _NO_PREFIX], default=load_config(path), args=rest, prog="opd train",
                       description=" ".join(_commands()["train"].__doc__.split()),
                       registry=_flowing_help())
        return run_train(cfg)
    tyro.extras.subcommand_cli_from_dict(
        _commands(), args=argv, prog="opd", description="On-policy distillation. Benchmarks: opd bench NAME [--quick].",
        registry=_flowing_help(),
    )


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
