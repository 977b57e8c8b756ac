import os
import random

import torch

from opd.checkpoint import find_checkpoint, load_trainer_state, save_checkpoint
from tests.conftest import tiny_llama


def test_save_replaces_atomically_and_restores_optimizer_and_rngs(tmp_path, tokenizer):
    model = tiny_llama(tokenizer, 8, 1, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.tensor([[1, 5, 6]])).logits.sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "checkpoint", model, tokenizer, step=1, optimizer=opt)
    torch.manual_seed(7)
    random.seed(7)
    save_checkpoint(tmp_path / "checkpoint", model, tokenizer, step=2, optimizer=opt)
    expected = torch.rand(3), random.random()
    # only the final directory is left: no temporary or previous copies
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    fresh = torch.optim.AdamW(tiny_llama(tokenizer, 8, 1, seed=1).parameters(), lr=0.1)
    state = load_trainer_state(tmp_path / "checkpoint", fresh)
    assert state["step"] == 2
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    saved, loaded = opt.state_dict()["state"][0], fresh.state_dict()["state"][0]
    assert torch.equal(saved["exp_avg"], loaded["exp_avg"])


def test_a_crash_between_the_two_renames_leaves_the_previous_checkpoint_findable(tmp_path, tokenizer):
    model = tiny_llama(tokenizer, 8, 1, seed=0)
    save_checkpoint(tmp_path / "checkpoint", model, tokenizer, step=5)
    # what a kill between `final -> .old` and `tmp -> final` leaves behind
    os.replace(tmp_path / "checkpoint", tmp_path / ".checkpoint.old")
    found = find_checkpoint(tmp_path / "checkpoint")
    assert found == tmp_path / ".checkpoint.old" and load_trainer_state(found)["step"] == 5
    assert find_checkpoint(tmp_path / "nothing") is None
