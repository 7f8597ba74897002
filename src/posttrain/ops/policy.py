"""Policy and value losses of online RL: one registry, capabilities declared as data.

Shape legend: ``B`` rows (responses), ``T`` response token positions. ``log_probs`` are
log π_θ of the sampled tokens under the policy being trained (with gradient);
``old_log_probs`` the same tokens under the policy that generated / scored the batch before
this round of updates (π_old, constants); ``mask`` ``(B, T)`` marks the response tokens.
``advantages`` may be ``(B,)``, ``(B, 1)`` (one per response) or ``(B, T)`` (per token); they
broadcast over tokens and are treated as constants.

    ratio ρ_t = π_θ(a_t) / π_old(a_t) = exp(log_probs − old_log_probs)

Every loss has one signature and returns a *per-token, unreduced* loss ``(B, T)`` plus
metrics::

    fn(log_probs, old_log_probs, advantages, mask, *, <declared hyperparameters>)
        -> (loss (B, T), metrics: dict[str, (B, T) detached float tensor])

The caller reduces with :func:`posttrain.ops.aggregate_loss` and the step's *global* token /
sequence counts; metrics are reduced the same way (masked sums divided by global counts), so
they add up over micro-batches. Loss and metrics are exactly 0 at masked positions, whatever
the inputs hold there (NaN and ±inf included, with finite gradients).

Sign convention: losses are minimized; at ρ = 1 (``log_probs == old_log_probs``) every
loss's gradient with respect to ``log_probs[b, t]`` is ``−A[b, t]`` (GSPO: see its
docstring), so all of them start as the same policy gradient and differ only in how they
treat off-policy tokens.

Shared metrics: ``ratio`` (ρ per token; GSPO: the sequence ratio), ``approx_kl``
(k3 = (ρ − 1) − log ρ per token, an unbiased non-negative estimate of KL(π_old ‖ π_θ) for
tokens sampled from π_old; Schulman 2020), ``clipped_low`` / ``clipped_high`` (1.0 where the
lower / upper clip acts; what "acts" means is stated per loss).

Numerics: the log-ratio is clamped to [−20, 20] before ``exp`` (as verl), so a wildly
off-policy token cannot overflow; beyond that bound its gradient is 0.

Clip ranges: any finite ε > 0 is accepted. The ratio is positive, so a lower range ε ≥ 1
(1 − ε ≤ 0) means no lower clip, and a large ε_h no upper clip: a large range is how a clip is
switched off (``clip_eps=1e9`` turns ppo_clip into the unclipped importance-weighted policy
gradient).

========  ======  =======  ==============================================  ======================
name      old lp  seq-lvl  per-token loss                                  hyperparameters
========  ======  =======  ==============================================  ======================
pg        no      no       −A log π_θ                                      —
ppo_clip  yes     no       max(−A ρ, −A clip(ρ, 1−ε, 1+ε_h)), dual clip    clip_eps,
                                                                           clip_eps_high, dual_clip
gspo      yes     yes      as ppo_clip with ρ → s_i = exp(mean_t log ρ_t)  clip_eps, clip_eps_high
cispo     yes     no       −sg(clip(ρ, 1−ε, 1+ε_h)) A log π_θ              clip_eps, clip_eps_high
========  ======  =======  ==============================================  ======================

Also here, outside the registry: :func:`value_loss` (the critic's, optionally clipped) and
:func:`truncated_importance_weights` (per-token weights correcting the trainer-vs-rollout
log-prob mismatch; multiply the policy loss by them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

Metrics = dict[str, torch.Tensor]

_LOG_RATIO_CLAMP = 20.0

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _float_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    out = torch.float32
    for t in tensors:
        if t is not None and t.dtype.is_floating_point:
            out = torch.promote_types(out, t.dtype)
    return out


def _check_2d(name: str, x: torch.Tensor, shape: torch.Size) -> None:
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def _broadcast_advantages(advantages: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    B, T = shape
    if advantages.shape in ((B,), (B, 1)):
        return advantages.reshape(B, 1).expand(B, T)
    if advantages.shape == (B, T):
        return advantages
    raise ValueError(
        f"advantages must have shape ({B},), ({B}, 1) or ({B}, {T}), got {tuple(advantages.shape)}"
    )


class _Inputs(NamedTuple):
    keep: torch.Tensor  # (B, T) bool
    log_probs: torch.Tensor  # (B, T) with grad, 0 at masked positions
    log_ratio: torch.Tensor  # (B, T) with grad, clamped, 0 at masked positions
    advantages: torch.Tensor  # (B, T) constants, 0 at masked positions
    zero: torch.Tensor  # scalar 0 of the compute dtype


def _prepare(log_probs, old_log_probs, advantages, mask) -> _Inputs:
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must have shape (B, T), got {tuple(log_probs.shape)}")
    shape = log_probs.shape
    _check_2d("mask", mask, shape)
    if old_log_probs is not None:
        _check_2d("old_log_probs", old_log_probs, shape)
    dtype = _float_dtype(log_probs, old_log_probs, advantages)
    keep = mask != 0
    zero = torch.zeros((), dtype=dtype, device=log_probs.device)
    lp = torch.where(keep, log_probs.to(dtype), zero)
    if old_log_probs is None:
        log_ratio = torch.zeros_like(lp)
    else:
        old = torch.where(keep, old_log_probs.detach().to(dtype), zero)
        log_ratio = (lp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    adv = _broadcast_advantages(advantages.detach().to(dtype), shape)
    adv = torch.where(keep, adv, zero)
    return _Inputs(keep, lp, log_ratio, adv, zero)


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``x`` with 0 at masked positions."""
    x = x.detach()
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _flag(cond: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (cond & keep).to(dtype)


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """(ρ − 1) − log ρ from log ρ, accurate for tiny log ρ."""
    lr = log_ratio.detach()
    return torch.expm1(lr) - lr


def _check_clip(name: str, value: float) -> None:
    """Any finite ε > 0. A lower range ε ≥ 1 gives 1 − ε ≤ 0 < ρ: no lower clip (how a clip is
    switched off), not an error."""
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


# --------------------------------------------------------------------------------------------
# policy losses
# --------------------------------------------------------------------------------------------


def policy_gradient_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, Metrics]:
    """Naive policy gradient (REINFORCE).   ``(B, T) -> (B, T)``.

        loss_t = −A_t · log π_θ(a_t)        ∇ = −A_t ∇log π_θ(a_t)

    No importance ratio and no clipping: exact only on-policy (one update per batch). With raw
    rewards as ``A`` (estimator ``none``) this is Williams' 1992 REINFORCE; with RLOO / ReMax
    advantages it is the RLOO / ReMax update. The loss *value* is not meaningful (it is not 0
    at the start); only its gradient is. ``old_log_probs`` may be ``None``; when given, the
    ``ratio`` / ``approx_kl`` metrics are filled in (otherwise 1 and 0). ``clipped_*`` are 0.
    """
    x = _prepare(log_probs, old_log_probs, advantages, mask)
    loss = torch.where(x.keep, -x.advantages * x.log_probs, x.zero)
    metrics = {
        "ratio": _masked(x.log_ratio.exp(), x.keep),
        "approx_kl": _masked(_k3(x.log_ratio), x.keep),
        "clipped_low": torch.zeros_like(x.advantages),
        "clipped_high": torch.zeros_like(x.advantages),
    }
    return loss, metrics


