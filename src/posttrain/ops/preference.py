"""Offline preference losses: one registry, capabilities declared as data.

Shape legend: ``P`` preference pairs, ``S`` single responses, ``G`` prompts (groups) of ranked
responses, ``M`` mismatched prompt/completion pairs (KTO's KL batch).

Inputs are *sequence* log-probs: ``c = log π_θ(y_w | x)`` and ``r = log π_θ(y_l | x)`` are sums
of the response tokens' log-probs (see :func:`posttrain.ops.sequence_sums`); ``c_ref``,
``r_ref`` the same under the frozen reference policy; ``|y|`` the response token counts. A bar
means the per-token average, ``c̄ = c / |y_w|``. ``σ`` is the logistic function and
``−log σ(x) = softplus(−x)``.

Every loss returns ``(losses, metrics)``: ``losses`` holds one value per example (per pair,
response or group) and is *not* reduced, because the trainer sums it and divides by the
example count of the whole optimizer step (exact gradient accumulation, see
:func:`posttrain.ops.aggregate_loss`); ``metrics`` holds detached tensors, per example or
scalar.

The capability table (``PREFERENCE_LOSSES``) tells the trainer what each loss needs; it never
branches on a loss name:

=======  ==========  =========  ========  ===========  ========================================
name     data        reference  SFT term  length-norm  hyperparameters
=======  ==========  =========  ========  ===========  ========================================
dpo      paired      yes        no        no           beta, label_smoothing, robust
ipo      paired      yes        no        yes          beta
hinge    paired      yes        no        no           beta
dpop     paired      yes        no        no           beta, dpop_lambda
simpo    paired      no         no        yes          beta, simpo_gamma, label_smoothing
orpo     paired      no         yes       yes          orpo_lambda
kto      unpaired    yes        no        no           beta, kto_lambda_d, kto_lambda_u
tilt     ranked      no         no        no (opt.)    beta, length_normalize
=======  ==========  =========  ========  ===========  ========================================

Signatures by data kind (``*`` marks the keyword-only hyperparameters)::

    paired:    fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_lengths, rejected_lengths, *, ...)            all (P,) -> (P,)
    unpaired:  fn(logps, ref_logps, desirable, kl_logps, ref_kl_logps, lengths, *, ...)
                                                                       (S,), (M,) -> (S,)
    ranked:    fn(logps, rewards, group_ids, lengths, *, ...)         (S,) -> (G,)

Reference-free losses accept ``None`` for the reference arguments (and ignore them if given).
Computation is in float32 (float64 inputs stay float64); lengths may be float or integer and
must be ≥ 1 where a loss divides by them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    out = torch.float32
    for t in tensors:
        if t is not None and t.dtype.is_floating_point:
            out = torch.promote_types(out, t.dtype)
    return out


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype)


def _check_positive(name: str, value: float) -> None:
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_label_smoothing(value: float) -> None:
    if not 0.0 <= value < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {value!r}")


def _require_reference(loss: str, **tensors: torch.Tensor | None) -> None:
    missing = [name for name, t in tensors.items() if t is None]
    if missing:
        raise ValueError(f"preference loss {loss!r} needs reference log-probs; got None for {missing}")


def _smoothed_sigmoid_loss(h: torch.Tensor, label_smoothing: float, robust: bool = False) -> torch.Tensor:
    """−(1−ε) log σ(h) − ε log σ(−h), or the robust (unbiased) form when ``robust``."""
    eps = label_smoothing
    pos, neg = -F.logsigmoid(h), -F.logsigmoid(-h)
    if robust:
        return ((1.0 - eps) * pos - eps * neg) / (1.0 - 2.0 * eps)
    if eps == 0.0:
        return pos
    return (1.0 - eps) * pos + eps * neg


def _paired_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    **extra: torch.Tensor,
) -> Metrics:
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    margins = c - r
    metrics = {
        "chosen_rewards": c,
        "rejected_rewards": r,
        "margins": margins,
        "accuracy": (margins > 0).to(margins.dtype),
        "chosen_logps": chosen_logps.detach(),
        "rejected_logps": rejected_logps.detach(),
    }
    metrics.update({name: value.detach() for name, value in extra.items()})
    return metrics


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012): ``log(−expm1(x))`` near 0,
    ``log1p(−exp(x))`` far from it. Both branches see only safe inputs, so gradients stay finite."""
    near = x > -math.log(2.0)
    fill = torch.full_like(x, -1.0)
    near_branch = torch.log(-torch.expm1(torch.where(near, x, fill)))
    far_branch = torch.log1p(-torch.exp(torch.where(near, fill, x)))
    return torch.where(near, near_branch, far_branch)


