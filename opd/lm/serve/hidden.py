"""The hidden-state endpoints of `opd serve`, for a full-vocabulary remote teacher (`opd.lm.remote.hidden`).

A top-k teacher sends k log-probs per token and the loss guesses the rest (a tail bucket). These endpoints send what
the exact full-vocabulary divergence needs instead: the teacher's final hidden states (after the final norm, what the
LM head multiplies), D numbers per token, and its LM head once. The trainer then computes the teacher's logits chunk
by chunk (`opd.fused`), exactly as with a local teacher.

- `POST /opd/hidden_states {"sequences": [[ids]], "start": [s_i], "dtype": "float32" | "float16"}`: hidden states of
  positions s_i..len_i-1 of each sequence (position j grades token j+1, so a client sends a sequence only up to its
  last graded position + 1 and starts at its first one: no prompt-only states cross the wire).
- `GET /opd/lm_head?start=R0&stop=R1&dtype=float32`: rows R0..R1-1 of the head's weight [V, D] and bias, with what
  the model does to the product (`logit_scale`, `final_logit_softcapping`). In pieces: a 49k x 960 head is 190 MB.

Wire format: each array is `{"shape": [...], "data": base64 of its little-endian bytes}` in the JSON answer, in
`dtype`. base64 costs 4/3 of the raw bytes, but keeps one protocol (JSON, OpenAI error bodies, the client's retries);
float32 is the default because it reproduces a local teacher's loss to float rounding; float16 halves the payload at
a relative error of ~5e-4 in the hidden states (states beyond float16's range are refused, not sent as inf).

A model is served this way only when its logits are exactly `softcap(scale * (W h + b))` of its final hidden states:
checked once, on a short probe sequence, against the model's own forward pass; any other model answers 400.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from opd.lm.hf.model import final_hidden, hf_model
from opd.lm.serve.protocol import BadRequest, ServerLimits
from opd.lm.serve.wire import WireDtype, apply_head, encode_array, wire_bytes


class HiddenStatesRequest(BaseModel):
    """Body of `POST /opd/hidden_states`."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    sequences: list[list[StrictInt]] = Field(min_length=1)
    start: list[StrictInt] | None = None
    """Per sequence, the first position whose hidden state is wanted (default 0)."""
    dtype: WireDtype = "float32"


def head_spec(model: torch.nn.Module) -> dict:
    """The LM head as data: {"weight" [V, D], "bias" [V] or None, "logit_scale", "final_logit_softcapping"}.

    Raises BadRequest when the model's logits are not that function of its final hidden states, checked on a probe
    sequence against its own forward pass (a model may scale or cap its logits in code its config does not name)."""
    inner = hf_model(model)
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        raise BadRequest(f"the served model's LM head is a {type(head).__name__}, not a plain linear layer; its "
                         "hidden states cannot be sent as a teacher signal: use the top-k payload")
    cfg = getattr(inner.config, "get_text_config", lambda: inner.config)()
    spec = {"weight": head.weight, "bias": head.bias, "logit_scale": getattr(cfg, "logit_scale", None) or None,
            "final_logit_softcapping": getattr(cfg, "final_logit_softcapping", None) or None}
    vocab = head.weight.shape[0]
    ids = torch.arange(min(8, vocab), device=head.weight.device)[None]
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        got = apply_head(final_hidden(model, ids, torch.ones_like(ids)).float(), spec)
    # rounding of the model's own dtype (a bfloat16 model's logits are bfloat16 products) is not post-processing
    tol = max(1e-3, 4 * torch.finfo(head.weight.dtype).eps) * (1 + float(expected.abs().max()))
    if float((got - expected).abs().max()) > tol:
        raise BadRequest("the served model's logits are not its linear head of its final hidden states (it post-"
                         "processes them in a way opd does not know); use the top-k payload for this teacher")
    return spec


