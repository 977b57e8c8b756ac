import json
from pathlib import Path

from benchmarks import privileged
from tests.benchmarks.run_helpers import fields, run_config, run_metrics

ARMS = {"self_privileged": (dict(teacher="self", source="student", loss="reverse_kl"), True),
        "sft": (dict(source="data", loss="sft"), False),
        "self_plain": (dict(teacher="self", source="student", loss="reverse_kl"), False)}
"""What each arm must run, and whether its data gives the teacher the solution (written out here: the benchmark's
ARMS could be wrong)."""


def test_quick_privileged_runs_every_arm_and_writes_results(tmp_path, monkeypatch):
    monkeypatch.setattr(privileged, "RESULTS", tmp_path / "results")
    results = privileged.main(privileged.PrivilegedArgs(out_dir=str(tmp_path / "runs")), quick=True)
    saved = json.loads((tmp_path / "results" / "privileged_quick.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(ARMS) <= set(saved) and "--quick run" in privileged.section(saved)
    out = Path(saved["args"]["out_dir"])
    for key, (want, with_solution) in ARMS.items():
        assert len(saved[key]["final_accuracy_per_seed"]) == 1 and 0 <= saved[key]["mean"] <= 1
        run = out / key / "seed-0"
        config = run_config(run)
        assert fields(config, *want) == want, key
        rows = [json.loads(line) for line in Path(config["data"]).read_text().splitlines()]
        assert all(("teacher_prompt" in r) == with_solution for r in rows), key
        if with_solution:  # the teacher's prompt holds the row's own worked solution, then the problem
            assert all(r["teacher_prompt"] == f"{r['prompt']}{r['completion']} {r['prompt']}" for r in rows)
        assert len(run_metrics(run)) == saved["args"]["steps"]


def test_quick_personalisation_gives_the_teacher_each_questions_document_and_scores_every_arm(tmp_path, monkeypatch):
    monkeypatch.setattr(privileged, "RESULTS", tmp_path / "results")
    monkeypatch.chdir(tmp_path)  # the continual work directory (runs/bench-continual-quick) goes here
    privileged.main(privileged.PrivilegedArgs(sections=("personalisation",)), quick=True)
    saved = json.loads((tmp_path / "results" / "privileged_quick.json").read_text())["personalisation"]
    assert set(saved["arms"]) == {"after_finetune", "with_documents", "self_distillation", "sft_on_base_samples"}
    for arm in saved["arms"].values():
        assert len(arm["knowledge"]) == len(arm["instruction_following"]) == 1
    assert 0 <= saved["teacher_with_documents"]["knowledge"] <= 1
    assert "stage 2 with the documents" in privileged.section({**saved, "personalisation": saved, "quick": True})
    run = tmp_path / "runs" / "bench-continual-quick" / "full" / "seed-0" / "with_documents"
    config = run_config(run)
    assert fields(config, "source", "loss") == {"source": "student", "loss": "reverse_kl"}
    rows = [json.loads(line) for line in Path(config["data"]).read_text().splitlines()]
    questions = [r for r in rows if r["teacher_messages"] != r["messages"]]
    assert questions and len(questions) == len(rows) // 2
    for r in questions:  # the teacher reads the project's page, then the student's own question
        page, question = r["teacher_messages"][0]["content"].split("\n\n")
        assert question == r["messages"][0]["content"] and "wiki" in page
        assert f"Project {question.split('Project ')[1].split()[0].rstrip('?')}" in page
