"""Compute accounting: the floating-point operations a training step spends, split by what they are spent on.

The formula (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1), attention included:

    forward FLOPs of one token at context length c  =  2·N + 4·n_layer·d_attn·c  (+ 2·V·D where the head is used)

- N: the decoder's weight matrices (parameters with two or more dimensions) minus the token (and absolute position)
  embedding tables, which are lookups. Each weight does one multiply-add (2 FLOPs) per token. Norm scales and biases
  (1-D, one FLOP each, about 1e-3 of N) are left out.
- 4·n_layer·d_attn·c: QKᵀ and attention·V, each c·d_attn multiply-adds per layer for a token that sees c tokens
  (itself and the c - 1 before it); d_attn = heads × head_dim.
- 2·V·D: the LM head, counted only at the positions whose next-token distribution is used (the completion targets,
  `mask_BT`), because that is where the loops evaluate it (sampling draws from it, the losses score it).
- forward + backward = 3 × forward (the backward pass computes gradients for activations and for weights, 2 × each).

Sequences are counted by their real tokens only; padding is excluded (a packing engine such as vLLM does not compute
it; HF `generate` does, and the wall time logged next to the FLOPs shows that). Sampling with a KV cache computes each
token once, so sampling a batch costs one forward pass over prompt + completion. Not counted: softmax, norms and
activation functions, the elementwise work of the losses (O(V) per position), the optimiser step (O(N) per update,
not per token), and evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

FLOP_KINDS = ("flops_sample", "flops_teacher_generate", "flops_teacher_score", "flops_update")
"""The parts of a step's compute: the student sampling, the teacher sampling (SFT on teacher samples), the teacher
scoring the batch, and the student's forward + backward pass."""


@dataclass(frozen=True)
class ModelCost:
    """The sizes that set a causal LM's FLOPs per token."""

    trunk_params: int
    """N: the decoder's weight matrices except embedding tables (each costs 2 FLOPs per token in a forward pass)."""
    head_params: int
    """V·D: the LM head's weights (2 FLOPs each per position where the head is evaluated)."""
    n_layers: int
    """Decoder layers."""
    d_attn: int
    """Attention width per layer: heads × head_dim (of the queries)."""


def model_cost(model) -> ModelCost | None:
    """The sizes of a Hugging Face causal LM; None for anything that is not a local model (a remote teacher)."""
    if not isinstance(model, torch.nn.Module):
        return None
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    decoder = model.get_decoder()
    lookups = {id(model.get_input_embeddings().weight)}
    for name in ("embed_positions", "wpe"):  # absolute position tables (OPT, GPT-2) are lookups too
        table = getattr(decoder, name, None)
        if table is not None:
            lookups.add(id(table.weight))
    trunk = sum(p.numel() for p in decoder.parameters() if p.dim() >= 2 and id(p) not in lookups)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelCost(
        trunk_params=trunk,
        head_params=model.get_output_embeddings().weight.numel(),
        n_layers=cfg.num_hidden_layers,
        d_attn=heads * head_dim,
    )


def forward_flops(cost: ModelCost, attention_mask_BL: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """FLOPs of one forward pass over a batch's real tokens, the head evaluated at the `mask_BT` targets only.

    Each row's real tokens must be contiguous (left-padded prompt, completion, right padding: as `opd.lm.batch`).
    """
    lengths_B = attention_mask_BL.long().sum(-1).double()
    tokens = lengths_B.sum().item()
    attended = (lengths_B * (lengths_B + 1) / 2).sum().item()  # Σ over tokens of their context length c
    head_positions = mask_BT.long().sum().item()
    return (
        2.0 * cost.trunk_params * tokens
        + 4.0 * cost.n_layers * cost.d_attn * attended
        + 2.0 * cost.head_params * head_positions
    )


def step_flops(
    student: ModelCost, teacher: ModelCost | None, attention_mask_BL: torch.Tensor, mask_BT: torch.Tensor,
    actor: str, scored: bool,
) -> dict:
    """One update's FLOPs by kind (`FLOP_KINDS`) and their sum `flops`, for a batch acted by `actor`.

    actor: "student" (sampled by the student), "teacher" (sampled by the teacher) or "data" (reference completions,
    free). scored: whether the teacher graded the batch with a forward pass. With `teacher` None (a remote teacher
    whose size is unknown here) the teacher's parts are None and `flops` leaves them out.
    """
    if actor not in ("student", "teacher", "data"):
        raise ValueError(f"actor must be student, teacher or data, got {actor!r}")
    student_fwd = forward_flops(student, attention_mask_BL, mask_BT)
    teacher_fwd = forward_flops(teacher, attention_mask_BL, mask_BT) if teacher is not None else None
    out = {
        "flops_sample": student_fwd if actor == "student" else 0.0,
        "flops_teacher_generate": (teacher_fwd if actor == "teacher" else 0.0),
        "flops_teacher_score": (teacher_fwd if scored else 0.0),
        "flops_update": 3.0 * student_fwd,
    }
    out["flops"] = sum(v for v in out.values() if v is not None)
    return out


def logged_total(metrics_path: str | Path, step: int) -> float:
    """The `total_flops` a run had logged at `step` (to continue the count on resume); 0 at step 0 or if absent."""
    path = Path(metrics_path)
    if step == 0 or not path.exists():
        return 0.0
    total = 0.0
    for line in path.read_text().splitlines():
        m = json.loads(line)
        if m.get("step") == step and "total_flops" in m:
            total = m["total_flops"]  # the last one wins: a crashed run may have logged this step twice
    return total