# --------------------------------------------------------------------------------------------
# paired losses
# --------------------------------------------------------------------------------------------


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    robust: bool = False,
) -> tuple[torch.Tensor, Metrics]:
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290).   ``(P,) -> (P,)``.

        h = β [(c − c_ref) − (r − r_ref)]
        L = −(1−ε) log σ(h) − ε log σ(−h)                         (ε = label_smoothing)

    The implicit reward is ``β (log π_θ − log π_ref)``; ``h`` is the reward margin. At step 0
    (π_θ = π_ref) ``h = 0`` and ``L = ln 2`` for every ε. ε > 0 is "conservative DPO": it treats
    each label as flipped with probability ε, so the loss no longer pushes ``h → ∞``.

    ``robust=True`` uses the unbiased robust-DPO estimator (Chowdhury et al. 2024,
    arXiv:2403.00409) for labels flipped with known rate ε < 0.5:

        L = [(1−ε)(−log σ(h)) − ε(−log σ(−h))] / (1 − 2ε)

    Gradient (ε = 0): ``∂L/∂c = −β σ(−h)`` and ``∂L/∂r = +β σ(−h)``: the weight ``σ(−h)`` is
    large when the implicit reward orders the pair wrongly. Reference tensors that do not
    require grad get none. Lengths are unused.
    """
    _check_positive("beta", beta)
    _check_label_smoothing(label_smoothing)
    _require_reference("dpo", ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    dtype = _dtype(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_ratio = _cast(chosen_logps, dtype) - _cast(ref_chosen_logps, dtype)
    rejected_ratio = _cast(rejected_logps, dtype) - _cast(ref_rejected_logps, dtype)
    h = beta * (chosen_ratio - rejected_ratio)
    losses = _smoothed_sigmoid_loss(h, label_smoothing, robust)
    metrics = _paired_metrics(beta * chosen_ratio, beta * rejected_ratio, chosen_logps, rejected_logps)
    return losses, metrics


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """Identity Preference Optimization (Azar et al. 2023, arXiv:2310.12036, eq. 17).   ``(P,) -> (P,)``.

        h = (c̄ − c̄_ref) − (r̄ − r̄_ref),     c̄ = c / |y_w|, r̄ = r / |y_l| (ref alike)
        L = (h − 1/(2τ))²,                  τ = beta

    A squared regression of the log-ratio margin onto the constant ``1/(2τ)``: unlike DPO the
    target stays finite when a preference is deterministic, so the policy cannot drift
    arbitrarily far from π_ref. ``beta`` plays the role of the paper's τ (as in TRL); the
    log-ratios are averaged per token (as in TRL, not the paper's sequence sums). At step 0,
    ``L = 1/(2τ)²``. Metrics report the length-averaged log-ratios as rewards (no β factor),
    so ``margins`` is ``h`` itself and converges to ``1/(2τ)``.
    """
    _check_positive("beta", beta)
    _require_reference("ipo", ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    dtype = _dtype(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    n_c, n_r = _cast(chosen_lengths, dtype), _cast(rejected_lengths, dtype)
    chosen_ratio = (_cast(chosen_logps, dtype) - _cast(ref_chosen_logps, dtype)) / n_c
    rejected_ratio = (_cast(rejected_logps, dtype) - _cast(ref_rejected_logps, dtype)) / n_r
    h = chosen_ratio - rejected_ratio
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, _paired_metrics(chosen_ratio, rejected_ratio, chosen_logps, rejected_logps)


def slic_hinge_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    *,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """SLiC-style hinge loss on the DPO margin (Zhao et al. 2023, arXiv:2305.10425).   ``(P,) -> (P,)``.

        h = β [(c − c_ref) − (r − r_ref)]
        L = max(0, 1 − h)

    Pairs whose margin already exceeds 1 contribute neither loss nor gradient; below it the
    gradient is ``∂L/∂c = −β``, ``∂L/∂r = +β``. At step 0 ``L = 1``. Lengths are unused.
    """
    _check_positive("beta", beta)
    _require_reference("hinge", ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    dtype = _dtype(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_ratio = _cast(chosen_logps, dtype) - _cast(ref_chosen_logps, dtype)
    rejected_ratio = _cast(rejected_logps, dtype) - _cast(ref_rejected_logps, dtype)
    h = beta * (chosen_ratio - rejected_ratio)
    losses = torch.relu(1.0 - h)
    return losses, _paired_metrics(beta * chosen_ratio, beta * rejected_ratio, chosen_logps, rejected_logps)


def dpop_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    *,
    beta: float,
    dpop_lambda: float,
) -> tuple[torch.Tensor, Metrics]:
    """DPO-Positive (Pal et al. 2024, arXiv:2402.13228).   ``(P,) -> (P,)``.

        penalty = λ · max(0, c_ref − c)
        L = −log σ(β [(c − c_ref) − (r − r_ref)] − penalty)

    The penalty is active only while the chosen response is *less* likely than under the
    reference; it counters likelihood displacement (both log-probs falling while the margin
    grows, reference note 001 §6.8). Convention: λ (``dpop_lambda``) sits *outside* β, as the
    reference note writes it; the DPOP paper multiplies it inside β, so the paper's λ equals
    ``dpop_lambda / beta`` (paper λ = 50 at β = 0.1 is ``dpop_lambda = 5``). With the penalty
    active, ``∂L/∂c = −(β + λ) σ(−z)`` (z the argument of σ); inactive, it is DPO's.
    Metrics: DPO rewards and margins (without the penalty) and ``dpop_penalty``.
    """
    _check_positive("beta", beta)
    _check_non_negative("dpop_lambda", dpop_lambda)
    _require_reference("dpop", ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    dtype = _dtype(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_ratio = _cast(chosen_logps, dtype) - _cast(ref_chosen_logps, dtype)
    rejected_ratio = _cast(rejected_logps, dtype) - _cast(ref_rejected_logps, dtype)
    penalty = dpop_lambda * torch.relu(-chosen_ratio)
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio) - penalty)
    metrics = _paired_metrics(
        beta * chosen_ratio, beta * rejected_ratio, chosen_logps, rejected_logps, dpop_penalty=penalty
    )
    return losses, metrics


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    simpo_gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Simple Preference Optimization (Meng et al. 2024, arXiv:2405.14734).   ``(P,) -> (P,)``.

        h = β c̄ − β r̄ − γ,       c̄ = c / |y_w|, r̄ = r / |y_l|,  γ = simpo_gamma ≥ 0
        L = −(1−ε) log σ(h) − ε log σ(−h)

    Reference-free: the implicit reward is the length-averaged log-likelihood ``β ȳ`` (the
    quantity that ranks generations), and γ asks the chosen reward to win by a margin. The
    reference arguments are ignored (pass ``None``). Label smoothing as in :func:`dpo_loss`.
    Metrics: rewards ``β c̄``, ``β r̄`` and their margin (without γ).
    """
    _check_positive("beta", beta)
    _check_non_negative("simpo_gamma", simpo_gamma)
    _check_label_smoothing(label_smoothing)
    dtype = _dtype(chosen_logps, rejected_logps)
    chosen_rewards = beta * _cast(chosen_logps, dtype) / _cast(chosen_lengths, dtype)
    rejected_rewards = beta * _cast(rejected_logps, dtype) / _cast(rejected_lengths, dtype)
    losses = _smoothed_sigmoid_loss(chosen_rewards - rejected_rewards - simpo_gamma, label_smoothing)
    return losses, _paired_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    orpo_lambda: float,
) -> tuple[torch.Tensor, Metrics]:
    """Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691).   ``(P,) -> (P,)``.

        p(y)        = exp(ȳ)                       ȳ = per-token mean log-prob of y
        log odds(y) = log p − log(1 − p) = ȳ − log(1 − exp(ȳ))
        L = −c̄ + λ · (−log σ(log odds(y_w) − log odds(y_l)))      λ = orpo_lambda

    Reference-free, and the SFT term is part of the loss (``sft_term=True``): ORPO replaces the
    separate SFT stage. ``log(1 − exp(ȳ))`` is computed stably (``log(−expm1)`` near 0,
    ``log1p(−exp)`` far from it), and ȳ is clamped to ``≤ −eps`` (machine epsilon) so a
    response with probability 1 gives a large finite log-odds instead of ``inf``.

    Convention: the NLL term is each pair's own per-token mean ``−c / |y_w|``; the paper's
    implementation takes the token mean over the whole batch of chosen tokens, which weighs
    long responses more. Metrics: ``chosen_rewards`` / ``rejected_rewards`` are the log-odds
    (so ``margins`` is the log odds ratio), plus ``nll`` and ``odds_ratio_loss``.
    """
    _check_non_negative("orpo_lambda", orpo_lambda)
    dtype = _dtype(chosen_logps, rejected_logps)
    mean_c = _cast(chosen_logps, dtype) / _cast(chosen_lengths, dtype)
    mean_r = _cast(rejected_logps, dtype) / _cast(rejected_lengths, dtype)
    cap = -torch.finfo(dtype).eps
    log_odds_c = mean_c.clamp(max=cap) - _log1mexp(mean_c.clamp(max=cap))
    log_odds_r = mean_r.clamp(max=cap) - _log1mexp(mean_r.clamp(max=cap))
    odds_ratio_loss = -F.logsigmoid(log_odds_c - log_odds_r)
    nll = -mean_c
    losses = nll + orpo_lambda * odds_ratio_loss
    metrics = _paired_metrics(
        log_odds_c, log_odds_r, chosen_logps, rejected_logps, nll=nll, odds_ratio_loss=odds_ratio_loss
    )
    return losses, metrics


