"""How hidden states and head weights travel between `opd serve` and the hidden-state remote teacher: arrays as
little-endian base64 in float32 or float16, and the head applied to hidden states on the client side."""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
import torch

from opd.lm.serve.protocol import BadRequest

WireDtype = Literal["float32", "float16"]


_NUMPY = {"float32": "<f4", "float16": "<f2"}


def wire_bytes(values: int, dtype: WireDtype) -> int:
    """About how many bytes `values` numbers take in an answer (base64 of 4 or 2 bytes each)."""
    return values * (4 if dtype == "float32" else 2) * 4 // 3


def encode_array(tensor: torch.Tensor, dtype: WireDtype) -> dict:
    """`{"shape", "data"}`: the tensor's values in `dtype`, little-endian, base64. Raises BadRequest when a value does
    not fit `dtype` (float16 overflow)."""
    with np.errstate(over="ignore"):  # an overflow is reported below, as a refusal
        values = tensor.detach().float().cpu().numpy().astype(_NUMPY[dtype])
    if dtype != "float32" and not np.isfinite(values).all() and np.isfinite(tensor.float().cpu().numpy()).all():
        raise BadRequest(f"hidden states overflow {dtype}; request dtype=float32")
    return {"shape": list(values.shape), "data": base64.b64encode(values.tobytes()).decode("ascii")}


def decode_array(obj: dict, dtype: WireDtype) -> torch.Tensor:
    """The float32 tensor `encode_array` encoded."""
    raw = base64.b64decode(obj["data"])
    values = np.frombuffer(raw, dtype=_NUMPY[dtype]).reshape(obj["shape"])
    return torch.from_numpy(values.astype(np.float32))


def apply_head(hidden: torch.Tensor, spec: dict) -> torch.Tensor:
    """Logits of `hidden` [..., D] under a head spec (the model's own post-processing included)."""
    logits = torch.nn.functional.linear(hidden, spec["weight"].to(hidden.dtype),
                                        None if spec["bias"] is None else spec["bias"].to(hidden.dtype))
    if spec["logit_scale"]:
        logits = logits * spec["logit_scale"]
    if spec["final_logit_softcapping"]:
        cap = spec["final_logit_softcapping"]
        logits = torch.tanh(logits / cap) * cap
    return logits
