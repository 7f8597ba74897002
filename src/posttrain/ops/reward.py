"""Reward-model losses: pairwise (Bradley–Terry, hinge, MSE), reward centering, listwise.

Shape legend: ``P`` preference pairs, ``G`` prompts, ``K`` candidates per prompt. Rewards are
the model's scalar scores, ``r_w = R(x, y_w)`` for the chosen and ``r_l = R(x, y_l)`` for the
rejected response; ``d = r_w − r_l`` is the margin (positive when the model agrees with the
label). References: reference note 001 §5 and note 002 §10.5.

Pairwise losses share one signature and a registry::

    REWARD_LOSSES[name](chosen_rewards, rejected_rewards, *, margin=None, **hyperparameters)
        -> (losses (P,), metrics)

Losses are per example and *not* reduced (the trainer divides by the step's global count);
metrics are detached: ``accuracy`` (1 where ``d > 0``), ``margin`` (``d``),
``chosen_rewards``, ``rejected_rewards``. Computation is in float32 (float64 stays float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .preference import Metrics, _dtype  # shared helpers: fp32 or wider



def _pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> Metrics:
    c, r = chosen.detach(), rejected.detach()
    d = c - r
    return {"accuracy": (d > 0).to(d.dtype), "margin": d, "chosen_rewards": c, "rejected_rewards": r}


def _no_margin(loss: str, margin: torch.Tensor | None) -> None:
    if margin is not None:
        raise ValueError(
            f"reward loss {loss!r} takes no per-example margin (only 'bt' does); "
            "drop the dataset's margin field or use loss 'bt'"
        )


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley–Terry negative log-likelihood.   ``(P,), (P,) -> (P,)``.

        L = −log σ(r_w − r_l − m)

    ``P(y_w ≻ y_l) = σ(r_w − r_l)`` under the Bradley–Terry model; ``margin`` ``m`` ``(P,)``
    (default 0) asks for a gap that grows with the annotator's confidence (Llama 2's margin
    loss, Touvron et al. 2023). ``∂L/∂r_w = −σ(m − d)``, ``∂L/∂r_l = +σ(m − d)``. The loss only
    sees differences, so the reward's offset is free (see :func:`reward_centering`).
    """
    dtype = _dtype(chosen_rewards, rejected_rewards)
    d = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)
    if margin is not None:
        d = d - margin.to(dtype)
    return -F.logsigmoid(d), _pair_metrics(chosen_rewards, rejected_rewards)


def reward_hinge_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    hinge_margin: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """Hinge loss on the reward gap.   ``(P,), (P,) -> (P,)``.

        L = max(0, μ − (r_w − r_l)),        μ = hinge_margin > 0 (default 1)

    Pairs already separated by μ give neither loss nor gradient; non-smooth at the hinge.
    A per-example ``margin`` is not supported (ValueError).
    """
    _no_margin("hinge", margin)
    if not hinge_margin > 0 or not math.isfinite(hinge_margin):
        raise ValueError(f"hinge_margin must be a finite number > 0, got {hinge_margin!r}")
    dtype = _dtype(chosen_rewards, rejected_rewards)
    d = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)
    return torch.relu(hinge_margin - d), _pair_metrics(chosen_rewards, rejected_rewards)


def reward_mse_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    target_gap: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """Squared error of the reward gap against a known target.   ``(P,), (P,) -> (P,)``.

        L = (r_w − r_l − t)²,        t = target_gap (default 1)

    Regresses the gap onto ``t`` from both sides (a gap larger than ``t`` is penalized too).
    A per-example ``margin`` is not supported (ValueError).
    """
    _no_margin("mse", margin)
    if not math.isfinite(target_gap):
        raise ValueError(f"target_gap must be a finite number, got {target_gap!r}")
    dtype = _dtype(chosen_rewards, rejected_rewards)
    d = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)
    return (d - target_gap) ** 2, _pair_metrics(chosen_rewards, rejected_rewards)


REWARD_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, Metrics]]] = {
    "bt": bradley_terry_loss,
    "hinge": reward_hinge_loss,
    "mse": reward_mse_loss,
}


def get_reward_loss(name: str) -> Callable[..., tuple[torch.Tensor, Metrics]]:
    """``REWARD_LOSSES[name]``; ``ValueError`` listing the valid names otherwise."""
    try:
        return REWARD_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown reward loss {name!r}; valid losses: {sorted(REWARD_LOSSES)}") from None


