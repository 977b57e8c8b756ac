"""opd: on-policy distillation for language models and control policies.

The losses are re-exported here so that `opd.reverse_kl(...)` works; everything else lives in
`opd.lm` (Hugging Face causal LMs), `opd.control` (gymnasium policies) and `opd.tasks` (data made here).

The re-exports load on first use (PEP 562 `__getattr__`): `import opd.cli` or `opd.config` alone imports no torch,
so that `opd --help` answers at once.
"""

from typing import TYPE_CHECKING

from opd.lazy import lazy_exports

__version__ = "0.1.0"

_LOSSES = (
    "DIVERGENCES",
    "discounted_returns",
    "feature_l2",
    "forward_kl",
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
)
_HOME = {"chunked_divergence": "chunked", "chunked_taken_logp": "chunked", "fused_divergence": "fused",
         **{name: "losses" for name in _LOSSES}}
"""Re-exported name -> the `opd` module that defines it."""

__all__ = sorted(_HOME)


__getattr__, __dir__ = lazy_exports(__name__, _HOME)


if TYPE_CHECKING:  # what the names are, for type checkers and editors
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
