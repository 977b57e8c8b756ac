"""The README and the docs run as written: every command parses, every file, module and benchmark they name exists.

Each command line of a ```bash, ```sh or ```console block (console: the lines after a `$ ` prompt) is checked by
what it runs:
- `opd SUBCOMMAND ...`, also under `accelerate launch ... -m opd.cli`: parsed by tyro exactly as `opd` parses it
  (`opd.cli`'s commands and help registry), without running. That runs `DistillConfig`'s own checks (flag
  combinations, numbers), and a train command may set no flag its configuration ignores (`opd.config_notes.unused_flags`).
  `...` is the docs' placeholder: after a flag it stands for a value, anywhere else for flags left out (a train
  command then gets a placeholder `--student`).
- `opd bench NAME`, here or anywhere in the text: NAME is one of `opd.cli.BENCHMARKS` and its file exists.
- `python -m pytest`: the README's second command is exactly what CI (`.ci/run`) runs.
- Not run, for the reason given in `SKIPPED`: virtualenv creation and activation, `pip install` (they reach package
  indexes; CI runs the README's install commands through `.ci/run`), and other programs' commands (vLLM, the hub CLI).
Any other command fails the test, so a new kind of command gets a rule here.

Python blocks must compile, and what they import from opd must exist. Markdown links, backquoted repository paths
(`opd/lm/train.py:distill`) and dotted module names (`opd.lm.hf.pretrained.smollm2_dir`) must point at something that
exists, and the package trees in README.md and DEVELOPERS.md must match the files under opd/ (every module of opd/
and opd/lm/ named, every name real). Nothing here imports torch or loads a model: a few seconds in all.
"""

from __future__ import annotations

import ast
import inspect
import re
import shlex
from pathlib import Path

import pytest
import tyro

