import json
import math

import pytest
import torch

from benchmarks.perf.pairs import padded_char_tokenizer
from benchmarks.perf.run import SYSTEMS, PerfArgs, command, perf
from benchmarks.perf.worker import step_flops
from opd import flops
from opd.lm.batch import layout
from opd.tasks import get_task
from opd.tasks.tokenizer import build_tokenizer
from tests.conftest import tiny_llama


def test_step_flops_from_lengths_equals_opd_flops_of_the_batch_layout(tokenizer):
    student, teacher = tiny_llama(tokenizer, 16, 1, seed=0), tiny_llama(tokenizer, 32, 2, seed=1)
    costs = flops.model_cost(student), flops.model_cost(teacher)
    prompts, completions = [[5, 6, 7], [8, 9], [5, 5, 5, 5, 5]], [[10, 11, 2], [12], [13, 14, 15, 16]]
    b = layout(prompts, completions, tokenizer.pad_token_id)
    expected = flops.step_flops(*costs, b.attention_mask_BL, b.mask_BT, "student", scored=True)["flops"]
    assert step_flops(costs, [3, 2, 5], [3, 1, 4]) == expected > 0


def test_padded_char_tokenizer_encodes_like_the_task_tokenizer_and_has_the_asked_size():
    base, padded = build_tokenizer(get_task("arithmetic")), padded_char_tokenizer(300)
    assert len(padded) == 300 and padded.eos_token_id == base.eos_token_id and padded.pad_token_id == base.pad_token_id
    for text in ("4827+596=", "7+6+0=13 ans=5423"):
        assert padded(text)["input_ids"] == base(text)["input_ids"]
    assert padded.decode([5, 299, 6]) == base.decode([5]) + "<f299>" + base.decode([6])
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        padded_char_tokenizer(10)


def test_command_lists_only_the_flags_that_differ_from_the_defaults():
    assert command(PerfArgs()) == "opd bench perf"
    assert command(PerfArgs(quick=True, lr=0.01, pairs=("tiny",))) == "opd bench perf --quick --pairs tiny --lr 0.01"


def test_quick_benchmark_writes_well_formed_results(tmp_path):
    results_dir = tmp_path / "results"
    perf(PerfArgs(quick=True, out_dir=str(tmp_path / "runs"), results_dir=str(results_dir)))
    results = json.loads((results_dir / "perf.json").read_text())
    assert results["quick"] is True
    for pair in ("tiny", "smollm2"):
        block = results[pair]
        # --quick: the overlap systems (sampler process and server) and compiled sampling on tiny only
        systems = SYSTEMS if pair == "tiny" else ("opd", "trl_distillation", "trl_gkd")
        assert set(systems) <= set(block)
        assert block["matmul_gflops"] > 0 and block["flop_limit_tokens_per_s"] > 0
        for system in systems:
            e = block[system]
            assert e["completion_tokens_per_s"] > 0 and e["step_time_s"] > 0 and e["peak_rss_mb"] >= e["import_rss_mb"]
            assert math.isfinite(e["heldout_reverse_kl"]) and e["heldout_reverse_kl"] >= 0
            assert 0 < e["mfu"] < 1 and e["timed_steps"] == block["settings"]["steps"] - block["settings"]["warmup"]
            # tokens/s, step time and tokens per step describe the same timed steps
            assert e["completion_tokens_per_s"] == pytest.approx(e["completion_tokens_per_step"] / e["step_time_s"])
            assert e["flop_limit_tokens_per_s"] == pytest.approx(e["completion_tokens_per_s"] / e["mfu"])
        assert block["goals"]["speedup_vs_trl_gkd"] == pytest.approx(
            block["opd"]["completion_tokens_per_s"] / block["trl_gkd"]["completion_tokens_per_s"])
        assert math.isfinite(block["opd"]["heldout_reverse_kl_start"])
    # the library's overlap: trainer and `opd serve` are two processes, and both count
    e = results["tiny"]["opd_sampler_overlap"]
    assert e["trainer_peak_rss_mb"] >= e["import_rss_mb"] and e["server_peak_rss_mb"] > 0
    assert e["peak_rss_mb"] == pytest.approx(e["trainer_peak_rss_mb"] + e["server_peak_rss_mb"])
    assert results["tiny"]["goals"]["sampler_overlap_speedup_vs_trl_gkd"] == pytest.approx(
        e["completion_tokens_per_s"] / results["tiny"]["trl_gkd"]["completion_tokens_per_s"])
    e = results["tiny"]["opd_overlap"]  # and so do the trainer and its sampler process
    assert e["trainer_peak_rss_mb"] >= e["import_rss_mb"] and e["sampler_peak_rss_mb"] > 0
    assert e["peak_rss_mb"] == pytest.approx(e["trainer_peak_rss_mb"] + e["sampler_peak_rss_mb"])
    text = (results_dir / "perf.md").read_text()
    # per pair: one measurement row and one goals row for opd, one measurement row per TRL trainer
    assert text.count("\n| opd |") == 4 and text.count("| TRL GKDTrainer") == 2 and "--quick" in text
    assert text.count("| tokens/s ÷ TRL Distillation |") == 2
    # tiny only (--quick): one measurement row and one goals row for each overlap system
    assert text.count("\n| opd --sampler --overlap (library) |") == 2
    assert text.count("\n| opd --overlap (library, sampler process) |") == 2
    assert text.count("\n| opd --sampling.compile |") == 2 and text.count("\n| opd --overlap --sampling.compile |") == 2
    assert text.count("MB trainer + ") == 3  # the two overlap systems and the server, tiny only
    assert (results_dir / "perf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