def head_piece(spec: dict, start: int, stop: int | None, dtype: WireDtype, max_bytes: int | None = None) -> dict:
    """The answer of `GET /opd/lm_head`: rows [start, stop) of the head, its sizes and its post-processing; refused
    when over `max_bytes` (a whole 151k x 4096 head is 3 GB of base64)."""
    V, D = spec["weight"].shape
    stop = V if stop is None else stop
    if not 0 <= start <= stop <= V:
        raise BadRequest(f"rows [{start}, {stop}) are not within the head's {V} rows; ask 0 <= start <= stop <= {V}")
    if max_bytes is not None and (size := wire_bytes((stop - start) * D, dtype)) > max_bytes:
        rows = max(1, max_bytes // max(1, wire_bytes(D, dtype)))
        raise BadRequest(f"rows [{start}, {stop}) of the head are {size} bytes, over this server's "
                         f"--max-response-bytes {max_bytes}; ask for at most {rows} rows at a time")
    bias = spec["bias"]
    return {
        "object": "lm_head", "vocab_size": V, "hidden_size": D, "dtype": dtype, "start": start, "stop": stop,
        "weight": encode_array(spec["weight"][start:stop], dtype),
        "bias": None if bias is None else encode_array(bias[start:stop], dtype),
        "logit_scale": spec["logit_scale"], "final_logit_softcapping": spec["final_logit_softcapping"],
    }


def check_hidden_request(
    req: HiddenStatesRequest, vocab_size: int, max_model_len: int, limits: ServerLimits, hidden_size: int | None = None
) -> list[int]:
    """Refuse a request the model cannot run; return each sequence's start."""
    if len(req.sequences) > limits.max_seqs_per_request:
        raise BadRequest(f"{len(req.sequences)} sequences is over this server's {limits.max_seqs_per_request} per "
                         "request; split the request")
    starts = req.start if req.start is not None else [0] * len(req.sequences)
    if len(starts) != len(req.sequences):
        raise BadRequest(f"{len(starts)} starts for {len(req.sequences)} sequences; send one start per sequence")
    for i, (ids, s) in enumerate(zip(req.sequences, starts)):
        if not ids:
            raise BadRequest(f"sequence {i} is empty; send at least one token")
        if bad := [t for t in ids if not 0 <= t < vocab_size]:
            raise BadRequest(f"sequence {i} has token id {bad[0]} outside the model's vocabulary [0, {vocab_size})")
        if len(ids) > max_model_len:
            raise BadRequest(f"sequence {i} has {len(ids)} tokens, over the model's context of {max_model_len}")
        if not 0 <= s < len(ids):
            raise BadRequest(f"start {s} of sequence {i} is not a position of its {len(ids)} tokens")
    max_bytes = getattr(limits, "max_response_bytes", None)
    if max_bytes is not None and hidden_size is not None:
        size = wire_bytes(sum(len(ids) - s for ids, s in zip(req.sequences, starts)) * hidden_size, req.dtype)
        if size > max_bytes:
            raise BadRequest(f"the hidden states asked for are {size} bytes, over this server's --max-response-bytes "
                             f"{max_bytes}; send fewer or shorter sequences per request")
    return starts


@torch.inference_mode()
def hidden_states(model: torch.nn.Module, sequences: list[list[int]], starts: list[int], max_batch_size: int
                  ) -> list[torch.Tensor]:
    """Final hidden states [len_i - start_i, D] of each sequence, in right-padded batches of `max_batch_size`."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for b0 in range(0, len(sequences), max_batch_size):
        chunk = sequences[b0 : b0 + max_batch_size]
        L = max(len(s) for s in chunk)
        ids_BL = torch.zeros(len(chunk), L, dtype=torch.long)
        mask_BL = torch.zeros(len(chunk), L, dtype=torch.long)
        for b, s in enumerate(chunk):
            ids_BL[b, : len(s)] = torch.tensor(s)
            mask_BL[b, : len(s)] = 1
        hidden_BLD = final_hidden(model, ids_BL.to(device), mask_BL.to(device))
        out += [hidden_BLD[b, s0 : len(s)] for b, (s, s0) in enumerate(zip(chunk, starts[b0 : b0 + max_batch_size]))]
    return out


def hidden_response(req: HiddenStatesRequest, starts: list[int], states: list[torch.Tensor], model_name: str) -> dict:
    """The JSON body answering `req`."""
    data: list[dict[str, Any]] = [
        {"index": i, "start": s, "hidden": encode_array(h, req.dtype)} for i, (s, h) in enumerate(zip(starts, states))
    ]
    hidden_size = states[0].shape[-1]
    return {"object": "hidden_states", "model": model_name, "dtype": req.dtype, "hidden_size": hidden_size,
            "data": data}
