import json
import math

from benchmarks.xtok import real_pair as xtok_real
from benchmarks.xtok import run as xtok
from tests.conftest import tiny_llama
from tests.lm.xtok_helpers import chat_tokenizers


def test_quick_xtok_runs_every_method_and_writes_results(tmp_path):
    results = xtok.main(xtok.XtokArgs(quick=True, out_dir=str(tmp_path / "work"), results_dir=str(tmp_path / "res"),
                                      threads=1))
    saved = json.loads((tmp_path / "res" / "xtok_quick.json").read_text())
    assert saved["student_before"] == results["student_before"] and 0.0 <= results["student_before"] <= 1.0
    for method in xtok.METHODS:
        per_seed = saved[method]["per_seed"]
        assert len(per_seed) == len(xtok.QUICK["seeds"]) and all(0.0 <= a <= 1.0 for a in per_seed)
        assert saved[method]["final_accuracy"] == sum(per_seed) / len(per_seed)
    # the cross-tokenizer run trained the BPE student (its vocabulary), from the character teacher
    run = tmp_path / "work-quick" / "runs" / "cross_tokenizer" / "seed-0"
    assert json.loads((run / "config.json").read_text())["cross_tokenizer"] is True
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == xtok.QUICK["steps"] and all(loss > 0 for loss in losses)
    section = (tmp_path / "res" / "xtok_quick.md").read_text()
    assert section.count("\n| ") == 1 + 3  # header and the three methods (the separator row starts with |-)


def test_the_real_pair_measurement_runs_end_to_end_on_tiny_models_with_two_templates(tmp_path):
    student_tok, teacher_tok = chat_tokenizers()
    dirs = {}
    for name, tok, hidden in (("teacher", teacher_tok, 32), ("student", student_tok, 16)):
        tiny_llama(tok, hidden, 1, 1, max_pos=256).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    args = xtok.XtokArgs(real_steps=2, real_batch_size=2, real_max_new_tokens=8, real_lr=1e-3, threads=1)
    real = xtok_real.real_pair(args, tmp_path / "work", teacher_dir=dirs["teacher"], student_dir=dirs["student"])
    assert real["kl_before"] > 0 and math.isfinite(real["kl_after"]) and real["kl_after"] != real["kl_before"]
    assert real["held_out_prompts"] == len(xtok_real.prompt_rows("test")) and 0 <= real["multi_token_span_share"] <= 1
    lines = (tmp_path / "work" / "runs" / "real_pair" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
