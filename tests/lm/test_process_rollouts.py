"""`distill --overlap` without a server: a sampler process with a shared-memory copy of the student."""

import json
from pathlib import Path

import pytest
import torch

from opd.config import DistillConfig, OptimArgs, SamplingArgs
from opd.lm.hf.model import load_model, load_tokenizer
from opd.lm.rollouts.process import ProcessRollouts, balanced_teacher_rows
from opd.lm.batch import encode_prompts
from opd.lm.hf.decode import sample_completions
from opd.lm.teachers.local import LocalTeacher, score_batch
from opd.lm.teachers.base import TeacherUnreachable
from opd.lm.train import TrainingError, distill

pytestmark = pytest.mark.slow  # every test spawns a sampler process (torch's import alone takes seconds)


def _in_process(model, prompts, pad, eos, s: SamplingArgs, seed: int):
    torch.manual_seed(seed)
    return sample_completions(model, prompts, pad, eos, s.max_new_tokens, s.temperature, s.top_p, with_logprobs=True)


def test_samples_come_from_the_weights_last_pushed_and_match_in_process_sampling(model_dirs):
    tok = load_tokenizer(model_dirs["student"])
    student = load_model(model_dirs["student"])
    prompts = encode_prompts(tok, ["12+34=", "5+6=", "999+1="], 100)
    s, pad, eos = SamplingArgs(max_new_tokens=10), tok.pad_token_id, tok.eos_token_id
    threads = torch.get_num_threads()
    sampler = ProcessRollouts(student, eos, threads=1)
    try:
        sampler.push(student, None, 0)
        before = [p.detach().clone() for p in student.parameters()]
        first = sampler.rollouts(prompts, pad, s, seed=7)
        completions, logprobs = _in_process(student, prompts, pad, eos, s, 7)
        assert first.completion_ids() == completions
        torch.testing.assert_close(first.sampling_logp_BT[first.mask_BT.bool()],
                                   torch.tensor([x for row in logprobs for x in row]), atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # "train": the sampler keeps the old weights until the next push
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        assert sampler.rollouts(prompts, pad, s, seed=7).completion_ids() == completions
        sampler.push(student, None, 1)
        assert sampler.version == 2
        after = sampler.rollouts(prompts, pad, s, seed=7).completion_ids()
        assert after == _in_process(student, prompts, pad, eos, s, 7)[0] and after != completions
        assert all(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
        assert torch.get_num_threads() == max(1, threads - 1)  # the sampler's thread is taken from this process
    finally:
        sampler.close()
    assert torch.get_num_threads() == threads


def test_a_dead_sampler_process_is_reported_with_its_exit_code(model_dirs):
    tok = load_tokenizer(model_dirs["student"])
    student = load_model(model_dirs["student"])
    sampler = ProcessRollouts(student, tok.eos_token_id, threads=1)
    try:
        sampler._proc.kill()
        sampler._proc.join()
        with pytest.raises(TeacherUnreachable, match="sampler process .* died with exit code -9"):
            sampler.rollouts([[1, 2]], tok.pad_token_id, SamplingArgs(max_new_tokens=2), seed=0)
    finally:
        sampler.close()


def _cfg(dirs, out, **kw) -> DistillConfig:
    return DistillConfig(**{**dict(
        student=dirs["student"], teacher=dirs["teacher"], overlap=True, steps=4, batch_size=4, train_examples=64,
        eval_examples=4, eval_every=0, save_every=100, sampling=SamplingArgs(max_new_tokens=8), out_dir=str(out),
        progress=False, optim=OptimArgs(lr=1e-2, warmup_steps=1)), **kw})


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss,sync_every", [("reverse_kl", 1), ("sampled", 2)])
def test_overlapped_steps_train_on_samples_one_push_old(model_dirs, tmp_path, loss, sync_every):
    distill(_cfg(model_dirs, tmp_path, loss=loss, sync_every=sync_every))
    rows = _metrics(tmp_path)
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    # step 0 samples right after the first push; step k+1 is requested during step k, after that step's push (if due)
    expected = {1: [1, 1, 2, 3], 2: [1, 1, 1, 2]}[sync_every]
    assert [m["sampler_weights_version"] for m in rows] == expected
    # the first batch comes from the very weights being trained (float noise only); later ones from staler weights
    assert rows[0]["sampler_kl"] < 1e-6 and rows[0]["is_ratio_clipped"] == 0.0
    assert all(m["sampler_kl"] > 1e-5 for m in rows[1:])
    assert (tmp_path / "checkpoint").exists()


def test_overlap_settings_are_checked_before_any_work(model_dirs, tmp_path):
    for kw, match in [(dict(source="teacher"), "source=teacher has none"),
                      (dict(source="data", loss="sft"), "source=data has none")]:
        with pytest.raises(ValueError, match=match):
            distill(_cfg(model_dirs, tmp_path / "run", **kw))
    assert not (tmp_path / "run").exists()


def test_a_sampler_process_killed_mid_run_stops_with_a_checkpoint_to_resume(model_dirs, tmp_path, monkeypatch):
    real = ProcessRollouts.rollouts

    def dies_at_step_2(self, prompt_ids, pad_id, sampling, seed):
        if self.version == 2:  # the request made during step 1, after its push: step 2's batch
            self._proc.kill()
        return real(self, prompt_ids, pad_id, sampling, seed)

    monkeypatch.setattr(ProcessRollouts, "rollouts", dies_at_step_2)
    with pytest.raises(TrainingError) as err:
        distill(_cfg(model_dirs, tmp_path))
    message = str(err.value)
    assert "\n" not in message and "died with exit code -9" in message
    assert "checkpoint at step 2" in message and "--resume" in message
    monkeypatch.undo()
    distill(_cfg(model_dirs, tmp_path, resume=True))
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3, 4]


def test_a_student_off_the_cpu_is_refused_before_any_process_starts(model_dirs):
    student = load_model(model_dirs["student"]).to("meta")  # stands in for a GPU: anything but the CPU
    with pytest.raises(ValueError, match="on GPUs pass --sampler URL"):
        ProcessRollouts(student, eos_id=None)


def test_teacher_rows_move_to_the_sampler_until_the_trainer_waits_then_back_by_the_wait():
    # no wait while searching: the trainer may be the slower side; the step up doubles while it keeps not waiting
    assert balanced_teacher_rows(4, 32, wait_s=0.0, teacher_s=0.008, probe=1) == (5, 2)
    assert balanced_teacher_rows(5, 32, wait_s=0.001, teacher_s=0.010, probe=2) == (7, 4)
    assert balanced_teacher_rows(30, 32, wait_s=0.0, teacher_s=0.06, probe=8) == (32, 16)  # at most the batch
    # a 20 ms wait with 2 ms per row: 5 rows back close the gap (each row moved shifts 2 ms to each side) ...
    assert balanced_teacher_rows(12, 32, wait_s=0.020, teacher_s=0.024, probe=8) == (7, None)
    # ... and from then on one row at a time
    assert balanced_teacher_rows(7, 32, wait_s=0.0, teacher_s=0.014, probe=None) == (8, None)
    assert balanced_teacher_rows(2, 32, wait_s=0.5, teacher_s=0.004, probe=None) == (0, None)  # never below zero
    assert balanced_teacher_rows(0, 32, wait_s=0.5, teacher_s=0.0, probe=1) == (0, None)  # sampling alone is slower


def test_rows_graded_in_the_sampler_process_join_the_rest_into_the_one_pass_signal(model_dirs):
    tok = load_tokenizer(model_dirs["student"])
    student, teacher = load_model(model_dirs["student"]), LocalTeacher(load_model(model_dirs["teacher"]))
    prompts = encode_prompts(tok, ["12+34=", "5+6=", "999+1=", "7+7="], 100)
    sampler = ProcessRollouts(student, tok.eos_token_id, threads=1, teacher=teacher)
    try:
        sampler.push(student, None, 0)
        for rows in (2, 4):
            sampler.teacher_rows = rows
            batch = sampler.rollouts(prompts, tok.pad_token_id, SamplingArgs(max_new_tokens=6), seed=3)
            assert batch.teacher_prefix.rows() == rows and batch.teacher_prefix.head is None
            whole = teacher.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
            joined = score_batch(teacher, batch.to("cpu"))
            for name in ("hidden_BTD", "taken_logp_BT"):
                torch.testing.assert_close(getattr(joined, name), getattr(whole, name), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(joined.head(joined.hidden_BTD[:, :2]), whole.head(whole.hidden_BTD[:, :2]))
        sampler.waited(0.0)  # the trainer did not wait: one more row next time
        assert sampler.teacher_rows == 4  # ... but never more than the batch
    finally:
        sampler.close()


def test_an_overlapped_run_with_a_local_teacher_grades_rows_in_the_sampler(model_dirs, tmp_path):
    distill(_cfg(model_dirs, tmp_path, loss="jsd", steps=5))
    rows = _metrics(tmp_path)
    graded = [m.get("sampler_teacher_rows", 0) for m in rows]
    assert all(0 <= g <= 4 for g in graded) and any(g > 0 for g in graded)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in rows)


def test_overlap_with_a_lora_student(model_dirs, tmp_path):
    from opd.config import LoraArgs

    distill(_cfg(model_dirs, tmp_path, steps=3, lora=LoraArgs(r=4, target_modules=("q_proj", "v_proj"))))
    rows = _metrics(tmp_path)
    assert [m["step"] for m in rows] == [1, 2, 3] and rows[0]["sampler_kl"] < 1e-6
    assert all(m["sampler_kl"] > 1e-7 for m in rows[1:])  # one update staler
