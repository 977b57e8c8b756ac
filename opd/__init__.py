"""opd: on-policy distillation for language models and control policies.

The losses are re-exported here so that `opd.reverse_kl(...)` works; everything else lives in
`opd.lm` (Hugging Face causal LMs), `opd.control` (gymnasium policies) and `opd.tasks` (data made here).
"""

__version__ = "0.1.0"

from opd.chunked import chunked_divergence, chunked_taken_logp
from opd.fused import fused_divergence
from opd.losses import (
    DIVERGENCES,
    discounted_returns,
    feature_l2,
    forward_kl,
    generalized_jsd,
    get_divergence,
    hinton_kd,
    masked_mean,
    policy_gradient_loss,
    reverse_kl,
    sampled_reverse_kl,
    sampled_reverse_kl_pg_loss,
    skew_forward_kl,
    skew_reverse_kl,
    token_cross_entropy,
    topk_divergence,
    topk_with_tail,
    tvd,
)

__all__ = [
    "DIVERGENCES",
    "chunked_divergence",
    "chunked_taken_logp",
    "discounted_returns",
    "feature_l2",
    "forward_kl",
    "fused_divergence",
    "generalized_jsd",
    "get_divergence",
    "hinton_kd",
    "masked_mean",
    "policy_gradient_loss",
    "reverse_kl",
    "sampled_reverse_kl",
    "sampled_reverse_kl_pg_loss",
    "skew_forward_kl",
    "skew_reverse_kl",
    "token_cross_entropy",
    "topk_divergence",
    "topk_with_tail",
    "tvd",
]
