"""A student made from its teacher: a subset of the teacher's decoder layers, with its embeddings, final norm, head
and tokenizer (DistilBERT's initialisation: every other layer). `opd student TEACHER OUT --layers N`.

Works for any Hugging Face causal LM whose decoder keeps its layers in one `ModuleList` of `num_hidden_layers`
modules (Llama, Qwen, Mistral, Gemma, GPT-2, ...). Besides the list and the layer count it renumbers what is indexed
by layer: each attention's `layer_idx` (the KV cache's slot) and the config's per-layer `layer_types` (sliding or
full attention).
"""

from __future__ import annotations

from pathlib import Path

import torch

from opd.args import StudentArgs
from opd.lm.hf.model import check_new_dir, load_model, load_tokenizer, save_model_dir, split_spec


def decoder_layers(model) -> tuple[torch.nn.Module, str]:
    """The module holding the decoder's layer list and the list's attribute name; a one-line ValueError when no
    `ModuleList` of `num_hidden_layers` modules is found."""
    config = model.config.get_text_config()
    n = getattr(config, "num_hidden_layers", None)
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, torch.nn.ModuleList) and n is not None and len(child) == n:
                return module, name
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: no list of num_hidden_layers={n} "
                     f"modules; make the student from its config instead")


def layer_indices(total: int, layers: int | None = None, keep: str | None = None) -> list[int]:
    """Which of `total` layers to keep: `layers` evenly spaced (first and last included), or `keep`: every-other
    or comma-separated 0-based indices. One-line ValueErrors for what cannot be kept."""
    if keep == "every-other":
        return list(range(0, total, 2))
    if keep is not None:
        try:
            idx = [int(part) for part in keep.split(",")]
        except ValueError:
            raise ValueError(f"--keep {keep!r}: pass every-other or comma-separated layer indices such as 0,2,4")
        if sorted(set(idx)) != idx or not idx or idx[0] < 0 or idx[-1] >= total:
            raise ValueError(f"--keep {keep}: indices must be increasing, distinct and within 0..{total - 1}")
        return idx
    if layers is None or not 1 <= layers <= total:
        raise ValueError(f"--layers {layers}: the teacher has {total} layers; keep between 1 and {total}")
    return sorted({round(i * (total - 1) / max(1, layers - 1)) for i in range(layers)})


def cut_layers(model, idx: list[int]):
    """`model` with only decoder layers `idx` (in place; returned), renumbered as layers 0..len(idx)-1."""
    holder, name = decoder_layers(model)
    layers = getattr(holder, name)
    setattr(holder, name, torch.nn.ModuleList([layers[i] for i in idx]))
    for new, layer in enumerate(getattr(holder, name)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new  # the KV cache is indexed by this
    config = model.config.get_text_config()
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in idx]
    config.num_hidden_layers = len(idx)
    return model


def make_student(teacher: str, out: str | Path, layers: int | None = None, keep: str | None = None,
                 dtype: str = "float32") -> list[int]:
    """Write a student of the teacher's layers (`layer_indices`) as a plain Hugging Face directory at `out`; returns
    the indices kept. The flags and `out` are checked from the teacher's config, before its weights load."""
    from transformers import AutoConfig

    out = Path(out)
    check_new_dir(out)
    path, kwargs = split_spec(teacher)
    idx = layer_indices(AutoConfig.from_pretrained(path, **kwargs).get_text_config().num_hidden_layers, layers, keep)
    model = cut_layers(load_model(teacher, dtype=dtype), idx)
    save_model_dir(model, load_tokenizer(teacher), out)
    return idx


def student_main(args: StudentArgs) -> Path:
    """`opd student`: make the student and say which layers it kept."""
    idx = make_student(args.teacher, args.out_dir, args.layers, args.keep, args.dtype)
    print(f"student of {args.teacher} in {args.out_dir}: its layers {','.join(map(str, idx))}")
    return Path(args.out_dir)
