"""LoRA students through peft: load/resume, training touches adapters only, merged weights for samplers and `opd merge`."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opd.checkpoint import find_checkpoint, save_checkpoint
from opd.config import LoraArgs, SamplingArgs
from opd.lm.hf.lora import MergeArgs, load_student, merge_main, merged_state_dict
from opd.lm.hf.model import final_hidden, hf_model, lm_head, load_model, load_tokenizer, taken_logp
from opd.lm.rollouts.process import ProcessRollouts
from opd.lm.batch import encode_prompts
from opd.lm.rollouts.local import sample
from opd.lm.hf.decode import sample_completions
from opd.lm.rollouts.server import ServerRollouts

LORA = LoraArgs(r=4, alpha=8.0)
PROMPTS = ["12+34=", "5+6=", "999+1="]


def _trained_lora(model_dirs, seed=0, lora=LORA):
    """A fresh LoRA student whose adapters are not the identity (one factor of each starts at 0): as if trained."""
    model = load_student(model_dirs["student"], lora, None, "cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.5)
    return model


def _plain(state: dict, model_dir: str):
    """A plain HF model built from the student's config, holding `state` (strict: every key, no extra one)."""
    model = load_model(model_dir)
    model.load_state_dict(state, strict=True)
    return model


def _batch(tokenizer):
    ids = torch.tensor([[tokenizer.pad_token_id, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, attn


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_step_on_the_training_path_changes_the_adapters_only(model_dirs, tokenizer):
    model = load_student(model_dirs["student"], LORA, None, "cpu")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    heads = []  # final_hidden must reach the HF model's logits_to_keep through peft's **kwargs forward
    hook = hf_model(model).lm_head.register_forward_hook(lambda m, a, out: heads.append(out.shape))
    ids, attn = _batch(tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # lora_B starts at 0, so lora_A gets a gradient from the second step on
        hidden = final_hidden(model, ids, attn)
        logp = taken_logp(hidden[:, :-1], lm_head(model), ids[:, 1:], attn[:, 1:])
        (-logp.sum()).backward()
        opt.step()
        opt.zero_grad()
    hook.remove()
    assert heads[0][1] == 1
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


@pytest.mark.parametrize("targets", [("all-linear",), ("embed_tokens", "q_proj")])
def test_final_hidden_logits_and_greedy_samples_equal_the_merged_plain_model(model_dirs, tokenizer, targets):
    model = _trained_lora(model_dirs, lora=LoraArgs(r=4, alpha=8.0, target_modules=targets))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = merged_state_dict(model)
    for k, v in model.state_dict().items():  # the student itself is left exactly as it was
        assert torch.equal(v, before[k]), k
    plain = _plain(state, model_dirs["student"])
    ids, attn = _batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(final_hidden(model, ids, attn), final_hidden(plain, ids, attn))
        torch.testing.assert_close(model(input_ids=ids, attention_mask=attn).logits,
                                   plain(input_ids=ids, attention_mask=attn).logits)
        unadapted = load_model(model_dirs["student"])(input_ids=ids, attention_mask=attn).logits
        assert not torch.allclose(plain(input_ids=ids, attention_mask=attn).logits, unadapted, atol=1e-3)
    prompts = encode_prompts(tokenizer, PROMPTS, 100)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    greedy = sample(model, prompts, pad, eos, max_new_tokens=12, temperature=0)
    assert greedy.completion_ids() == sample(plain, prompts, pad, eos, max_new_tokens=12, temperature=0).completion_ids()
    torch.manual_seed(3)
    sampled = sample(model, prompts, pad, eos, max_new_tokens=12)
    assert all(len(c) > 0 for c in sampled.completion_ids())


def test_checkpoint_holds_the_adapter_and_resumes_or_evaluates_from_another_directory(model_dirs, tokenizer,
                                                                                      tmp_path, monkeypatch):
    student = Path(model_dirs["student"])
    monkeypatch.chdir(student.parent)
    model = _trained_lora({"student": student.name})  # a relative --student
    saved = save_checkpoint(tmp_path / "run" / "checkpoint", model, tokenizer, step=1)
    assert (saved / "adapter_model.safetensors").exists() and not (saved / "model.safetensors").exists()
    assert all("lora_" in k for k in load_file(saved / "adapter_model.safetensors"))
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == str(student.resolve())
    monkeypatch.chdir(tmp_path)  # the relative path means nothing here; the recorded absolute one does
    ckpt = find_checkpoint(Path("run") / "checkpoint")
    resumed = load_student(str(student), LORA, ckpt, "cpu")
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    ids, attn = _batch(tokenizer)
    merged = load_model(str(ckpt))  # what `opd eval RUN/checkpoint` loads: a plain model, adapter folded in
    assert type(merged) is type(hf_model(model))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=attn).logits,
                                   model(input_ids=ids, attention_mask=attn).logits)


def test_a_checkpoint_of_the_other_kind_or_other_settings_is_refused_in_one_line(model_dirs, tokenizer, tmp_path):
    full = save_checkpoint(tmp_path / "full", load_model(model_dirs["student"]), tokenizer, step=1)
    adapter = save_checkpoint(tmp_path / "adapter", _trained_lora(model_dirs), tokenizer, step=1)
    _one_line_error(lambda: load_student(model_dirs["student"], LORA, full, "cpu"), "holds full weights")
    _one_line_error(lambda: load_student(model_dirs["student"], LoraArgs(), adapter, "cpu"), "holds a LoRA adapter")
    _one_line_error(lambda: load_student(model_dirs["student"], LoraArgs(r=8, alpha=8.0), adapter, "cpu"),
                    "r=4, alpha=8.0, not r=8")
    assert not any(p.name.startswith("adapter") for p in full.iterdir())  # no LoRA: full weights as before
    plain = load_student(model_dirs["student"], LoraArgs(), full, "cpu")
    assert all(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize("lora,match", [
    (LoraArgs(r=-1), "lora.r must be >= 0"),
    (LoraArgs(r=4, alpha=0.0), "lora.alpha must be > 0"),
    (LoraArgs(r=4, dropout=1.0), r"lora.dropout must be in \[0, 1\)"),
    (LoraArgs(r=4, dropout=-0.1), r"lora.dropout must be in \[0, 1\)"),
    (LoraArgs(r=4, target_modules=()), "lora.target_modules is empty"),
])
def test_bad_lora_settings_are_refused_in_one_line(model_dirs, lora, match):
    _one_line_error(lambda: load_student(model_dirs["student"], lora, None, "cpu"), match)


def test_target_modules_that_match_nothing_name_the_layers_that_exist(model_dirs):
    msg = _one_line_error(
        lambda: load_student(model_dirs["student"], LoraArgs(r=4, target_modules=("qproj", "vproj")), None, "cpu"),
        "lora.target_modules qproj vproj match no module")
    assert "q_proj" in msg and "down_proj" in msg
    only_q = load_student(model_dirs["student"], LoraArgs(r=4, target_modules=("q_proj",)), None, "cpu")
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in only_q.named_parameters() if p.requires_grad} == {
        "q_proj"}


def test_a_sampler_server_is_pushed_plain_merged_weights(model_dirs, tokenizer, tmp_path, monkeypatch):
    model = _trained_lora(model_dirs)
    rollouts = ServerRollouts("http://127.0.0.1:9/v1", tmp_path)
    rollouts.kind = "opd"  # no server runs here: as if `check` had found an opd serve, whose weight update is stubbed
    pushed = []
    monkeypatch.setattr(rollouts.client, "update_weights", lambda path: pushed.append(path) or len(pushed))
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, distributed_type=DistributedType.NO,
                                  get_state_dict=lambda m: pytest.fail("a LoRA student's state dict has peft names"))
    try:
        rollouts.push(model, accelerator, step=3)
    finally:
        rollouts.close()
    served = AutoModelForCausalLM.from_pretrained(pushed[0])  # what `opd serve`'s weight update loads
    assert Path(pushed[0]).name == "step-00000003" and rollouts.version == 1
    ids, attn = _batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids, attention_mask=attn).logits,
                                   model(input_ids=ids, attention_mask=attn).logits)
    accelerator.distributed_type = DistributedType.FSDP
    _one_line_error(lambda: rollouts.push(model, accelerator, step=4), "not FSDP/DeepSpeed")


