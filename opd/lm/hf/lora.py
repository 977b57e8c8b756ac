"""LoRA students through `peft`: load one to train, resume it, and fold its adapters back into plain weights.

With `lora.r > 0` the trained student is a `peft.PeftModel` over the original base weights: only the low-rank
adapters have `requires_grad`, and a checkpoint (`save_pretrained` through the PeftModel) holds the adapter alone
(`adapter_config.json` + `adapter_model.safetensors`, a few MB) plus the tokenizer and trainer state. Everything that
leaves the trainer as a model gets merged weights instead: a sampler server (`merged_state_dict`, pushed by
`ServerRollouts`), `opd eval`/`opd serve` on a checkpoint (`opd.lm.hf.model.load_model` merges on load) and `opd merge`,
which writes a plain Hugging Face model for any tool that knows nothing about peft.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from opd.args import MergeArgs  # noqa: F401 (re-exported)
from opd.config import LoraArgs
from opd.lm.hf.model import (ADAPTER_CONFIG, check_new_dir, hf_model, holds_adapter, is_peft_model, load_model,
                             save_model_dir, unwrap)

_ADAPTER_KEYS = ("lora_",)
"""Substrings of the state-dict keys of adapter tensors (peft's `lora_A`, `lora_B`, `lora_embedding_*`,
`lora_magnitude_vector`): they are folded into the base weights and have no place in a plain model."""


def check_lora_args(lora: LoraArgs) -> None:
    """Raise a one-line ValueError for LoRA settings peft would reject later or silently misuse."""
    if lora.r < 0:
        raise ValueError(f"lora.r must be >= 0 (0 trains every weight), got {lora.r}")
    if lora.r == 0:
        return
    if lora.alpha <= 0:
        raise ValueError(f"lora.alpha must be > 0 (the adapter's update is scaled by alpha / r), got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise ValueError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        raise ValueError("lora.target_modules is empty; name the linear layers to adapt (e.g. q_proj v_proj) or all-linear")


def load_student(name_or_path: str, lora: LoraArgs, checkpoint: Path | None, device, dtype: str = "float32",
                 gradient_checkpointing: bool = False):
    """The student to train: a plain HF model (lora.r == 0) or a peft LoRA model over the original base weights.

    checkpoint: a checkpoint directory to resume from (its weights, or its adapter on top of `name_or_path`), or None
    for a fresh run. A checkpoint of the other kind than `lora` asks for is refused with a one-line ValueError.
    gradient_checkpointing: recompute each decoder layer in the backward pass (HF's, non-reentrant; sampling, which
    runs the model in eval mode, keeps its KV cache).
    """
    check_lora_args(lora)
    adapter = checkpoint is not None and holds_adapter(checkpoint)
    if lora.r == 0:
        if adapter:
            raise ValueError(f"{checkpoint} holds a LoRA adapter but lora.r is 0; resume it with the run's --lora.r "
                             f"(see its config.json), or start a new run in another --out-dir")
        model = load_model(str(checkpoint or name_or_path), dtype=dtype, device=device)
        return with_gradient_checkpointing(model) if gradient_checkpointing else model
    if checkpoint is not None and not adapter:
        raise ValueError(f"{checkpoint} holds full weights (no {ADAPTER_CONFIG}) but lora.r is {lora.r}; resume it "
                         f"with --lora.r 0, or start a new LoRA run in another --out-dir")
    from peft import LoraConfig, PeftModel, get_peft_model

    base_path = _absolute(name_or_path)
    base = load_model(base_path, dtype=dtype, device=device)  # the original weights, also when resuming
    if gradient_checkpointing:
        # non-reentrant: the frozen base's inputs need no requires_grad for the adapters to get gradients
        with_gradient_checkpointing(base)
    if adapter:
        _check_same_adapter(checkpoint, lora)
        model = PeftModel.from_pretrained(base, str(checkpoint), is_trainable=True)
    else:
        # "all-linear" is peft's keyword only as a plain string; a list of names matches them as suffixes.
        targets = "all-linear" if tuple(lora.target_modules) == ("all-linear",) else list(lora.target_modules)
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                            task_type="CAUSAL_LM")
        try:
            model = get_peft_model(base, config)
        except ValueError as e:  # peft's message spans lines and does not say what would match
            raise ValueError(_no_match_message(base, lora, e)) from e
    # The adapter records its base as given; an absolute path (with any ::file.gguf) keeps the checkpoint loadable
    # from another working directory (`opd eval RUN/checkpoint`, `opd merge`).
    model.peft_config["default"].base_model_name_or_path = base_path
    return model.to(device)


def with_gradient_checkpointing(model):
    """`model` with gradient checkpointing of its decoder layers on (non-reentrant), or a one-line ValueError for a
    model class that has none."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"--gradient-checkpointing: {type(model).__name__} does not support gradient checkpointing; "
                         f"drop the flag")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def _absolute(name_or_path: str) -> str:
    """`name_or_path` with a local directory made absolute (a hub id, or a path that does not exist, as given)."""
    path, sep, gguf = name_or_path.partition("::")
    local = Path(path).expanduser()
    return (str(local.resolve()) if local.exists() else path) + sep + gguf


