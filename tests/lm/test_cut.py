"""`opd student`: a student made of a subset of the teacher's layers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from opd.cli import main
from opd.lm.hf.cut import cut_layers, layer_indices, make_student
from opd.lm.hf.model import load_model
from tests.conftest import tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def teachers(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("cut")
    out = {}
    for name, model in (("llama", tiny_llama(tokenizer, 32, 5, 7)), ("gpt2", tiny_gpt2(tokenizer, 32, 4, 7))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def test_layer_indices():
    assert layer_indices(30, layers=10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert layer_indices(5, layers=1) == [0] and layer_indices(5, layers=5) == [0, 1, 2, 3, 4]
    assert layer_indices(5, keep="every-other") == [0, 2, 4] and layer_indices(5, keep="0,3") == [0, 3]
    for bad in (dict(layers=6), dict(layers=0), dict(keep="3,1"), dict(keep="0,5"), dict(keep="a")):
        with pytest.raises(ValueError):
            layer_indices(5, **bad)


def _greedy(model, ids, n, cache: bool) -> list[int]:
    """n greedy tokens, with the KV cache or recomputing every position."""
    if cache:
        # a static cache: one slot per layer of the config, indexed by each attention's layer_idx
        return model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                              cache_implementation="static")[0, ids.shape[1]:].tolist()
    out = ids
    for _ in range(n):
        out = torch.cat([out, model(out).logits[:, -1:].argmax(-1)], 1)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_cut_keeps_the_chosen_layers_weights_and_samples_with_its_cache(teachers, tokenizer, tmp_path, kind):
    out = tmp_path / "student"
    idx = make_student(teachers[kind], out, keep="0,2,3")
    assert idx == [0, 2, 3]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers" if kind == "llama" else "n_layer"] == 3
    student, teacher = load_model(str(out)), load_model(teachers[kind])
    layer = "model.layers" if kind == "llama" else "transformer.h"
    t_state, s_state = teacher.state_dict(), load_file(out / "model.safetensors")
    for new, old in enumerate(idx):  # student layer i is teacher layer idx[i], weight for weight
        own = {k[len(f"{layer}.{new}."):]: v for k, v in s_state.items() if k.startswith(f"{layer}.{new}.")}
        assert own and all(torch.equal(v, t_state[f"{layer}.{old}.{k}"]) for k, v in own.items())
    assert not any(k.startswith(f"{layer}.3.") for k in s_state)
    # the KV cache renumbered: cached decoding gives what recomputing every position gives, for the saved student
    # and for the one cut in memory (its layers keep the objects, and so the indices, the teacher built them with)
    ids = torch.tensor([tokenizer.encode("12+34=")])
    with torch.no_grad():
        for model in (student, cut_layers(teacher, idx)):
            assert _greedy(model, ids, 6, cache=True) == _greedy(model, ids, 6, cache=False)


def test_keeping_every_layer_gives_the_teachers_logits(teachers, tokenizer):
    teacher = load_model(teachers["llama"])
    ids = torch.tensor([tokenizer.encode("3*4=12")])
    with torch.no_grad():
        expected = teacher(ids).logits
        torch.testing.assert_close(cut_layers(load_model(teachers["llama"]), list(range(5)))(ids).logits, expected)
        assert not torch.allclose(cut_layers(load_model(teachers["llama"]), [0, 1, 2, 4])(ids).logits, expected)


def test_opd_student_command_and_its_refusals(teachers, tmp_path, capsys):
    main(["student", teachers["llama"], str(tmp_path / "s"), "--layers", "2"])
    assert "its layers 0,4" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 2
    for args, message in ((["--layers", "2"], "already exists and is not empty"),
                          (["--layers", "9"], "the teacher has 5 layers"), ([], "pass one of --layers")):
        out = tmp_path / ("s" if "exists" in message else "new")
        with pytest.raises(SystemExit) as exit_info:
            main(["student", teachers["llama"], str(out), *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "new").exists()