def ppo_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped surrogate, with clip-higher and dual clip.   ``(B, T) -> (B, T)``.

        loss_t = max( −A ρ,  −A clip(ρ, 1 − ε, 1 + ε_h) )       ε = clip_eps, ε_h = clip_eps_high
        dual clip (c = dual_clip > 1), for A < 0 only:  loss_t = min(loss_t, −c A) = min(loss_t, c|A|)

    The max (the min of the objectives) is pessimistic: the clip removes the gradient of a
    token only when the ratio has already moved *in the direction the advantage pushes*:
    ``clipped_high`` = ρ > 1 + ε_h with A > 0, ``clipped_low`` = ρ < 1 − ε with A < 0 (TRL's
    definition). ``dual_clipped`` = ρ > c with A < 0: there the loss is the constant c|A| and the
    gradient is 0, which bounds what one very off-policy token with a negative advantage can
    contribute (Ye et al. 2020, arXiv:1912.09729; verl's ``clip_ratio_c``, usually 3).

    Defaults: ε = 0.2 (Schulman et al. 2017, arXiv:1707.06347); ``clip_eps_high=None`` means
    ε_h = ε (symmetric). DAPO's clip-higher uses ε = 0.2, ε_h = 0.28 (Yu et al. 2025,
    arXiv:2503.14476) so that low-probability tokens can grow. ``dual_clip=None`` disables the
    dual clip.
    """
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    _check_clip("clip_eps", clip_eps)
    _check_clip("clip_eps_high", clip_eps_high)
    if dual_clip is not None and not (dual_clip > 1.0 and math.isfinite(dual_clip)):
        raise ValueError(f"dual_clip must be a finite number > 1 (or None), got {dual_clip!r}")
    x = _prepare(log_probs, old_log_probs, advantages, mask)
    lo, hi = 1.0 - clip_eps, 1.0 + clip_eps_high
    ratio = x.log_ratio.exp()
    A = x.advantages
    loss = torch.maximum(-A * ratio, -A * ratio.clamp(lo, hi))
    r = ratio.detach()
    dual = torch.zeros_like(r, dtype=torch.bool)
    if dual_clip is not None:
        loss = torch.where(A < 0, torch.minimum(loss, -A * dual_clip), loss)
        dual = (A < 0) & (r > dual_clip)
    loss = torch.where(x.keep, loss, x.zero)
    metrics = {
        "ratio": _masked(ratio, x.keep),
        "approx_kl": _masked(_k3(x.log_ratio), x.keep),
        "clipped_low": _flag((r < lo) & (A < 0), x.keep, loss.dtype),
        "clipped_high": _flag((r > hi) & (A > 0), x.keep, loss.dtype),
        "dual_clipped": _flag(dual, x.keep, loss.dtype),
    }
    return loss, metrics


def gspo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 3e-4,
    clip_eps_high: float = 4e-4,
) -> tuple[torch.Tensor, Metrics]:
    """Group Sequence Policy Optimization, in its GSPO-token form.   ``(B, T) -> (B, T)``.

    The importance ratio is per *sequence*, the geometric mean of the token ratios over the
    response's |y_i| kept tokens:

        s_i = exp( (1/|y_i|) Σ_t log ρ_it )

    and it is clipped per sequence (the whole response is in or out), with the PPO form
    ``max(−A s, −A clip(s, 1 − ε, 1 + ε_h))``. To return a per-token tensor we use the paper's
    GSPO-token ratio

        s_it = sg[s_i] · π_θ(a_t) / sg[π_θ(a_t)]          (value s_i, ∇s_it = s_i ∇log π_θ(a_t))

    so ``loss[i, t] = max(−A_it s_it, −A_it clip(s_it, 1 − ε, 1 + ε_h))`` has the value of the
    sequence loss at every token and no cross-token gradient. Averaged over the tokens of each
    response (``aggregate_loss(..., "seq_mean_token_mean")``, the paper's normalization) its
    gradient is exactly that of the sequence objective, −A_i ∇s_i = −A_i s_i (1/|y_i|) Σ_t
    ∇log π_θ(a_t), i.e. −A_i s_i / |y_i| per token (−A_i/|y_i| at s_i = 1). The gradient of the
    per-token tensor itself at token t is −A s_i (−A at s_i = 1), as for the other losses.
    Per-token advantages ``(B, T)`` are allowed (that is what GSPO-token adds).

    Metrics are per sequence, broadcast to its tokens: ``ratio`` = s_i; ``clipped_high`` =
    s_i > 1 + ε_h with A > 0, ``clipped_low`` = s_i < 1 − ε with A < 0. ``approx_kl`` is the
    per-token k3.

    Defaults ε = 3e-4, ε_h = 4e-4 are the paper's (Zheng et al. 2025, arXiv:2507.18071):
    sequence-mean log-ratios are far smaller than token log-ratios.
    """
    _check_clip("clip_eps", clip_eps)
    _check_clip("clip_eps_high", clip_eps_high)
    x = _prepare(log_probs, old_log_probs, advantages, mask)
    lo, hi = 1.0 - clip_eps, 1.0 + clip_eps_high
    n = x.keep.sum(-1, keepdim=True).to(x.log_ratio.dtype)
    seq_log_ratio = x.log_ratio.detach().sum(-1, keepdim=True) / n.clamp(min=1.0)  # (B, 1)
    log_s = seq_log_ratio + x.log_probs - x.log_probs.detach()  # value: seq_log_ratio
    s = log_s.exp()
    A = x.advantages
    loss = torch.maximum(-A * s, -A * s.clamp(lo, hi))
    loss = torch.where(x.keep, loss, x.zero)
    s_val = s.detach()
    metrics = {
        "ratio": _masked(s_val, x.keep),
        "approx_kl": _masked(_k3(x.log_ratio), x.keep),
        "clipped_low": _flag((s_val < lo) & (A < 0), x.keep, loss.dtype),
        "clipped_high": _flag((s_val > hi) & (A > 0), x.keep, loss.dtype),
    }
    return loss, metrics


def cispo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float | None = None,
    clip_eps_high: float = 0.28,
) -> tuple[torch.Tensor, Metrics]:
    """CISPO: clip the importance weight, keep every token's gradient.   ``(B, T) -> (B, T)``.

        loss_t = −sg( clip(ρ_t, 1 − ε, 1 + ε_h) ) · A_t · log π_θ(a_t)

    The truncated ratio is a stop-gradient weight on a REINFORCE term, so unlike PPO no token
    ever loses its gradient (PPO drops the rare "fork" tokens whose ratio moved most, which
    MiniMax-M1 found to matter); the weight only bounds how much an off-policy token counts.
    ``clipped_low`` / ``clipped_high`` mark tokens whose *weight* was truncated (ρ < 1 − ε,
    ρ > 1 + ε_h), whatever the advantage's sign; their gradient is scaled, not removed.

    Defaults: ``clip_eps=None`` imposes no lower bound (MiniMax-M1 sets ε_low large and tunes
    only the upper bound; Chen et al. 2025, arXiv:2506.13585); ``clip_eps_high=0.28`` follows
    Trinity-RFT's default (DAPO's clip-higher value). The paper does not publish its ε_h.
    The loss value is not meaningful (only its gradient is).
    """
    if clip_eps is not None:
        _check_clip("clip_eps", clip_eps)
    _check_clip("clip_eps_high", clip_eps_high)
    x = _prepare(log_probs, old_log_probs, advantages, mask)
    lo = 0.0 if clip_eps is None else 1.0 - clip_eps
    hi = 1.0 + clip_eps_high
    r = x.log_ratio.detach().exp()
    weight = r.clamp(lo, hi)
    loss = torch.where(x.keep, -weight * x.advantages * x.log_probs, x.zero)
    metrics = {
        "ratio": _masked(r, x.keep),
        "approx_kl": _masked(_k3(x.log_ratio), x.keep),
        "clipped_low": _flag(r < lo, x.keep, loss.dtype),
        "clipped_high": _flag(r > hi, x.keep, loss.dtype),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# value loss and truncated importance sampling
# --------------------------------------------------------------------------------------------


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor | None,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Critic regression loss, optionally clipped.   ``(B, T) -> (B, T)``.

        clip_eps = None:   loss_t = ½ (V_t − R_t)²
        clip_eps = ε:      V^clip_t = V^old_t + clip(V_t − V^old_t, −ε, ε)
                           loss_t = ½ max( (V_t − R_t)², (V^clip_t − R_t)² )

    ``values`` are the critic's current predictions (with gradient), ``old_values`` its
    predictions when the batch was collected (needed only when clipping), ``returns`` the
    targets from :func:`posttrain.ops.gae_advantages`. The clipped form (Schulman's PPO
    baselines, InstructGPT) takes the worse of the two errors, so the critic gets no gradient
    for moving more than ε away from its old prediction in the direction that helps.
    Metric ``value_clipped``: 1.0 where the clipped error is the larger one (the clip acts and
    the token's gradient is 0).
    """
    if values.dim() != 2:
        raise ValueError(f"values must have shape (B, T), got {tuple(values.shape)}")
    _check_2d("returns", returns, values.shape)
    _check_2d("mask", mask, values.shape)
    dtype = _float_dtype(values, returns, old_values)
    keep = mask != 0
    zero = torch.zeros((), dtype=dtype, device=values.device)
    v = torch.where(keep, values.to(dtype), zero)
    R = torch.where(keep, returns.detach().to(dtype), zero)
    err = (v - R) ** 2
    if clip_eps is None:
        loss = 0.5 * err
        clipped = torch.zeros_like(keep)
    else:
        _check_clip("clip_eps", clip_eps)
        if old_values is None:
            raise ValueError("value_loss with clip_eps needs old_values")
        _check_2d("old_values", old_values, values.shape)
        old = torch.where(keep, old_values.detach().to(dtype), zero)
        v_clip = old + (v - old).clamp(-clip_eps, clip_eps)
        err_clip = (v_clip - R) ** 2
        loss = 0.5 * torch.maximum(err, err_clip)
        clipped = err_clip.detach() > err.detach()
    loss = torch.where(keep, loss, zero)
    return loss, {"value_clipped": _flag(clipped, keep, dtype)}


