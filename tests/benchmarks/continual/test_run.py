"""The personalisation benchmark: its fictional corpus, and a --quick run through every stage and variant."""

import json

from benchmarks.continual import run as bench
from benchmarks.continual.company_docs import ATTRIBUTES, Corpus
from opd.lm.data.checkers import get_checker
from tests.benchmarks.run_helpers import fields, run_config, run_metrics


def test_corpus_states_every_fact_in_documents_and_training_qa_but_asks_it_in_other_words():
    corpus = Corpus.build(projects=12)
    assert Corpus.build(projects=12) == corpus  # the same facts for every seed of the benchmark
    values = [getattr(p, a) for p in corpus.projects for a in ("name", *ATTRIBUTES)]
    assert len(set(values)) == len(values)
    # no answer is a substring of another, so `contains` cannot credit the wrong fact
    assert not any(a != b and a in b for a in values for b in values)
    contains = get_checker("contains")
    documents = " ".join(r["completion"] for r in corpus.document_rows())
    train_questions = {r["messages"][0]["content"] for r in corpus.train_qa_rows()}
    questions = corpus.question_rows()
    assert len(questions) == 4 * 12 and len(corpus.document_rows()) == 3 * 12
    for row in questions:
        assert row["prompt"] not in train_questions
        assert contains(row, documents) == 1.0
        qa = [r for r in corpus.train_qa_rows() if contains(row, r["completion"])]
        assert len(qa) == 1  # stated in exactly one training answer


def test_quick_personalisation_runs_every_stage_and_writes_the_promised_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = bench.ContinualArgs(quick=True, sections=("personalisation",), out_dir=str(tmp_path / "out"))
    data = bench.continual_main(args)
    saved = json.loads((tmp_path / "out" / "continual_quick.json").read_text())
    assert saved["stages"] == data["stages"]
    for stage in ("base", "after_finetune", "after_self_distillation", "after_sft_on_base_samples"):
        assert set(saved["stages"][stage]) == {"knowledge", "instruction_following"}
        assert all(0.0 <= v <= 1.0 for v in saved["stages"][stage].values())
    runs = saved["personalisation"]["runs"]
    assert set(runs) == {"full", "lora"} and all(len(r) == 1 for r in runs.values())
    work = tmp_path / "runs" / "bench-continual-quick"
    # which method each stage ran: stage 1 fine-tunes the base model (the tiny pair's teacher) on the documents;
    # stage 2 starts from its model and learns from the base model on its own samples or on the base model's
    w = "runs/bench-continual-quick"  # the configs hold the paths as given, relative to the working directory
    for variant, rank in (("full", 0), ("lora", 2)):
        stage1 = f"{w}/{variant}/seed-0/stage1/{'checkpoint' if variant == 'full' else 'merged'}"
        arms = {"stage1": dict(student=f"{w}/tiny/teacher", teacher=None, source="data", loss="sft",
                               data=f"{w}/stage1.jsonl"),
                "self_distillation": dict(student=stage1, teacher=f"{w}/tiny/teacher", source="student",
                                          loss="reverse_kl", data=f"{w}/stage2.jsonl"),
                "sft_on_base_samples": dict(student=stage1, teacher=f"{w}/tiny/teacher", source="teacher",
                                            loss="sft", data=f"{w}/stage2.jsonl")}
        for stage, want in arms.items():
            run = work / variant / "seed-0" / stage
            if variant == "lora" and stage == "sft_on_base_samples":
                assert not run.exists()  # compared on full weights only
                continue
            cfg = run_config(run)
            assert fields(cfg, *want) == want and cfg["lora"]["r"] == rank, f"{variant} {stage}"
            rows = run_metrics(run)
            assert {m["source"] for m in rows} == {want["source"]}
            assert all((m["flops_teacher_generate"] > 0) == (stage == "sft_on_base_samples") for m in rows)
    assert (work / "lora" / "seed-0" / "stage1" / "checkpoint" / "adapter_config.json").exists()
    table = (tmp_path / "out" / "continual_quick.md").read_text()
    assert table.count("\n| after") == 5 and "| base model |" in table  # LoRA: no SFT-on-base-samples row
