"""The README's commands run, in order, with tiny local models in place of the hub's (as LitGPT and CleanRL test the
commands they document). `tests/test_readme.py` checks that every command parses; this one runs them.

Substituted, and nothing else: a hub id (`Org/Name`) becomes a tiny local model of its organisation's family (each
family has its own tokenizer, so pairing models of two families without --cross-tokenizer fails here as it would for
real): a 12-layer teacher after --teacher and as `opd student`'s TEACHER, a 1-layer student elsewhere;
`--student ...` / `--teacher ...` become the first family's models; a bare `...` in `opd train ... --out-dir D` the
flags of the earlier command that wrote D; and every train and eval gets flags that make it take seconds
(`FAST_TRAIN`, `FAST_EVAL`). The data files the commands name are written first, in the format the README describes.
Commands that need what a test machine lacks are listed in `NOT_RUN` with why.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from opd.cli import main
from tests.conftest import tiny_llama
from tests.test_readme import PYTHON_BLOCK, README, opd_args, shell_commands

FAST_TRAIN = ["--steps", "2", "--batch-size", "2", "--train-examples", "8", "--eval-examples", "2", "--eval-every",
              "0", "--sampling.max-new-tokens", "4", "--optim.warmup-steps", "0", "--no-progress"]
FAST_EVAL = ["--examples", "2", "--max-new-tokens", "4"]
NOT_RUN = {
    "quickstart": "the README's first command; CI's quickstart test runs it (tests/test_quickstart.py)",
    "serve": "a server that runs until stopped; tests/lm/test_serve.py starts it",
    "interpret": "needs a distilled tree from `opd bench robotics`; tests/control covers the command",
    "bench": "benchmarks; each has a --quick test in tests/benchmarks",
}
HUB_ID = re.compile(r"^[A-Za-z][\w-]*/[\w.-]+$")


def _remote(args: list[str]) -> bool:
    """A command that needs a running server (a vLLM or `opd serve` teacher or sampler): docs/scaling.md's part."""
    return any(a.startswith(("http://", "https://")) for a in args)


def _substituted(args: list[str], families: dict, earlier: dict) -> list[str]:
    out = []
    for i, token in enumerate(args):
        flag = args[i - 1] if i else ""
        if token == "..." and flag in ("--student", "--teacher"):
            out.append(next(iter(families.values()))[flag[2:]])
        elif token == "...":
            target = args[args.index("--out-dir") + 1]
            out.extend(earlier[target])  # the flags of the command that wrote --out-dir
        elif HUB_ID.match(token) and not token.startswith("runs/"):
            teacher = flag == "--teacher" or (args[0] == "student" and i == 1)
            out.append(families[token.split("/")[0]]["teacher" if teacher else "student"])
        else:
            out.append(token)
    return out


def _hub_families() -> list[str]:
    """The organisations of the hub ids the README names, in order of first appearance."""
    orgs = [t.split("/")[0] for _, tokens in shell_commands(README) for t in tokens
            if HUB_ID.match(t) and not t.startswith("runs/")]
    return list(dict.fromkeys(orgs))


@pytest.fixture
def workdir(tokenizer, tmp_path, monkeypatch):
    """A working directory with the README's data files, and per hub organisation the tiny teacher and student that
    stand in for its models, with a tokenizer of its own (the task's, plus 8 more tokens per family)."""
    families = {}
    for k, org in enumerate(_hub_families()):
        family_tokenizer = copy.deepcopy(tokenizer)
        family_tokenizer.add_tokens([f"<{org}_{i}>" for i in range(8 * k)])
        families[org] = {}
        for name, hidden, layers, seed in (("teacher", 32, 12, 1), ("student", 16, 1, 2)):
            path = tmp_path / "models" / org / name
            tiny_llama(family_tokenizer, hidden, layers, seed).save_pretrained(path)
            family_tokenizer.save_pretrained(path)
            families[org][name] = str(path)
    rows = [{"question": f"{a}+{b}=", "final": str(a + b)} for a in range(4) for b in range(4)]
    for name in ("prompts.jsonl", "heldout.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    return families


def test_the_readmes_commands_run_in_order_with_tiny_models(workdir, capsys):
    ran, skipped, earlier = [], [], {}
    for line, tokens in shell_commands(README):
        args = opd_args(tokens)
        if args is None:
            continue  # pip, venv, pytest, vllm: tests/test_readme.py says why each is not run
        if args[0] in NOT_RUN or _remote(args):
            skipped.append(line)
            continue
        args = _substituted(args, workdir, earlier)
        if args[0] == "train":
            args += FAST_TRAIN
            out_dir = args[args.index("--out-dir") + 1] if "--out-dir" in args else "runs/distill"
            earlier.setdefault(out_dir, [a for a in args[1:] if a != "--resume"])
        elif args[0] == "eval":
            args += FAST_EVAL
        try:
            main(args)
        except SystemExit as e:
            pytest.fail(f"README: `{line}` ran as `opd {' '.join(args)}` and exited {e.code}: "
                        f"{capsys.readouterr().err.strip()[-500:]}")
        ran.append(line)
    commands = {line.split()[1] for line in ran}
    assert {"train", "student", "merge", "eval"} <= commands, ran
    assert any("--resume" in line for line in ran) and any("--lora.r" in line for line in ran)
    assert Path("runs/lora-merged/config.json").exists() and Path("runs/mine/eval-samples.jsonl").exists()
    assert len(skipped) <= 6, skipped  # the server-bound and benchmark lines, nothing more
    assert len(workdir) >= 2  # the README names models of several families


def test_the_readmes_python_api_example_runs_after_its_commands(workdir, monkeypatch, capsys):
    # The Python block uses what the command block made (runs/student-10, prompts.jsonl): run those first.
    test_the_readmes_commands_run_in_order_with_tiny_models(workdir, capsys)
    import dataclasses

    import opd.lm.train
    from opd.config import OptimArgs, SamplingArgs

    fast = dict(steps=2, batch_size=2, train_examples=8, eval_every=1, progress=False,
                sampling=SamplingArgs(max_new_tokens=4), optim=OptimArgs(warmup_steps=0))
    real = opd.lm.train.distill
    monkeypatch.setattr(opd.lm.train, "distill", lambda cfg, *a, **k: real(dataclasses.replace(cfg, **fast), *a, **k))
    (block,) = [b for b in PYTHON_BLOCK.findall(README.read_text()) if "distill(" in b]
    def local(match: re.Match) -> str:  # student="Org/Name" / teacher="Org/Name": that family's tiny model
        role, name = match.groups()
        if not HUB_ID.match(name) or name.startswith("runs/"):
            return match.group(0)
        return f"{role}={workdir[name.split('/')[0]][role]!r}"

    block = re.sub(r'\b(student|teacher)="([^"]+)"', local, block)
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert printed[0] == "2" and float(printed[1]) >= 0 and 0 <= float(printed[2]) <= 1, printed
    assert Path("runs/api/checkpoint").exists()
