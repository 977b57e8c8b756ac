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