# --------------------------------------------------------------------------------------------
# unpaired: KTO
# --------------------------------------------------------------------------------------------


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    beta: float,
    kto_lambda_d: float = 1.0,
    kto_lambda_u: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """Kahneman–Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306).   ``(S,) -> (S,)``.

    Shapes: ``logps``, ``ref_logps`` ``(S,)`` sequence log-probs of single responses,
    ``desirable`` ``(S,)`` bool (thumbs up / down), ``kl_logps``, ``ref_kl_logps`` ``(M,)``
    sequence log-probs of *mismatched* prompt/completion pairs (completions paired with
    another example's prompt).

        z_ref = max(0, mean_M(kl_logps − ref_kl_logps))            detached
        ρ     = logps − ref_logps
        L     = λ_D (1 − σ(β (ρ − z_ref)))     if desirable
                λ_U (1 − σ(β (z_ref − ρ)))     otherwise

    ``z_ref`` estimates KL(π_θ ‖ π_ref) on the batch and is the prospect-theory reference
    point: a response gains only if its log-ratio beats it. It carries no gradient (it is
    detached here even if the caller forgot ``no_grad``). Convention: z_ref is in log-ratio
    units and β multiplies the difference (as TRL does); the reference note writes both
    terms pre-multiplied by β, which is the same thing. ``M = 0`` gives ``z_ref = 0``.
    λ_D / λ_U re-weight the two kinds, e.g. to balance their counts. Lengths are unused.

    Metrics: scalars ``z_ref`` and ``kl`` (the unclamped batch mean); per example ``(S,)``:
    ``rewards`` ``β ρ``, ``desirable_rewards`` / ``undesirable_rewards`` (``β ρ`` on that kind,
    0 on the other) and ``desirable`` (1.0 / 0.0), so that summed over a step
    ``Σ desirable_rewards / Σ desirable`` is the mean reward of the desirable responses. No
    data-dependent shapes (boolean indexing would sync the device).
    """
    _check_positive("beta", beta)
    _check_non_negative("kto_lambda_d", kto_lambda_d)
    _check_non_negative("kto_lambda_u", kto_lambda_u)
    _require_reference("kto", ref_logps=ref_logps, ref_kl_logps=ref_kl_logps)
    dtype = _dtype(logps, ref_logps, kl_logps, ref_kl_logps)
    desirable = desirable.to(torch.bool)
    kl_ratio = (_cast(kl_logps, dtype) - _cast(ref_kl_logps, dtype)).detach()
    if kl_ratio.numel() == 0:
        kl = torch.zeros((), dtype=dtype, device=logps.device)
    else:
        kl = kl_ratio.mean()
    z_ref = kl.clamp(min=0.0)
    ratio = _cast(logps, dtype) - _cast(ref_logps, dtype)
    gain = kto_lambda_d * (1.0 - torch.sigmoid(beta * (ratio - z_ref)))
    loss_side = kto_lambda_u * (1.0 - torch.sigmoid(beta * (z_ref - ratio)))
    losses = torch.where(desirable, gain, loss_side)

    rewards = (beta * ratio).detach()
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    metrics = {
        "z_ref": z_ref,
        "kl": kl,
        "rewards": rewards,
        "desirable_rewards": torch.where(desirable, rewards, zero),
        "undesirable_rewards": torch.where(desirable, zero, rewards),
        "desirable": desirable.to(dtype),
    }
    return losses, metrics


