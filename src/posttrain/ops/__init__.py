"""Pure tensor math for post-training. Imports torch only: no transformers, no I/O, no config.

Everything here is a function of tensors (plus explicit scalars) returning tensors; metrics are
detached tensors (no ``.item()``, which would sync an accelerator).
"""

from .kl import KL_ESTIMATORS, exact_kl, kl_estimate, kl_k1, kl_k2, kl_k3
from .logprobs import compute_entropy, linear_log_probs, token_log_probs
from .reductions import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    masked_mean,
    masked_normalize,
    masked_sum,
    masked_whiten,
)
from .sft import sft_loss

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "aggregate_loss",
    "compute_entropy",
    "exact_kl",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "linear_log_probs",
    "masked_mean",
    "masked_normalize",
    "masked_sum",
    "masked_whiten",
    "sft_loss",
    "token_log_probs",
]