TIS_LEVELS = ("token", "sequence")
TIS_MODES = ("truncate", "mask")


def truncated_importance_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    cap: float = 2.0,
    level: str = "token",
    mode: str = "truncate",
) -> tuple[torch.Tensor, Metrics]:
    """Truncated importance weights for the trainer-vs-rollout mismatch.   ``(B, T) -> (B, T)``.

    The rollout engine (vLLM, other kernels, other precision) samples from π_rollout, which
    is not exactly the trainer's π_old. Weighting each token's loss by

        level="token":     w_t = min( π_old(a_t) / π_rollout(a_t), C )
        level="sequence":  w_t = min( exp Σ_{t' kept} (log π_old − log π_rollout), C )
                           (the same weight on every token t of the row)

    corrects the gradient toward on-policy, and the cap C bounds its variance (truncated IS,
    Ionides 2008; for LLM RL: Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training", which uses C = 2, the default here). The sequence level is the
    exact ratio of the response probabilities, with far larger spread; cap it accordingly.

    ``mode="mask"`` (masked importance sampling) rejects instead of truncating: the weight is the
    ratio where it is at most C and 0 where it exceeds C (a token, or with level="sequence" the
    whole row), so a token the trainer finds far likelier than the engine did is left out of the
    gradient rather than kept at weight C.

    ``old_log_probs`` / ``rollout_log_probs`` are log-probs of the same sampled tokens from
    the trainer and the rollout engine. Weights are detached, and 0 at masked positions.
    Multiply the per-token policy loss by them before :func:`posttrain.ops.aggregate_loss`.

    Metrics (per token, 0 off the mask): ``logprob_abs_diff`` = |log π_old − log π_rollout|,
    ``is_ratio`` = the uncapped weight at the chosen level (its log clamped to ≤ 20 so means
    stay finite), ``is_capped`` = 1.0 where the cap acted. Log their mean and max.
    """
    if old_log_probs.dim() != 2:
        raise ValueError(f"old_log_probs must have shape (B, T), got {tuple(old_log_probs.shape)}")
    _check_2d("rollout_log_probs", rollout_log_probs, old_log_probs.shape)
    _check_2d("mask", mask, old_log_probs.shape)
    if not (cap > 0 and math.isfinite(cap)):
        raise ValueError(f"cap must be a finite number > 0, got {cap!r}")
    if level not in TIS_LEVELS:
        raise ValueError(
            f"unknown importance-sampling level {level!r}; valid levels: {list(TIS_LEVELS)}"
        )
    if mode not in TIS_MODES:
        raise ValueError(f"unknown importance-sampling mode {mode!r}; valid modes: {list(TIS_MODES)}")
    dtype = _float_dtype(old_log_probs, rollout_log_probs)
    keep = mask != 0
    zero = torch.zeros((), dtype=dtype, device=old_log_probs.device)
    diff = torch.where(
        keep, old_log_probs.detach().to(dtype) - rollout_log_probs.detach().to(dtype), zero
    )
    log_w = diff if level == "token" else diff.sum(-1, keepdim=True).expand_as(diff)
    if mode == "truncate":
        weights = torch.where(keep, log_w.clamp(max=math.log(cap)).exp(), zero)
    else:
        weights = torch.where(keep & (log_w <= math.log(cap)), log_w.clamp(max=math.log(cap)).exp(), zero)
    metrics = {
        "logprob_abs_diff": diff.abs(),
        "is_ratio": torch.where(keep, log_w.clamp(max=_LOG_RATIO_CLAMP).exp(), zero),
        "is_capped": _flag(log_w > math.log(cap), keep, dtype),
    }
    return weights, metrics


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


