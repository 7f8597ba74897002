"""Pure tensor math for post-training. Imports torch only: no transformers, no I/O, no config.

Everything here is a function of tensors (plus explicit scalars) returning tensors; metrics are
detached tensors (no ``.item()``, which would sync an accelerator).
"""

from .kl import KL_ESTIMATORS, exact_kl, kl_estimate, kl_k1, kl_k2, kl_k3
from .logprobs import compute_entropy, linear_log_probs, token_log_probs
from .preference import (
    PREFERENCE_LOSSES,
    PreferenceLoss,
    dpo_loss,
    dpop_loss,
    get_preference_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
    slic_hinge_loss,
    tilt_loss,
)
from .reductions import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    masked_mean,
    masked_normalize,
    masked_sum,
    masked_whiten,
)
from .reward import (
    REWARD_LOSSES,
    bradley_terry_loss,
    get_reward_loss,
    listwise_loss,
    reward_centering,
    reward_hinge_loss,
    reward_mse_loss,
    softmax_targets,
    top1_targets,
)
from .sequence import POOLING_MODES, pool_sequences, sequence_counts, sequence_sums
from .sft import sft_loss

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POOLING_MODES",
    "PREFERENCE_LOSSES",
    "REWARD_LOSSES",
    "PreferenceLoss",
    "aggregate_loss",
    "bradley_terry_loss",
    "compute_entropy",
    "dpo_loss",
    "dpop_loss",
    "exact_kl",
    "get_preference_loss",
    "get_reward_loss",
    "ipo_loss",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kto_loss",
    "linear_log_probs",
    "listwise_loss",
    "masked_mean",
    "masked_normalize",
    "masked_sum",
    "masked_whiten",
    "orpo_loss",
    "pool_sequences",
    "reward_centering",
    "reward_hinge_loss",
    "reward_mse_loss",
    "sequence_counts",
    "sequence_sums",
    "sft_loss",
    "simpo_loss",
    "slic_hinge_loss",
    "softmax_targets",
    "tilt_loss",
    "token_log_probs",
    "top1_targets",
]
