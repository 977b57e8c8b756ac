"""The LM loop under `accelerate launch` with 2 CPU processes (gloo DDP)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("ddp_check.py")
pytestmark = pytest.mark.slow  # two processes start, each importing torch and accelerate


def launch(model_dirs, out, *extra):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), model_dirs["student"],
           model_dirs["teacher"], str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_train_in_lockstep(model_dirs, tmp_path):
    launch(model_dirs, tmp_path, "3")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["final_step"] for r in ranks] == [3, 3]
    # both processes ended with the weights the main process saved ...
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    # ... and they trained on different prompts (their local losses differ), so the gradients really were averaged
    assert ranks[0]["loss"] != ranks[1]["loss"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # one writer
    assert len(torch.load(tmp_path / "checkpoint" / "loop_rng.pt")) == 2  # every process's RNGs saved

    # stop at step 2, resume to 3: the same weights as the uninterrupted run, bit for bit
    launch(model_dirs, tmp_path / "b", "2")
    launch(model_dirs, tmp_path / "b", "3", "--resume")
    a = load_file(tmp_path / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_train_a_lora_student_with_accumulation_in_lockstep(model_dirs, tmp_path):
    launch(model_dirs, tmp_path, "2", "--lora")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and ranks[0]["loss"] != ranks[1]["loss"]
    assert (tmp_path / "checkpoint" / "adapter_model.safetensors").exists()


def test_token_budget_micro_batches_stay_in_lockstep_across_processes(model_dirs, tmp_path):
    # Each process cuts its own rows by tokens; unevened, a process with fewer micro-batches would leave the other
    # waiting in a collective for ever (the launch's timeout). Evened, both run as many and end with equal weights.
    launch(model_dirs, tmp_path, "3", "--budget")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and ranks[0]["micro"] == ranks[1]["micro"] >= 2, ranks
