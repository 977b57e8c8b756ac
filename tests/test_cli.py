import pytest

from opd.cli import main


def run_cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_bad_input_is_one_line_on_stderr_and_exit_code_2(model_dirs, tmp_path, capsys):
    code, err = run_cli(["train", "--student", model_dirs["student"], "--teacher", model_dirs["teacher"],
                         "--loss", "kl2", "--out-dir", str(tmp_path)], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("opd: error: unknown loss 'kl2'; choose one of")


def test_missing_model_directory_is_a_clear_error(tmp_path, capsys):
    code, err = run_cli(["train", "--student", str(tmp_path / "nope"), "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and err.startswith("opd: error:") and "nope" in err


def test_train_subcommand_runs_and_reports(model_dirs, tmp_path, capsys):
    main(["train", "--student", model_dirs["student"], "--teacher", model_dirs["teacher"], "--steps", "1",
          "--batch-size", "2", "--eval-examples", "2", "--sampling.max-new-tokens", "4", "--no-progress",
          "--out-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "done: step 1" in out and (tmp_path / "run" / "checkpoint" / "model.safetensors").exists()


def test_train_and_eval_on_your_own_files(model_dirs, tmp_path, capsys):
    from opd.tasks import get_task

    examples = get_task("arithmetic").examples(8, seed=0, split="train")
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(f'{{"q": "{e.prompt}", "a": "{e.answer}"}}\n' for e in examples))
    main(["train", "--student", model_dirs["student"], "--teacher", model_dirs["teacher"], "--steps", "1",
          "--batch-size", "2", "--data", str(data), "--eval-data", str(data), "--data-fields", "prompt=q,answer=a",
          "--checker", "numeric", "--sampling.max-new-tokens", "4", "--no-progress", "--out-dir", str(tmp_path / "run")])
    assert "done: step 1, accuracy 0.0" in capsys.readouterr().out  # the untrained student gets none right
    main(["eval", str(tmp_path / "run" / "checkpoint"), "--data", str(data), "--data-fields", "prompt=q,answer=a",
          "--checker", "regex:ans=(\\d+)", "--examples", "3", "--max-new-tokens", "4"])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"examples": 3' in printed and '"checker": "regex:ans=(\\\\d+)"' in printed
    code, err = run_cli(["eval", model_dirs["student"], "--data", str(data), "--checker", "exact"], capsys)
    assert code == 2 and err.strip().endswith("map one with --data-fields prompt=COLUMN")


def train_args(dirs, out, *extra):
    return ["train", "--student", dirs["student"], "--teacher", dirs["teacher"], "--steps", "1", "--batch-size", "2",
            "--eval-examples", "2", "--sampling.max-new-tokens", "4", "--optim.warmup-steps", "1", "--no-progress",
            "--out-dir", str(out), *extra]


@pytest.mark.parametrize("flags,match", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--batch-size", "-1"], "--batch-size must be >= 1"),
    (["--sampling.top-p", "0"], "--sampling.top-p must be in (0, 1]"),
    (["--optim.grad-accum", "3"], "--optim.grad-accum 3 must divide the 2 sequences"),
])
def test_bad_numbers_are_one_line_naming_the_flag_and_nothing_is_written(model_dirs, tmp_path, capsys, flags, match):
    code, err = run_cli(train_args(model_dirs, tmp_path / "run", *flags), capsys)
    assert code == 2 and err.startswith("opd: error: ") and match in err, err
    assert err.strip().count("\n") == 0 and not (tmp_path / "run").exists()


def test_model_paths_that_hold_no_model_say_so_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    code, err = run_cli(["train", "--student", "runs/nothere"], capsys)  # one slash: not taken for a hub id
    assert code == 2 and "no model at runs/nothere: the path does not exist" in err
    code, err = run_cli(["train", "--student", "runs"], capsys)
    assert code == 2 and "no model at runs: the directory has no config.json" in err


def test_a_damaged_checkpoint_is_named_on_resume_and_on_eval(model_dirs, tmp_path, capsys):
    main(train_args(model_dirs, tmp_path / "run"))
    weights = tmp_path / "run" / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for argv in (train_args(model_dirs, tmp_path / "run", "--resume", "--steps", "2"),
                 ["eval", str(tmp_path / "run" / "checkpoint"), "--examples", "2"]):
        code, err = run_cli(argv, capsys)
        assert code == 2 and f"checkpoint file {weights} is damaged" in err and err.strip().count("\n") == 0


def test_flags_that_do_nothing_and_resume_surprises_are_warned_about(model_dirs, tmp_path, capsys):
    main(train_args(model_dirs, tmp_path / "run", "--lmbda", "0.3", "--resume"))
    err = capsys.readouterr().err
    assert "opd: warning: --lmbda does nothing here: only --source mixture reads it" in err
    assert "opd: warning: --resume found no checkpoint" in err
    main(train_args(model_dirs, tmp_path / "run", "--resume", "--steps", "2", "--optim.lr", "0.01"))
    assert "resuming at step 1 with changed settings: lmbda 0.3 -> 0.5; steps 1 -> 2; optim.lr 0.001 -> 0.01" in capsys.readouterr().err


def test_serve_on_a_port_in_use_stops_before_loading(model_dirs, capsys):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, err = run_cli(["serve", "/no/such/model", "--port", str(port)], capsys)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


@pytest.mark.parametrize("flag", ["--read-timeout", "--max-connections", "--max-header-bytes", "--max-queued-seqs"])
def test_serve_limits_must_be_positive_and_say_so_before_loading(flag, capsys):
    code, err = run_cli(["serve", "/no/such/model", flag, "0"], capsys)
    assert code == 2 and err.strip() == f"opd: error: {flag} must be > 0, not 0"


HELP_WITHOUT_TORCH = """
import contextlib, io, sys
from opd.cli import main

for argv in (["train", "--help"], ["eval", "--help"], ["serve", "--help"], ["bench"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), contextlib.suppress(SystemExit):
        main(argv)
    print(out.getvalue() + "\\f")
assert "torch" not in sys.modules, "building the parser imported torch"
"""


def test_help_flows_shows_choices_and_metavars_and_imports_no_torch():
    import os
    import subprocess
    import sys

    import docstring_parser  # tyro's own docstring reader

    from opd.config import LOSSES, DistillConfig, LoraArgs, OptimArgs, SamplingArgs
    from opd.losses import DIVERGENCES

    # A terminal wide enough that tyro wraps nothing: each field's help is then one line if its docstring flows.
    done = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "1000"})
    assert done.returncode == 0, done.stderr
    train, evaluate, serve, bench, _ = done.stdout.split("\f")
    assert LOSSES == ("sampled", "sft", *DIVERGENCES) and "--loss {" + ",".join(LOSSES) + "}" in train
    lines = [line.strip("│ ") for line in train.splitlines()]  # tyro draws boxes in UTF-8 or, here, in ASCII
    # Docstrings are wrapped at 120 columns; joined, these phrases sit on one line (they were split after "bf16",
    # and before "`--overlap`" in a nested group).
    assert any("on CPUs with bf16 instructions and on GPUs" in line for line in lines)
    assert any("(local sampling only: in-process and the `--overlap` sampler process)" in line for line in lines)
    # So does every field's help that tyro does not wrap for width (it wraps at about 500 characters).
    checked = 0
    for cls in (DistillConfig, SamplingArgs, OptimArgs, LoraArgs):
        for param in docstring_parser.parse_from_object(cls).params:
            text = " ".join(param.description.split())
            if len(text) < 450:
                assert any(text in line for line in lines), f"--help breaks the help of {cls.__name__}.{param.arg_name}"
                checked += 1
    assert checked > 40
    for text, usage, positional in ((evaluate, "opd eval [-h] [EVAL OPTIONS] MODEL", "MODEL"),
                                    (serve, "opd serve [-h] [SERVE OPTIONS] MODEL_DIR", "MODEL_DIR")):
        assert f"usage: {usage}\n" in text
        assert any(line.strip("│ ").startswith(positional + "  ") for line in text.splitlines())
    assert bench.strip().startswith("opd: error: usage: opd bench NAME")  # `opd bench` alone needs no torch either
