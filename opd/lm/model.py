"""Small helpers over any Hugging Face causal LM: load it, run its trunk, and score tokens chunk by chunk.

We run the decoder trunk and the LM head separately so that the losses can evaluate the head on a few hundred
positions at a time; a plain `model(...)` call would materialise [B, L, V] logits, which at a 150k vocabulary is the
largest tensor in the whole step.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from opd.chunked import chunked_taken_logp

# Models whose logits are not a plain linear map of the last hidden state (soft-capping, scaling): for these the head
# callable applies the model's own post-processing, so chunked scoring stays exact.
_LOGIT_POSTPROCESS_ATTRS = ("final_logit_softcapping", "logit_scale")


def position_ids(attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses them; needed for models with absolute positions."""
    return (attention_mask_BL.long().cumsum(-1) - 1).clamp(min=0)


def final_hidden(model, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, L, D] (after the final norm), computing logits for one position only.

    The call goes through `model` itself, so a DDP/FSDP wrapper sees its forward and synchronises gradients; a hook on
    the decoder trunk catches its output, and `logits_to_keep=1` keeps the LM head from building [B, L, V] logits.
    """
    inner = unwrap(model)
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
    """The Hugging Face model inside a DDP/FSDP/accelerate wrapper (or the model itself)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def lm_head(model: PreTrainedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [..., D] -> logits [..., V], including any logit post-processing the model's config asks for."""
    model = unwrap(model)
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


def _split(name_or_path: str) -> tuple[str, dict]:
    """`dir::file.gguf` -> (dir, {"gguf_file": file}); checks that a local-looking path exists."""
    kwargs = {}
    if "::" in name_or_path:
        name_or_path, kwargs["gguf_file"] = name_or_path.split("::", 1)
    # A hub id is `name` or `org/name`; anything else is meant as a path.
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise ValueError(f"model directory {name_or_path} does not exist; pass a hub id (org/name) or a saved model directory")
    return name_or_path, kwargs


def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    """Any Hugging Face causal LM by hub id or local directory (a GGUF file: pass `dir::file.gguf`)."""
    name_or_path, kwargs = _split(name_or_path)
    kwargs["dtype"] = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).to(device)


def load_tokenizer(name_or_path: str):
    """The tokenizer that goes with `load_model(name_or_path)`, left-padded (generation appends on the right)."""
    name_or_path, kwargs = _split(name_or_path)
    tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        # Many chat models ship no pad token; eos is the usual stand-in and is masked out of every loss anyway.
        tok.pad_token = tok.eos_token
    return tok