def test_merge_writes_a_plain_model_and_refuses_bad_inputs(model_dirs, tokenizer, tmp_path, capsys):
    from opd.cli import main

    model = _trained_lora(model_dirs)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint", model, tokenizer, step=1)
    (run / "config.json").write_text(json.dumps({"student": model_dirs["student"], "lora": {"r": 4}}))
    out = merge_main(MergeArgs(str(run), str(tmp_path / "merged")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run"]  # no temporary directory left behind
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids, attn = _batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=attn).logits,
                                   model(input_ids=ids, attention_mask=attn).logits)
    assert load_tokenizer(str(out)).get_vocab() == tokenizer.get_vocab()
    # a checkpoint directory itself, into an existing empty directory, in bfloat16
    (tmp_path / "empty").mkdir()
    half = merge_main(MergeArgs(str(run / "checkpoint"), str(tmp_path / "empty"), dtype="bfloat16"))
    assert AutoModelForCausalLM.from_pretrained(half).dtype == torch.bfloat16

    _one_line_error(lambda: merge_main(MergeArgs(str(run), str(out))), "already exists and is not empty")
    _one_line_error(lambda: merge_main(MergeArgs(str(tmp_path / "nope"), str(tmp_path / "m2"))), "holds no checkpoint")
    full = tmp_path / "full"
    save_checkpoint(full / "checkpoint", load_model(model_dirs["student"]), tokenizer, step=1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # through the CLI: one error line on stderr, exit code 2
        main(["merge", str(full), str(tmp_path / "m3")])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("opd: error:")]
    assert errors == [f"opd: error: {full} holds full weights, not a LoRA adapter; use {full / 'checkpoint'} directly"]
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


@pytest.mark.slow  # spawns a sampler process
def test_a_sampler_process_samples_a_lora_student_and_takes_pushes(model_dirs, tokenizer):
    model = _trained_lora(model_dirs)
    prompts = encode_prompts(tokenizer, PROMPTS, 100)
    s, pad, eos = SamplingArgs(max_new_tokens=8), tokenizer.pad_token_id, tokenizer.eos_token_id
    sampler = ProcessRollouts(model, eos, threads=1)
    try:
        sampler.push(model, None, 0)
        with torch.no_grad():  # "train" the adapters only, as a LoRA step does
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn_like(p))
        sampler.push(model, None, 1)
        batch = sampler.rollouts(prompts, pad, s, seed=5)
        torch.manual_seed(5)
        completions, logprobs = sample_completions(model, prompts, pad, eos, s.max_new_tokens, with_logprobs=True)
        assert batch.completion_ids() == completions and sampler.version == 2
        torch.testing.assert_close(batch.sampling_logp_BT[batch.mask_BT.bool()],
                                   torch.tensor([x for row in logprobs for x in row]), atol=1e-5, rtol=1e-5)
    finally:
        sampler.close()
