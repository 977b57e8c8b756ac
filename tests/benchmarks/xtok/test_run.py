import json
import math

from benchmarks.xtok import real_pair as xtok_real
from benchmarks.xtok import run as xtok
from tests.benchmarks.run_helpers import fields, run_config, run_metrics
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
    # which method each arm ran: the cross-tokenizer run trains the BPE student (a vocabulary of its own) on the
    # character teacher's grades, the same-tokenizer run the character student, SFT the BPE student on data rows
    work = tmp_path / "work-quick"
    bpe, char, teacher = (str(work / name) for name in ("student-bpe", "student-char", "teacher"))
    arms = {"cross_tokenizer": dict(student=bpe, teacher=teacher, source="student", loss="reverse_kl",
                                    cross_tokenizer=True),
            "same_tokenizer": dict(student=char, teacher=teacher, source="student", loss="reverse_kl",
                                   cross_tokenizer=False),
            "sft": dict(student=bpe, teacher=None, source="data", loss="sft", cross_tokenizer=False)}
    for method, want in arms.items():
        run = work / "runs" / method / "seed-0"
        assert fields(run_config(run), *want) == want, method
        rows = run_metrics(run)
        assert len(rows) == xtok.QUICK["steps"] and all(m["loss"] > 0 for m in rows)
        assert {m["source"] for m in rows} == {want["source"]}
        assert all((m["flops_teacher_score"] > 0) == (method != "sft") for m in rows)
    vocab = {name: json.loads((work / name / "config.json").read_text())["vocab_size"]
             for name in ("teacher", "student-char", "student-bpe")}
    assert vocab["student-char"] == vocab["teacher"] != vocab["student-bpe"]
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
