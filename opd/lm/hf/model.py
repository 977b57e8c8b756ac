"""Small helpers over any Hugging Face causal LM: load it, run its trunk, and score tokens chunk by chunk.

We run the decoder trunk and the LM head separately so that the losses can evaluate the head on a few hundred
positions at a time; a plain `model(...)` call would materialise [B, L, V] logits, which at a 150k vocabulary is the
largest tensor in the whole step.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from opd.chunked import chunked_taken_logp

# Models whose logits are not a plain linear map of the last hidden state (soft-capping, scaling): for these the head
# callable applies the model's own post-processing, so chunked scoring stays exact.
_LOGIT_POSTPROCESS_ATTRS = ("final_logit_softcapping", "logit_scale")


# peft 0.21 reads `model.is_gradient_checkpointing` whenever it wraps a model, which transformers 5.24 deprecates with
# a FutureWarning on every LoRA load: nothing a user of opd can act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

ADAPTER_CONFIG = "adapter_config.json"
"""The file that marks a directory as a peft adapter (a LoRA run's checkpoint) rather than full weights."""


def position_ids(attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses them; needed for models with absolute positions."""
    return (attention_mask_BL.long().cumsum(-1) - 1).clamp(min=0)


def final_hidden(model, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, L, D] (after the final norm), computing logits for one position only.

    The call goes through `model` itself, so a DDP/FSDP wrapper sees its forward and synchronises gradients; a hook on
    the decoder trunk catches its output, and `logits_to_keep=1` keeps the LM head from building [B, L, V] logits.
    """
    inner = hf_model(model)
    captured = []

    def keep(module, args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}
    handle = inner.get_decoder().register_forward_hook(keep)
    try:
        model(input_ids=input_ids_BL, attention_mask=attention_mask_BL, position_ids=position_ids(attention_mask_BL),
              use_cache=False, **kwargs)
    finally:
        handle.remove()
    return captured[0]


def unwrap(model):
    """The model inside a DDP/FSDP/accelerate wrapper (or the model itself); a peft (LoRA) model stays one, so that
    saving it writes the adapter."""
    while hasattr(model, "module"):
        model = model.module
    return model


def is_peft_model(model) -> bool:
    """Whether `model` (inside any DDP/FSDP wrapper) is a peft model, i.e. a LoRA student."""
    peft = sys.modules.get("peft")  # not imported: no peft model can exist (and importing it costs seconds)
    return peft is not None and isinstance(unwrap(model), peft.PeftModel)


def hf_model(model) -> PreTrainedModel:
    """The innermost Hugging Face model, through DDP/FSDP wrappers and peft's wrapper (whose `forward` takes only
    **kwargs, so its signature says nothing about what the model accepts). With LoRA, its linear layers are peft's."""
    model = unwrap(model)
    return model.get_base_model() if is_peft_model(model) else model


def lm_head(model: PreTrainedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [..., D] -> logits [..., V], including any logit post-processing the model's config asks for."""
    model = hf_model(model)
    head = model.get_output_embeddings()
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if not softcap and not scale:
        return head

    def head_with_postprocess(h: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if scale:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return head_with_postprocess


def taken_logp(
    hidden_BTD: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log p(target) at every masked position, [B, T] (0 elsewhere), evaluating the head `chunk_size` rows at a time."""
    out_BT = hidden_BTD.new_zeros(targets_BT.shape)
    m = mask_BT.bool()
    if m.any():
        out_BT[m] = chunked_taken_logp(hidden_BTD[m], head, targets_BT[m], chunk_size=chunk_size)
    return out_BT


def split_spec(name_or_path: str) -> tuple[str, dict]:
    """`dir::file.gguf` -> (dir, {"gguf_file": file}); checks that a local-looking path exists."""
    kwargs = {}
    if "::" in name_or_path:
        name_or_path, kwargs["gguf_file"] = name_or_path.split("::", 1)
    # A hub id is `name` or `org/name`; anything else is meant as a path. `runs/x` where a directory `runs` exists
    # here is meant as a path too: asking the hub for it would retry for a minute, then blame the connection.
    path = Path(name_or_path).expanduser()
    looks_local = (name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
                   or path.exists() or (name_or_path.count("/") == 1 and path.parent.is_dir()))
    if looks_local and not path.exists():
        raise ValueError(f"no model at {name_or_path}: the path does not exist; pass a hub id (org/name) or a saved "
                         f"model directory")
    if looks_local and path.is_dir() and not ((path / "config.json").exists() or (path / ADAPTER_CONFIG).exists()
                                              or "gguf_file" in kwargs):
        raise ValueError(f"no model at {name_or_path}: the directory has no config.json; pass a directory written by "
                         f"save_pretrained (e.g. a run's checkpoint/)")
    return name_or_path, kwargs


def holds_adapter(path: str | Path) -> bool:
    """Whether `path` is a directory holding a peft adapter (a LoRA run's checkpoint) rather than full weights."""
    return (Path(path.partition("::")[0] if isinstance(path, str) else path) / ADAPTER_CONFIG).is_file()


def run_checkpoint(path: str) -> str:
    """`path`, or its latest checkpoint when `path` is an `opd train` run directory (RUN/checkpoint next to the run's
    own config.json, no weights of its own), as `opd merge` takes it."""
    from opd.checkpoint import find_checkpoint

    run = Path(path)
    if not (run / "checkpoint").is_dir() and not (run / ".checkpoint.old").is_dir():
        return path
    if holds_adapter(run) or any(run.glob("*.safetensors")) or any(run.glob("*.gguf")):
        return path
    ckpt = find_checkpoint(run / "checkpoint")
    if ckpt is None:
        raise ValueError(f"{path} is a run directory with no finished checkpoint yet; train it first, or pass a model "
                         f"directory")
    return str(ckpt)


def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    """Any Hugging Face causal LM by hub id or local directory (a GGUF file: pass `dir::file.gguf`).

    A directory holding a LoRA adapter (a LoRA run's checkpoint) gives its base model with the adapter merged in: a
    plain model, as fast to sample as the base, for `opd eval`/`opd serve` on a checkpoint (training loads the
    adapter unmerged: `opd.lm.hf.lora.load_student`).
    """
    if (Path(name_or_path) / "trainer_state.json").is_file():  # an opd checkpoint: name a damaged file, if any
        from opd.checkpoint import verify_checkpoint

        verify_checkpoint(name_or_path)
    if holds_adapter(name_or_path):
        return _load_merged(name_or_path, dtype, device)
    name_or_path, kwargs = split_spec(name_or_path)
    kwargs["dtype"] = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).to(device)


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model a peft adapter directory was trained on (its adapter_config.json's base_model_name_or_path)."""
    base = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base model; set its base_model_name_or_path")
    if holds_adapter(base):
        raise ValueError(f"the base model of adapter {adapter_dir} is itself an adapter ({base}); merge that one first")
    return base


def _load_merged(adapter_dir: str, dtype: str, device: str) -> PreTrainedModel:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(adapter_base(adapter_dir), dtype, device), adapter_dir)
    return model.merge_and_unload()


def load_tokenizer(name_or_path: str):
    """The tokenizer that goes with `load_model(name_or_path)`, left-padded (generation appends on the right)."""
    name_or_path, kwargs = split_spec(name_or_path)
    tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        # Many chat models ship no pad token; eos is the usual stand-in and is masked out of every loss anyway.
        tok.pad_token = tok.eos_token
    return tok


def check_same_vocabulary(student, teacher, student_tok=None, teacher_tok=None) -> None:
    """Logit-level distillation compares distributions over the same token ids: refuse models that do not share them."""
    vs = student.get_output_embeddings().weight.shape[0]
    vt = teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise ValueError(
            f"teacher vocabulary size {vt} != student vocabulary size {vs}; distil between models that share a "
            f"tokenizer, or train with --cross-tokenizer, which aligns the two tokenizations by text"
        )
    if student_tok is not None and teacher_tok is not None and student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ValueError(
            "teacher and student tokenizers map tokens to different ids; distil between models that share a tokenizer, "
            "or train with --cross-tokenizer, which aligns the two tokenizations by text"
        )


def tokenizer_differences(student_tok, teacher_tok) -> list[str]:
    """What differs, one item each, between two tokenizers that share a vocabulary, in what distillation relies on:
    the end-of-sequence token (the student learns to end where the teacher ends, and its sampler stops only at its
    own: a base student under an instruct teacher) and the chat template (the teacher grades prompts rendered the
    student's way). Padding is not compared: it is masked out of attention and of every loss, for both models."""
    out = []
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        out.append(f"end-of-sequence token: student {student_tok.eos_token!r}, teacher {teacher_tok.eos_token!r}")
    student_chat, teacher_chat = student_tok.chat_template or None, teacher_tok.chat_template or None
    if student_chat != teacher_chat:
        which = ("only the teacher has one" if student_chat is None else "only the student has one"
                 if teacher_chat is None else "they differ")
        out.append(f"chat template: {which}")
    return out


def context_length(model_or_path) -> int:
    """The longest sequence a model takes (its config's max_position_embeddings; unbounded if it names none).
    Takes a loaded model or a path, whose config alone is read (so prompts are checked before the weights load); an
    adapter directory (a LoRA run's checkpoint) has its base model's."""
    if isinstance(model_or_path, str) and holds_adapter(model_or_path):
        return context_length(adapter_base(model_or_path))
    if isinstance(model_or_path, str):
        from transformers import AutoConfig

        path, kwargs = split_spec(model_or_path)
        config = AutoConfig.from_pretrained(path, **kwargs)
    else:
        config = model_or_path.config
    config = getattr(config, "get_text_config", lambda: config)()
    return getattr(config, "max_position_embeddings", None) or 1 << 30


def check_new_dir(out: Path) -> None:
    """Refuse (one line) an output directory that exists and is not empty: nothing of the user's is overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not empty; pass a new OUT_DIR")


def save_model_dir(model, tokenizer, out: Path) -> None:
    """Write `model` and `tokenizer` as a plain Hugging Face directory at `out` (absent or empty), atomically: written
    next to it and renamed into place, so a failure leaves no half-written model under its name."""
    check_new_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def library_bars(enabled: bool):
    """While inside, transformers' progress bars (loading weights, writing shards) show only if `enabled`, and
    datasets' ("Generating train split", "Filter": reading a prompt file, done in a moment) never; their previous
    settings come back afterwards."""
    import datasets
    from transformers.utils import logging as hf_logging

    were_on = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were_on[0]:
            hf_logging.enable_progress_bar()
        if were_on[1]:
            datasets.enable_progress_bars()
