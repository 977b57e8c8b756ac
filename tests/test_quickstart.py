import json

from opd import quickstart as qs
from tests.benchmarks.run_helpers import fields, run_config, run_metrics
from tests.conftest import tiny_llama


def test_quickstart_plumbing_writes_results_and_prints_the_table(tokenizer, tmp_path, monkeypatch, capsys):
    # tiny stand-ins for the cached teacher and the warm start; the real ones are exercised by the README command
    monkeypatch.setattr(qs, "get_teacher", lambda: (tiny_llama(tokenizer, 16, 1, seed=0), tokenizer, {}))
    monkeypatch.setattr(qs, "warm_start_student", lambda tok, seed, steps: tiny_llama(tok, 8, 1, seed=seed))
    args = qs.QuickstartArgs(seeds=(0, 1), steps=2, batch_size=2, eval_examples=3, out_dir=str(tmp_path), threads=1)
    results = qs.quickstart(args)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seeds"] == [0, 1]
    assert 0.0 <= saved["student before"] <= 1.0
    for row in qs.METHODS:
        assert len(saved[row]) == 2 and all(0.0 <= v <= 1.0 for v in saved[row])
    assert results["teacher"] == saved["teacher"]
    # which method each row ran: a run's directory is named by its source; its last evaluation is the row's value
    for name, want in {"on-policy distillation": dict(source="student", loss="reverse_kl"),
                       "SFT on teacher samples": dict(source="teacher", loss="sft")}.items():
        for seed in (0, 1):
            run = tmp_path / f"seed-{seed}" / qs.METHODS[name]["source"]
            want = dict(want, student=str(tmp_path / "warm-start"), teacher=str(tmp_path / "teacher"), seed=seed)
            assert fields(run_config(run), *want) == want, name
            rows = run_metrics(run)
            assert {m["source"] for m in rows} == {want["source"]} and rows[-1]["accuracy"] == saved[name][seed]
    captured = capsys.readouterr()
    table = captured.out
    # one overall line per run, naming the method and seed; transformers' own load/save bars stay quiet
    assert [line.split(" (")[0] for line in table.splitlines() if line.startswith("[")] == [
        "[1/4] on-policy distillation, seed 0", "[2/4] SFT on teacher samples, seed 0",
        "[3/4] on-policy distillation, seed 1", "[4/4] SFT on teacher samples, seed 1"]
    assert "Writing model shards" not in captured.err and "distill student reverse_kl seed 1" in captured.err
    # the README's row labels
    assert "| model | held-out accuracy (3 problems) | per seed |" in table
    assert "| on-policy distillation (2 updates, per-token reverse KL) |" in table
    assert "| SFT on teacher samples (2 updates) |" in table
    assert "| student before (" in table and "M params, SFT on ground truth until 20 % on training problems) |" in table