from opd import cli
from opd.config import DistillConfig
from opd.config_notes import unused_flags

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(bash|sh|console)\n(.*?)^```", re.M | re.S)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
TEXT_BLOCK = re.compile(r"^```text\n(.*?)^```", re.M | re.S)
PLACEHOLDER = "PLACEHOLDER"
SKIPPED = {
    "venv": "makes a virtualenv: nothing of opd to check",
    ".": "activates a virtualenv",
    "source": "activates a virtualenv",
    "pip": "installs from a package index: not run here; CI runs the README's install commands (.ci/run)",
    "vllm": "another program (vLLM), with its own flags",
    "lm_eval": "another program (lm-evaluation-harness), with its own flags",
    "hf": "another program (the Hugging Face hub CLI), with its own flags",
}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def shell_commands(doc: Path) -> list[tuple[str, list[str]]]:
    """(the line as written, its tokens) for every command of every shell block of `doc`, `&&`/`;`/`|` split."""
    found = []
    for lang, body in SHELL_BLOCK.findall(doc.read_text()):
        lines = body.replace("\\\n", " ").splitlines()
        if lang == "console":
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        for line in lines:
            tokens, command = shlex.split(line, comments=True), []
            for token in [*tokens, "&&"]:
                if token in ("&&", "||", ";", "|"):
                    if command:
                        found.append((line.strip(), command))
                    command = []
                else:
                    command.append(token)
    return found


def opd_args(tokens: list[str]) -> list[str] | None:
    """The arguments `opd` gets from this command, or None if it does not run opd."""
    if tokens[0] == "opd":
        return tokens[1:]
    if tokens[0] == "accelerate" and "opd.cli" in tokens:
        return tokens[tokens.index("opd.cli") + 1:]
    return None


def with_placeholders(args: list[str]) -> list[str]:
    out, elided = [], False
    for i, token in enumerate(args):
        if token != "...":
            out.append(token)
        elif i and args[i - 1].startswith("--"):
            out.append(PLACEHOLDER)
        else:
            elided = True
    if elided and out[:1] == ["train"] and "--student" not in out:
        out += ["--student", PLACEHOLDER]
    return out


def parse(args: list[str]):
    """What `opd` parses `args` into, without running anything (tyro's SystemExit on a bad flag)."""
    command = cli._commands()[args[0]]
    (param,) = inspect.signature(command).parameters.values()
    if args[0] == "train":
        # `--config FILE` is read by opd before tyro (an earlier command may write FILE): parse the flags over it
        path, rest = cli.split_config(args[1:])
        if path is not None:
            args = ["train", *rest, *([] if "--student" in rest else ["--student", PLACEHOLDER])]
    return tyro.cli(param.annotation, args=args[1:], prog=f"opd {args[0]}", registry=cli._flowing_help())


def check_bench(name: str, where: str) -> None:
    assert name in cli.BENCHMARKS, f"{where}: `opd bench {name}`: no such benchmark; one of {', '.join(cli.BENCHMARKS)}"
    assert (ROOT / "benchmarks" / cli.BENCHMARKS[name]).exists(), f"{where}: benchmarks/{cli.BENCHMARKS[name]} is gone"


COMMANDS = [pytest.param(doc, line, tokens, id=f"{rel(doc)}: {' '.join(tokens)[:80]}")
            for doc in DOCS for line, tokens in shell_commands(doc)]


@pytest.mark.parametrize("doc,line,tokens", COMMANDS)
def test_command_runs_as_written(doc, line, tokens):
    where = f"{rel(doc)}: `{line}`"
    args = opd_args(tokens)
    if args is None:
        program = "venv" if tokens[:3] in (["python3", "-m", "venv"], ["python", "-m", "venv"]) else tokens[0]
        if tokens[:3] == ["python", "-m", "pytest"]:
            return  # the suite itself; the README's whole line is compared with CI's below
        assert program in SKIPPED, f"{where}: a command this test has no rule for; add one to tests/test_readme.py"
        return
    if args[:1] == ["bench"]:
        check_bench(args[1], where)
        return
    assert args[0] in cli._commands(), f"{where}: `opd {args[0]}`: no such command"
    try:
        parsed = parse(with_placeholders(args))
    except SystemExit as e:
        pytest.fail(f"{where}: opd rejects it (exit {e.code}; tyro's message is above)")
    except ValueError as e:  # DistillConfig's own checks
        pytest.fail(f"{where}: {e}")
    if isinstance(parsed, DistillConfig):
        assert not unused_flags(parsed), f"{where}: sets flags its configuration ignores: {unused_flags(parsed)}"


def test_the_readme_leads_with_the_two_commands_and_ci_runs_the_second():
    blocks = [body.strip() for _, body in SHELL_BLOCK.findall(README.read_text())]
    first, second = blocks[:2]
    assert first.endswith("&& opd quickstart") and "pip install -e ." in first
    assert second.endswith("&& python -m pytest") and 'pip install -e ".[test]"' in second
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set "))]
    assert ci[-1] == second, f".ci/run runs `{ci[-1]}`, the README says `{second}`"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_named_benchmark_exists(doc):
    for name in re.findall(r"opd bench (\w+)", doc.read_text()):
        if not name.isupper():  # `opd bench NAME`: a placeholder
            check_bench(name, rel(doc))


def module_file(dotted: list[str]) -> tuple[Path | None, list[str]]:
    """The file of the longest module prefix of `dotted` (a package's __init__.py) and the names after it."""
    for n in range(len(dotted), 0, -1):
        base = ROOT.joinpath(*dotted[:n])
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.exists():
                return path, dotted[n:]
    return None, dotted


def check_names(path: Path, names: list[str], where: str) -> None:
    if names:
        assert re.search(rf"\b{re.escape(names[0])}\b", path.read_text()), f"{where}: {rel(path)} has no {names[0]}"


def check_python(code: str, where: str) -> None:
    """`code` compiles, and what it takes from opd exists."""
    for node in ast.walk(ast.parse(code)):  # a SyntaxError names the line
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "opd":
            for alias in node.names:
                path, rest = module_file([*node.module.split("."), alias.name])
                assert path, f"{where}: no module {node.module}"
                check_names(path, rest, f"{where}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "opd":
            check_names(ROOT / "opd" / "__init__.py", [node.attr], f"{where}: opd.{node.attr}")


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_python_blocks_compile_and_import_what_exists(doc):
    for code in PYTHON_BLOCK.findall(doc.read_text()):
        check_python(code, rel(doc))


def anchors(doc: Path) -> set[str]:
    from benchmarks.report import anchor

    return {anchor(h) for h in re.findall(r"^#+ (.+)$", doc.read_text(), re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_links_paths_and_modules_exist(doc):
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S)  # prose only; blocks are checked above
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, fragment = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{rel(doc)}: link to {target}: no such file"
        if fragment and linked.suffix == ".md":
            assert fragment in anchors(linked), f"{rel(doc)}: link to {target}: no such heading"
    for span in re.findall(r"`([^`\n]+)`", text):
        if m := re.fullmatch(r'python -c "(.*)"', span):
            check_python(m[1], f"{rel(doc)}: `{span}`")
        elif re.search(r"\b[A-Z][A-Z_]+\b", span):
            continue  # `benchmarks/results/NAME.md`: a placeholder
        elif m := re.fullmatch(r"((?:opd|benchmarks|tests|docs)/[\w./-]*?)(?::(\w+))?", span):
            path = ROOT / m[1]
            assert path.exists(), f"{rel(doc)}: `{span}`: no such file"
            if m[2]:
                check_names(path, [m[2]], f"{rel(doc)}: `{span}`")
        elif re.fullmatch(r"opd(\.\w+)+", span):
            path, rest = module_file(span.split("."))
            assert path, f"{rel(doc)}: `{span}`: no such module"
            check_names(path, rest, f"{rel(doc)}: `{span}`")


def tree_files(block: str) -> tuple[set[Path], set[Path]]:
    """(directories, files) a package tree names. A line's first word ending in `/` is a directory and every
    `name.py` / `name.md` after it is a file in it; otherwise the line's files are in the directory above it.
    Lines without a branch continue the entry above them."""
    dirs, files, stack, current = set(), set(), [], ROOT
    for line in block.splitlines():
        branch = re.search(r"[├└]── ", line)
        if branch:
            depth, entry = branch.start() // 4 + 1, line[branch.end():]
        elif line[:1] in ("│", " "):
            depth, entry = None, line.strip("│ ")
        else:
            depth, entry = 0, line
        if depth is not None:
            stack = stack[:depth]
            first = entry.split()[0]
            if first.endswith("/"):
                stack.append(first.rstrip("/"))
                dirs.add(current := ROOT.joinpath(*stack))
            else:
                current = ROOT.joinpath(*stack)
        files.update(current / name for name in re.findall(r"\b[\w]+\.(?:py|md)\b", entry))
    return dirs, files


@pytest.mark.parametrize("doc", [README, ROOT / "DEVELOPERS.md"], ids=rel)
def test_the_package_tree_matches_the_files(doc):
    (block,) = [b for b in TEXT_BLOCK.findall(doc.read_text()) if b.startswith("opd/")]
    dirs, files = tree_files(block)
    for path in sorted(dirs | files):
        assert path.exists(), f"{rel(doc)}: the tree names {rel(path)}, which does not exist"
    modules = {p for p in [*(ROOT / "opd").glob("*.py"), *(ROOT / "opd" / "lm").rglob("*.py")]
               if p.name != "__init__.py"}
    missing = sorted(rel(p) for p in modules - files)
    assert not missing, f"{rel(doc)}: the tree leaves out {missing}"