# --------------------------------------------------------------------------------------------
# ranked: exponential-tilt weighted NLL
# --------------------------------------------------------------------------------------------


def tilt_loss(
    logps: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    beta: float,
    length_normalize: bool = False,
    num_groups: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Exponential-tilt weighted NLL over K scored responses per prompt.   ``(S,) -> (G,)``.

    Shapes: ``logps`` ``(S,)`` sequence log-probs, ``rewards`` ``(S,)`` scalar rewards,
    ``group_ids`` ``(S,)`` long in ``[0, G)`` naming each response's prompt (groups may have
    different sizes K_g), ``lengths`` ``(S,)`` (used only with ``length_normalize``).

        ω_i = exp(r_i / β) / Σ_{j in g(i)} exp(r_j / β)          softmax within each group
        L_g = −Σ_{i in g} ω_i · log π_θ(y_i | x_g)               (or log π_θ / |y_i|)

    Why: the KL-regularized optimum is the exponential tilt ``π* ∝ π_ref · exp(r/β)``; if the
    K responses were sampled from π_ref, ω are self-normalized importance weights, so
    ``−Σ ω_i ∇log π_θ(y_i)`` estimates ``−E_{π*}[∇log π_θ]`` and minimizing ``L`` moves π_θ
    toward π* (reference note 002 §10.9, a generalized-preference / Fenchel–Young argument).
    The gradient needs no π_ref, so the loss is reference-free. The note's extra factor β in
    front of the sum only rescales the gradient and is dropped. β → 0 gives the NLL of each
    group's best response (rejection-sampling fine-tuning); β → ∞ the plain mean NLL.

    The weights are constants (computed from detached rewards): ``∂L_g/∂log π_i = −ω_i``. The
    softmax subtracts each group's maximum (scatter ops, no Python loop over groups). A group
    id with no response gives loss 0. ``num_groups`` defaults to ``max(group_ids) + 1``, which
    reads one number back from the device; pass it to avoid that.

    Metrics: ``weights`` ``(S,)``, ``weight_entropy`` ``(G,)`` (``−Σ ω log ω``; ``log K`` for
    equal rewards, 0 when one response takes all the weight), ``max_weight`` ``(G,)``.
    """
    _check_positive("beta", beta)
    if not (logps.shape == rewards.shape == group_ids.shape) or logps.dim() != 1:
        raise ValueError(
            f"logps {tuple(logps.shape)}, rewards {tuple(rewards.shape)} and group_ids "
            f"{tuple(group_ids.shape)} must all have the same 1-D shape (S,)"
        )
    dtype = _dtype(logps, rewards)
    device = logps.device
    if num_groups is None:
        num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0

    scaled = _cast(rewards.detach(), dtype) / beta
    group_max = torch.full((num_groups,), -math.inf, dtype=dtype, device=device)
    group_max = group_max.scatter_reduce(0, group_ids, scaled, reduce="amax", include_self=True)
    shifted = scaled - group_max[group_ids]  # ≤ 0, 0 at each group's best response
    unnormalized = torch.exp(shifted)
    denominator = torch.zeros(num_groups, dtype=dtype, device=device).index_add(0, group_ids, unnormalized)
    weights = unnormalized / denominator[group_ids]
    log_weights = shifted - torch.log(denominator)[group_ids]

    values = _cast(logps, dtype)
    if length_normalize:
        if lengths is None:
            raise ValueError("tilt with length_normalize=True needs lengths")
        values = values / _cast(lengths, dtype)
    zeros = torch.zeros(num_groups, dtype=dtype, device=device)
    losses = -zeros.index_add(0, group_ids, weights * values)

    metrics = {
        "weights": weights,
        "weight_entropy": -zeros.index_add(0, group_ids, weights * log_weights),
        "max_weight": zeros.scatter_reduce(0, group_ids, weights, reduce="amax", include_self=True),
    }
    return losses, metrics


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


class PreferenceLoss(NamedTuple):
    """A preference loss and what it needs, read by the trainer instead of branching on names.

    An immutable record (a ``NamedTuple``: ``posttrain.ops`` imports nothing beyond torch,
    ``collections``, ``math`` and ``typing``; it reads like a frozen dataclass).

    - ``data``: ``"paired"`` (chosen/rejected), ``"unpaired"`` (desirable/undesirable
      singles) or ``"ranked"`` (K scored responses per prompt); fixes ``fn``'s signature.
    - ``needs_reference``: the trainer must compute reference log-probs.
    - ``sft_term``: the loss already contains an NLL term on the chosen response.
    - ``length_normalized``: the loss divides sequence log-probs by response lengths.
    - ``hyperparameters``: the keyword arguments ``fn`` takes from the config.
    """

    name: str
    fn: Callable[..., tuple[torch.Tensor, Metrics]]
    data: str
    needs_reference: bool
    sft_term: bool
    length_normalized: bool
    hyperparameters: tuple[str, ...]


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    loss.name: loss
    for loss in (
        PreferenceLoss("dpo", dpo_loss, "paired", True, False, False, ("beta", "label_smoothing", "robust")),
        PreferenceLoss("ipo", ipo_loss, "paired", True, False, True, ("beta",)),
        PreferenceLoss("hinge", slic_hinge_loss, "paired", True, False, False, ("beta",)),
        PreferenceLoss("dpop", dpop_loss, "paired", True, False, False, ("beta", "dpop_lambda")),
        PreferenceLoss(
            "simpo", simpo_loss, "paired", False, False, True, ("beta", "simpo_gamma", "label_smoothing")
        ),
        PreferenceLoss("orpo", orpo_loss, "paired", False, True, True, ("orpo_lambda",)),
        PreferenceLoss(
            "kto", kto_loss, "unpaired", True, False, False, ("beta", "kto_lambda_d", "kto_lambda_u")
        ),
        PreferenceLoss("tilt", tilt_loss, "ranked", False, False, False, ("beta", "length_normalize")),
    )
}


def get_preference_loss(name: str) -> PreferenceLoss:
    """The registry entry for ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return PREFERENCE_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown preference loss {name!r}; valid losses: {sorted(PREFERENCE_LOSSES)}"
        ) from None
