import json

import torch

from opd.cli import main
from opd.lm.eval import heldout_reverse_kl
from opd.lm.hf.model import load_model
from opd.lm.batch import encode_prompts
from opd.lm.rollouts.local import sample
from opd.losses import reverse_kl
from opd.tasks import get_task

PROMPTS = [e.prompt for e in get_task("arithmetic").examples(6, seed=0, split="test")]


def test_heldout_reverse_kl_is_zero_against_itself_and_matches_brute_force(model_dirs, tokenizer):
    student, teacher = load_model(model_dirs["student"]), load_model(model_dirs["teacher"])
    assert abs(heldout_reverse_kl(teacher, teacher, tokenizer, PROMPTS, 8, seed=3)) < 1e-6
    got = heldout_reverse_kl(student, teacher, tokenizer, PROMPTS, 8, batch_size=4, seed=3)
    # brute force: the same seeded samples, full logits of both models, mean over completion tokens
    torch.manual_seed(3)
    ids = encode_prompts(tokenizer, PROMPTS, 100)
    total, count = 0.0, 0
    for start in (0, 4):
        b = sample(student, ids[start : start + 4], tokenizer.pad_token_id, tokenizer.eos_token_id, 8)
        with torch.no_grad():
            s = student(b.input_ids_BL, attention_mask=b.attention_mask_BL).logits[:, :-1].log_softmax(-1)
            t = teacher(b.input_ids_BL, attention_mask=b.attention_mask_BL).logits[:, :-1].log_softmax(-1)
        kl = reverse_kl(s, t)[b.mask_BT.bool()]
        total, count = total + kl.sum().item(), count + kl.numel()
    assert got > 1e-3 and abs(got - total / count) < 1e-5


def test_eval_command_prints_accuracy_and_kl(model_dirs, tmp_path, capsys):
    out = tmp_path / "eval.json"
    main(["eval", model_dirs["student"], "--teacher", model_dirs["teacher"], "--examples", "4",
          "--max-new-tokens", "6", "--out-json", str(out)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert 0.0 <= printed["accuracy"] <= 1.0 and printed["reverse_kl"] > 0 and printed["examples"] == 4


def test_eval_command_takes_a_lora_checkpoint(model_dirs, tokenizer, tmp_path, capsys):
    # A LoRA run's checkpoint holds an adapter and no config.json: the prompts' length limit comes from its base model.
    from peft import LoraConfig, get_peft_model

    from opd.checkpoint import save_checkpoint

    torch.manual_seed(0)
    lora = get_peft_model(load_model(model_dirs["student"]), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoint", lora, tokenizer, step=1)
    assert not (ckpt / "config.json").exists()
    main(["eval", str(ckpt), "--examples", "2", "--max-new-tokens", "4"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["model"] == str(ckpt) and printed["examples"] == 2


def test_eval_and_serve_take_threads(model_dirs):
    # Like `opd train --threads`: a busy machine is not made slower by one torch thread per core.
    from opd.lm.serve.app import ServeArgs, load_served

    try:
        main(["eval", model_dirs["student"], "--examples", "1", "--max-new-tokens", "2", "--threads", "2"])
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        load_served(ServeArgs(model_dir=model_dirs["student"], threads=3))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(1)  # the tests' own setting (tests/conftest.py)


def test_eval_writes_its_json_into_a_folder_it_makes(model_dirs, tmp_path):
    out = tmp_path / "evals" / "x.json"
    main(["eval", model_dirs["student"], "--examples", "1", "--max-new-tokens", "2", "--out-json", str(out)])
    assert json.loads(out.read_text())["examples"] == 1


def test_eval_writes_and_shows_the_completions_it_scored(model_dirs, tmp_path, capsys, monkeypatch):
    # Debugging an accuracy of 0.0 needs the completions the checker saw. A checker that accepts only the rows with an
    # even answer shows that each completion is scored against its own row.
    import opd.lm.data.checkers as checkers

    seen = []

    def even_answers_only(row, completion):
        seen.append((row["prompt"], completion))
        return float(int(row["answer"]) % 2 == 0)

    monkeypatch.setattr(checkers, "get_checker", lambda spec: even_answers_only)
    out = tmp_path / "evals" / "samples.jsonl"
    main(["eval", model_dirs["student"], "--examples", "4", "--max-new-tokens", "3", "--samples", str(out),
          "--show", "2"])
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # the first call tried the checker on the first row before any model loaded
    assert seen[0][0] == rows[0]["prompt"] and [(r["prompt"], r["completion"]) for r in rows] == seen[1:]
    assert len(rows) == 4 and [r["score"] for r in rows] == [float(int(r["answer"]) % 2 == 0) for r in rows]
    assert json.loads(captured.out.strip().splitlines()[-1])["accuracy"] == sum(r["score"] for r in rows) / 4
    shown = [line for line in captured.err.splitlines() if line.startswith("score ")]
    assert len(shown) == 2 and repr(rows[1]["completion"]) in shown[1]


def test_eval_tries_the_checker_first_and_takes_a_run_directory(model_dirs, tmp_path, capsys):
    """A user's checker that raises stopped `opd eval` with a traceback after generating; a run directory (which `opd
    merge` takes) failed with a tokenizer error. Now: one line before any model loads; the run's checkpoint."""
    from opd.config import DistillConfig, SamplingArgs
    from opd.lm.train import distill

    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "answer": int(e.answer)}) + "\n"
                            for e in get_task("arithmetic").examples(3, seed=0, split="test")))
    (tmp_path / "mine.py").write_text("def contains(row, completion):\n    return float(row['answer'] in completion)\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        try:
            main(["eval", model_dirs["student"], "--data", str(data), "--checker", "mine:contains"])
        except SystemExit as e:
            assert e.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "fails on the first row of --data" in err and "TypeError" in err
    finally:
        sys.path.remove(str(tmp_path))
    run = tmp_path / "run"
    distill(DistillConfig(student=model_dirs["student"], teacher=model_dirs["teacher"], steps=1, batch_size=2,
                          eval_every=0, sampling=SamplingArgs(max_new_tokens=4), out_dir=str(run), progress=False))
    main(["eval", str(run), "--examples", "2", "--max-new-tokens", "3"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["examples"] == 2 and printed["model"] == str(run)
