import json

import pytest
import torch

pytest.importorskip("if_verifiable", reason="the ifeval extra (if-verifiable) installs on Python >= 3.11 only")

from benchmarks import realdata as rd  # noqa: E402 (after the skip)


def test_quick_realdata_runs_every_row_through_data_files_and_writes_results(tmp_path, monkeypatch):
    monkeypatch.setattr(rd, "RESULTS", tmp_path / "results")
    results = rd.main(rd.RealDataArgs(work_dir=str(tmp_path / "work")), quick=True)
    saved = json.loads((tmp_path / "results" / "realdata_quick.json").read_text())
    assert saved["methods"] == results["methods"]
    assert set(results["runs"]) == {f"{m} ({v})" for m in rd.METHODS for v in ("full", "LoRA")}
    assert results["teacher"]["reverse_kl"] == 0.0 and results["student before"]["reverse_kl"] > 0
    for runs in results["runs"].values():
        assert len(runs) == 1 and all(0.0 <= r["if_heldout"] <= 1.0 and r["reverse_kl"] > 0 for r in runs)
    # the LoRA runs saved adapters; the full ones whole weights
    lora = tmp_path / "work-quick" / "runs" / "LoRA" / "student" / "seed-0" / "checkpoint"
    assert (lora / "adapter_config.json").exists()
    section = rd.section(results)
    assert section.count("\n| ") == 2 + 4 + 1  # header, teacher, student before, four methods


def test_layer_subset_keeps_evenly_spaced_layers_and_runs(tmp_path, model_dirs):
    out = rd.layer_subset(model_dirs["teacher"], 1, tmp_path / "cut")  # the tiny teacher has 2 layers
    from opd.lm.hf.model import load_model

    teacher, cut = load_model(model_dirs["teacher"]), load_model(out)
    assert cut.config.num_hidden_layers == 1
    assert torch.equal(cut.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    ids = torch.tensor([[5, 6, 7]])
    assert cut.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)  # the KV cache indexes its layers