def _check_same_adapter(checkpoint: Path, lora: LoraArgs) -> None:
    """A resumed adapter keeps its saved rank and scale whatever the config says: refuse a config that differs."""
    saved = json.loads((Path(checkpoint) / ADAPTER_CONFIG).read_text())
    if saved.get("r") != lora.r or float(saved.get("lora_alpha", 0)) != float(lora.alpha):
        raise ValueError(f"{checkpoint} holds an adapter with r={saved.get('r')}, alpha={saved.get('lora_alpha')}, "
                         f"not r={lora.r}, alpha={lora.alpha}; resume with the run's LoRA settings (its config.json)")


def _no_match_message(base, lora: LoraArgs, error: ValueError) -> str:
    """peft's refusal of `lora.target_modules` in one line, listing the linear layers the student does have."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
    from peft.utils.error import NoMatchingPeftModuleError

    if isinstance(error, NoMatchingPeftModuleError):
        return (f"lora.target_modules {' '.join(lora.target_modules)} match no module of the student; its linear "
                f"layers are named {', '.join(linear[:8])}; pass some of these, or all-linear")
    return f"lora.target_modules {' '.join(lora.target_modules)}: {' '.join(str(error).split())}"


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights of a peft LoRA model with its adapters folded in, under the plain HF names of its base model.

    `model` is not changed: each adapted layer is merged by peft itself (`merge(safe_merge=True)`, which computes
    base + delta into a new tensor), the new tensor is kept, and the layer's original tensor object is put back, so
    no weight goes through a subtraction (`unmerge_adapter` would, and its rounding would accumulate over pushes).
    Extra memory: one tensor per adapted layer. A plain (non-peft) model gives its own `state_dict()`.
    """
    from peft.tuners.lora import LoraLayer

    if not is_peft_model(model):
        return unwrap(model).state_dict()
    base = hf_model(model)
    merged = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or module.merged:
            continue
        layer = module.get_base_layer()
        weight, bias = layer.weight.data, getattr(getattr(layer, "bias", None), "data", None)
        module.merge(safe_merge=True)
        try:
            merged[f"{name}.weight"] = layer.weight.data
            if bias is not None:
                merged[f"{name}.bias"] = layer.bias.data
        finally:
            layer.weight.data = weight
            if bias is not None:
                layer.bias.data = bias
            module.merged_adapters.clear()
    state = {}
    for key, tensor in base.state_dict().items():
        if any(tag in key for tag in _ADAPTER_KEYS):
            continue
        plain = key.replace(".base_layer.", ".")
        state[plain] = merged.get(plain, tensor)
    return state


def merge_main(args: MergeArgs) -> Path:
    """`opd merge`: write base + adapter of a LoRA run as one plain model (+ tokenizer) to `out_dir`, atomically."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from opd.checkpoint import find_checkpoint

    run, out = Path(args.run_dir), Path(args.out_dir)
    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        raise ValueError(f"dtype {args.dtype} is not a torch dtype; pass float32, bfloat16 or float16")
    check_new_dir(out)
    ckpt = run if holds_adapter(run) else find_checkpoint(run / "checkpoint")
    if ckpt is None:
        raise ValueError(f"{run} holds no checkpoint (no {run / 'checkpoint'}); pass a run directory of opd train")
    if not holds_adapter(ckpt):
        raise ValueError(f"{run} holds full weights, not a LoRA adapter; use {ckpt} directly")
    base_path = _base_of(run, ckpt)
    model = PeftModel.from_pretrained(load_model(base_path), str(ckpt)).merge_and_unload()
    model = model.to(getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(ckpt if (ckpt / "tokenizer_config.json").exists() else base_path)
    save_model_dir(model, tokenizer, out)
    print(f"merged {ckpt} into {base_path}: {out}")
    return out


def _base_of(run: Path, ckpt: Path) -> str:
    """The base model of a run: its config.json's `student`, or the adapter's recorded base when only that one is
    found from here (a relative --student given in another working directory; `load_student` records it absolute)."""
    recorded = json.loads((ckpt / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    config = run / "config.json"
    student = json.loads(config.read_text()).get("student") if config.exists() else None
    for candidate in (student, recorded):
        if candidate and Path(candidate.partition("::")[0]).expanduser().exists():
            return candidate
    if not (student or recorded):
        raise ValueError(f"{ckpt / ADAPTER_CONFIG} names no base model and {config} is missing; pass the run directory")
    return student or recorded  # a hub id (or a directory gone since: load_model says which)
