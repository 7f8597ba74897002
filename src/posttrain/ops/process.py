"""Process reward models: step labels from Monte-Carlo rollouts, the step loss, step-score aggregation.

Legend: ``N`` labelled steps (flattened over a batch), ``S`` solutions, ``K`` rollouts per step.

* Monte-Carlo step labels (Wang et al. 2024, "Math-Shepherd"): from the prefix ending at step
  ``i``, ``K`` completions of a policy are sampled and graded; ``c_i`` of them reach the right
  answer. The *soft* label is ``c_i / K``, an unbiased estimate of the policy's success
  probability ``p_i`` from that prefix, with variance ``p_i (1 - p_i) / K``; the *hard* label is
  ``1[c_i > 0]`` (some completion succeeds), whose mean is ``1 - (1 - p_i)^K`` (biased upward,
  toward 1 as K grows).
* The PRM is trained with binary cross-entropy on the logit at each step's last token, to hard
  or soft labels.
* A solution's score aggregates its step probabilities ``s_i = sigmoid(logit_i)``: ``min``
  (the weakest step, Lightman et al. 2023 use the product / min), ``product`` (the probability
  that every step is right, if the steps were independent), or ``last`` (the final step's score,
  an outcome-like score).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STEP_AGGREGATIONS = ("min", "product", "last")


def mc_step_labels(successes: torch.Tensor, k: int, *, hard: bool = False) -> torch.Tensor:
    """Step labels from rollout counts: ``successes`` ``(N,)`` integer counts out of ``k``.

    Soft: ``successes / k``; hard: ``1`` if any rollout succeeded. Returns ``(N,)`` float32.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    successes = successes.to(torch.float32)
    if bool(((successes < 0) | (successes > k)).any()):
        raise ValueError(f"success counts must lie in [0, {k}]")
    return (successes > 0).to(torch.float32) if hard else successes / k


def prm_step_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-step binary cross-entropy (not reduced): ``logits`` ``(N,)``, ``labels`` ``(N,)`` in [0, 1].

    ``loss_i = -(y_i log sigmoid(z_i) + (1 - y_i) log(1 - sigmoid(z_i)))``. Metrics (per step, not
    reduced, detached): ``step_correct`` (1 where ``sigmoid(z) > 0.5`` agrees with ``y > 0.5``)
    and ``step_prob``.
    """
    z = logits.float()
    y = labels.float()
    loss = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    with torch.no_grad():
        correct = ((z > 0) == (y > 0.5)).float()
    return loss, {"step_correct": correct, "step_prob": torch.sigmoid(z.detach())}


def aggregate_step_scores(step_probs: torch.Tensor, step_mask: torch.Tensor, method: str) -> torch.Tensor:
    """Solution scores ``(S,)`` from step probabilities ``(S, T)`` (``step_mask`` ``(S, T)``: 1 for a
    real step; a solution's steps are left-aligned). ``min``, ``product`` or ``last``; a solution
    without steps scores NaN."""
    if method not in STEP_AGGREGATIONS:
        raise ValueError(f"unknown step aggregation {method!r}; valid: {STEP_AGGREGATIONS}")
    p = step_probs.float()
    m = step_mask.bool()
    n = m.sum(-1)
    if method == "min":
        out = torch.where(m, p, torch.full_like(p, float("inf"))).min(-1).values
    elif method == "product":
        out = torch.where(m, p, torch.ones_like(p)).prod(-1)
    else:
        idx = (n - 1).clamp(min=0)
        out = p.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


__all__ = ["STEP_AGGREGATIONS", "aggregate_step_scores", "mc_step_labels", "prm_step_loss"]