def reward_centering(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, coef: float
) -> torch.Tensor:
    """Auxiliary loss pinning the reward's free offset near 0.   ``(P,), (P,) -> (P,)``.

        L_c = coef · (r_w + r_l)²

    Pairwise losses are invariant to adding a constant to every reward; this term (Eisenstein
    et al. 2023, "Helping or Herding?") keeps the mean reward of each pair near 0 so scores
    are comparable across runs. The trainer adds it to the pairwise loss. ``coef ≥ 0``.
    """
    if not coef >= 0 or not math.isfinite(coef):
        raise ValueError(f"coef must be a finite number >= 0, got {coef!r}")
    dtype = _dtype(chosen_rewards, rejected_rewards)
    total = chosen_rewards.to(dtype) + rejected_rewards.to(dtype)
    return coef * total * total


# --------------------------------------------------------------------------------------------
# listwise
# --------------------------------------------------------------------------------------------


def _check_list(name: str, x: torch.Tensor, rewards: torch.Tensor) -> None:
    if x.shape != rewards.shape:
        raise ValueError(f"{name} {tuple(x.shape)} must have the shape of the scores {tuple(rewards.shape)}")


def _valid(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if scores.dim() != 2:
        raise ValueError(f"listwise scores must be (G, K), got shape {tuple(scores.shape)}")
    if mask is None:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    _check_list("mask", mask, scores)
    return mask.to(torch.bool)


def _masked_log_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log softmax over the valid entries of each row; masked entries get ``−inf``-like values.

    Masked entries are filled with the most negative finite float (not ``−inf``), so a row
    with no valid entry stays finite and its gradient is 0 rather than NaN.
    """
    filled = torch.where(valid, scores, torch.full_like(scores, torch.finfo(scores.dtype).min))
    return torch.log_softmax(filled, dim=-1)


def listwise_loss(
    rewards: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Cross-entropy between a target ranking distribution and the softmax of the rewards.

    Shapes: ``rewards`` ``(G, K)`` model scores, ``target_probs`` ``(G, K)`` probability that
    each candidate ranks first (rows sum to 1 over the valid entries), ``mask`` ``(G, K)``
    bool for ragged K (False = no candidate; excluded from the softmax) -> ``(G,)``.

        P_k = exp(R_k) / Σ_{j valid} exp(R_j)
        L_g = −Σ_{k valid} t_k log P_k

    With one-hot targets (:func:`top1_targets`) this is the K-way softmax loss of the best
    candidate; with K = 2 and a one-hot target it is the Bradley–Terry loss. Fractional
    targets (ties, :func:`softmax_targets`) spread the mass. Note 002 §10.5.

    Metrics (detached, ``(G,)``): ``accuracy`` (1 where the model's top-scored valid candidate
    has the largest target probability), ``target_log_prob`` (``Σ t_k log P_k = −L``).
    """
    valid = _valid(rewards, mask)
    _check_list("target_probs", target_probs, rewards)
    dtype = _dtype(rewards, target_probs)
    scores = rewards.to(dtype)
    targets = target_probs.to(dtype)
    log_p = _masked_log_softmax(scores, valid)
    zero = torch.zeros((), dtype=dtype, device=scores.device)
    losses = -torch.where(valid, targets * log_p, zero).sum(-1)

    with torch.no_grad():
        best_target = torch.where(valid, targets, torch.full_like(targets, -math.inf)).amax(-1)
        top = log_p.argmax(-1, keepdim=True)
        accuracy = (targets.gather(-1, top).squeeze(-1) >= best_target) & valid.any(-1)
    metrics = {"accuracy": accuracy.to(dtype), "target_log_prob": -losses.detach()}
    return losses, metrics


def top1_targets(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One-hot targets on each row's best score; ties share the mass equally.   ``(G, K) -> (G, K)``.

    ``t_k = 1/n`` for the ``n`` valid candidates with the row's maximum score, 0 elsewhere
    ("fractional" targets for ties). Masked entries get 0; a row with no valid entry is all
    zeros. The result is detached (targets are labels, not model outputs).
    """
    valid = _valid(scores, mask)
    scores = scores.detach()
    masked = torch.where(valid, scores, torch.full_like(scores, -math.inf))
    best = masked.amax(-1, keepdim=True)
    is_best = (masked == best) & valid
    counts = is_best.sum(-1, keepdim=True).clamp(min=1)
    return is_best.to(_dtype(scores)) / counts.to(_dtype(scores))


def softmax_targets(
    scores: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft targets ``softmax(scores / temperature)`` over the valid entries.   ``(G, K) -> (G, K)``.

    ``temperature > 0``; small temperatures approach :func:`top1_targets` (ties included),
    large ones approach uniform. Masked entries get 0, an all-masked row is all zeros.
    Detached.
    """
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    valid = _valid(scores, mask)
    scaled = scores.detach().to(_dtype(scores)) / temperature
    probs = _masked_log_softmax(scaled, valid).exp()
    return torch.where(valid, probs, torch.zeros_like(probs))