class PolicyLoss(NamedTuple):
    """A policy loss and what it needs, read by the loop instead of branching on names.

    - ``needs_old_log_probs``: the loop must compute π_old log-probs (a ratio is formed).
    - ``sequence_level``: the ratio and the clip are per response (GSPO), so
      ``seq_mean_token_mean`` aggregation reproduces the paper's objective.
    - ``hyperparameters``: the keyword arguments ``fn`` takes from the config.
    """

    name: str
    fn: Callable[..., tuple[torch.Tensor, Metrics]]
    needs_old_log_probs: bool
    sequence_level: bool
    hyperparameters: tuple[str, ...]


POLICY_LOSSES: dict[str, PolicyLoss] = {
    loss.name: loss
    for loss in (
        PolicyLoss("pg", policy_gradient_loss, False, False, ()),
        PolicyLoss("ppo_clip", ppo_clip_loss, True, False, ("clip_eps", "clip_eps_high", "dual_clip")),
        PolicyLoss("gspo", gspo_loss, True, True, ("clip_eps", "clip_eps_high")),
        PolicyLoss("cispo", cispo_loss, True, False, ("clip_eps", "clip_eps_high")),
    )
}


def get_policy_loss(name: str) -> PolicyLoss:
    """The registry entry for ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; valid losses: {sorted(POLICY_LOSSES)}") from None
