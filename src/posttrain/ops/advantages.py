"""Advantage estimators of online RL: one registry, capabilities declared as data.

Shape legend: ``B`` rows (sampled responses), ``G`` the group size (responses per prompt),
``N = B / G`` prompts (groups), ``T`` response token positions.

Row order: the responses of a prompt are contiguous, so sample ``j`` of prompt ``i`` is row
``i * G + j`` and ``rewards.view(N, G)`` puts one prompt per row.

Validity: ``valid`` ``(B,)`` bool marks the rows whose reward exists (a reward function may
return None / NaN). An invalid row gets an advantage of exactly 0 and takes part in no
statistic (group mean and std, batch whitening, leave-one-out baselines). The rewards of
invalid rows may hold NaN or inf: every statistic selects with ``torch.where`` first, so
nothing non-finite reaches a valid row. A row is also treated as invalid when its reward
(or, for ReMax, its baseline) is not finite, whatever ``valid`` says; ``valid=None`` means
"every row with a finite reward".

Outcome (sequence-level) estimators share one signature and return ``(advantages (B,),
metrics)``::

    fn(rewards (B,), valid (B,) bool | None, *, group_size, baseline=None, **hyperparameters)

``baseline`` is used only by ReMax (``needs_baseline``); the others accept and ignore it, so
the training loop can call every outcome estimator the same way. The token-level estimators
(``token_level``) return ``(B, T)`` advantages: REINFORCE++ takes the same arguments plus the
per-token rewards (the KL penalty) and the response mask; GAE takes per-token rewards and
critic values instead (``needs_critic``).

============  ======  ======  ========  =====  =====================================================
name          groups  critic  baseline  token  advantage (valid rows)
============  ======  ======  ========  =====  =====================================================
grpo          yes     no      no        no     (r − mean_g) / (std_g + eps)   (or r − mean_g)
rloo          yes     no      no        no     r − mean of the other valid members of the group
remax         no      no      yes       no     r − r(greedy rollout of the same prompt)
reinforce_pp  no      no      no        yes    whiten_tokens(r − β Σ_{t'≥t} KL_t')   (or r − mean_g − ...)
gae           no      yes     no        yes    Σ_l (γλ)^l δ_{t+l},  δ_t = r_t + γ V_{t+1} − V_t
none          no      no      no        no     r   (raw reward: naive policy gradient)
============  ======  ======  ========  =====  =====================================================

Every advantage is a constant of the policy objective: outputs are detached.

Metrics (detached float scalars, summable over micro-batches and ranks):

- ``zero_variance_groups``: groups with at least two valid rewards, all equal. They carry no
  learning signal under any group-relative estimator (DAPO's dynamic sampling drops them).
- ``small_groups``: groups with fewer than two valid rewards (no group statistic exists).

KL in the reward for the critic-free outcome estimators: fold it into ``rewards`` before
calling (``r − β Σ_t k1_t`` per response); REINFORCE++ takes it per token (``token_rewards =
−β k1``, credited as KL-to-go); with a critic: :func:`posttrain.ops.kl_penalized_token_rewards`
+ :func:`gae_advantages`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .reductions import masked_whiten

Metrics = dict[str, torch.Tensor]

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _float_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    out = torch.float32
    for t in tensors:
        if t is not None and t.dtype.is_floating_point:
            out = torch.promote_types(out, t.dtype)
    return out


def _prepare(
    rewards: torch.Tensor, valid: torch.Tensor | None, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes; return (rewards with 0 at invalid rows, effective valid mask), both (B,)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (B,), got {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    B = rewards.shape[0]
    if B % group_size != 0:
        raise ValueError(
            f"the batch of {B} rewards is not a whole number of groups of group_size={group_size}"
        )
    r = rewards.detach().to(_float_dtype(rewards))
    finite = torch.isfinite(r)
    if valid is None:
        ok = finite
    else:
        if valid.shape != rewards.shape:
            raise ValueError(f"valid must have shape {tuple(rewards.shape)}, got {tuple(valid.shape)}")
        ok = valid.to(device=r.device, dtype=torch.bool) & finite
    return torch.where(ok, r, torch.zeros_like(r)), ok


def _group_stats(r: torch.Tensor, ok: torch.Tensor, group_size: int):
    """Per-group statistics over valid members, all (N,).

    Returns ``count``, ``mean`` (0 when empty), ``std`` (unbiased; 0 when count < 2) and
    ``flat`` (True when the valid rewards are all equal, i.e. max == min; True for empty or
    single-member groups too). ``r`` must already hold 0 at invalid rows.
    """
    rg, okg = r.view(-1, group_size), ok.view(-1, group_size)
    count = okg.sum(-1).to(r.dtype)
    total = rg.sum(-1)  # invalid rows hold 0
    mean = total / count.clamp(min=1.0)
    centered = torch.where(okg, rg - mean[:, None], torch.zeros_like(rg))
    ss = (centered * centered).sum(-1)
    var = torch.where(count >= 2, ss / (count - 1.0).clamp(min=1.0), torch.zeros_like(ss))
    std = var.sqrt()
    inf = torch.full_like(rg, float("inf"))
    hi = torch.where(okg, rg, -inf).amax(-1)
    lo = torch.where(okg, rg, inf).amin(-1)
    flat = ~(hi > lo)  # also True for empty groups (-inf > inf is False)
    return count, mean, std, flat


def _group_metrics(count: torch.Tensor, flat: torch.Tensor) -> Metrics:
    small = count < 2
    return {
        "zero_variance_groups": (flat & ~small).sum().to(count.dtype),
        "small_groups": small.sum().to(count.dtype),
    }


def _metrics_for(r: torch.Tensor, ok: torch.Tensor, group_size: int) -> Metrics:
    count, _, _, flat = _group_stats(r, ok, group_size)
    return _group_metrics(count, flat)


def _require_groups(name: str, group_size: int) -> None:
    if group_size < 2:
        raise ValueError(
            f"advantage estimator {name!r} needs group_size >= 2 (several responses per "
            f"prompt), got {group_size}"
        )


def _check_eps(eps: float) -> None:
    if not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


# --------------------------------------------------------------------------------------------
# outcome (sequence-level) estimators
# --------------------------------------------------------------------------------------------


def group_normalized_advantages(
    rewards: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    group_size: int,
    baseline: torch.Tensor | None = None,
    eps: float = 1e-6,
    normalize_by_std: bool = True,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO's group-relative advantage.   ``(B,), (B,) -> (B,)``.

    For the valid members of each group g (n_g of them):

        A_i = (r_i − mean_g) / (std_g + eps)        normalize_by_std=True   (GRPO)
        A_i =  r_i − mean_g                          normalize_by_std=False  (Dr. GRPO)

        mean_g = (1/n_g) Σ_j r_j,   std_g = sqrt( Σ_j (r_j − mean_g)² / (n_g − 1) )

    ``std_g`` is the *unbiased* (Bessel-corrected) standard deviation, as ``torch.std`` in
    TRL's and verl's GRPO. We follow them so that the same ``eps`` and rewards give the same
    advantages as those code bases; the population std would scale every advantage by
    sqrt(n/(n−1)) (≈ 1.41 for G = 2). It needs n_g ≥ 2.

    Degenerate groups give exactly 0 (never NaN): a group with fewer than two valid rewards,
    and a group whose valid rewards are all equal (without the explicit test, float rounding of
    the mean would leave ±1e-17 / eps ≈ 1e-11 instead of 0). ``eps`` only guards small nonzero
    stds; the default 1e-6 is verl's (TRL adds 1e-4).

    Shao et al. 2024 (DeepSeekMath, arXiv:2402.03300); Dr. GRPO: Liu et al. 2025
    (arXiv:2503.20783), which drops the std because it up-weights near-uniform groups.
    ``baseline`` is ignored.
    """
    del baseline
    _require_groups("grpo", group_size)
    _check_eps(eps)
    r, ok = _prepare(rewards, valid, group_size)
    count, mean, std, flat = _group_stats(r, ok, group_size)
    rg = r.view(-1, group_size)
    adv = rg - mean[:, None]
    if normalize_by_std:
        adv = adv / (std[:, None] + eps)
    live = (ok.view(-1, group_size) & ~flat[:, None]) & (count >= 2)[:, None]
    adv = torch.where(live, adv, torch.zeros_like(adv)).view(-1)
    return adv, _group_metrics(count, flat)


def rloo_advantages(
    rewards: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    group_size: int,
    baseline: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """REINFORCE leave-one-out.   ``(B,), (B,) -> (B,)``.

        A_i = r_i − (1/(n_g − 1)) Σ_{j≠i, j valid} r_j   =   n_g/(n_g − 1) · (r_i − mean_g)

    The baseline of sample i does not depend on sample i, so the policy gradient stays
    unbiased. Groups with fewer than two valid rewards, and groups whose valid rewards are all
    equal, give exactly 0. Ahmadian et al. 2024 (arXiv:2402.14740); Kool et al. 2019.
    ``baseline`` is ignored.
    """
    del baseline
    _require_groups("rloo", group_size)
    r, ok = _prepare(rewards, valid, group_size)
    count, _, _, flat = _group_stats(r, ok, group_size)
    rg = r.view(-1, group_size)
    total = rg.sum(-1, keepdim=True)
    others = (count - 1.0).clamp(min=1.0)[:, None]
    adv = rg - (total - rg) / others
    live = (ok.view(-1, group_size) & ~flat[:, None]) & (count >= 2)[:, None]
    adv = torch.where(live, adv, torch.zeros_like(adv)).view(-1)
    return adv, _group_metrics(count, flat)


def remax_advantages(
    rewards: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    group_size: int,
    baseline: torch.Tensor,
) -> tuple[torch.Tensor, Metrics]:
    """ReMax: the reward of a greedy rollout as the baseline.   ``(B,), (B,) -> (B,)``.

        A_i = r_i − b_i,    b_i = r(x, greedy decode of x) for row i's prompt x

    ``baseline`` is ``(B,)`` (one value per row, repeated within a group) or ``(N,)`` (one per
    prompt, expanded over its ``group_size`` rows when ``group_size > 1``). A row whose
    baseline is not finite (the greedy reward was None / NaN) is treated as invalid:
    advantage 0. Li et al. 2024 (arXiv:2310.10505). Works with any ``group_size >= 1``.
    """
    if baseline is None:
        raise ValueError("advantage estimator 'remax' needs baseline (the greedy rollout's reward)")
    r, ok = _prepare(rewards, valid, group_size)
    B = r.shape[0]
    b = baseline.detach().to(device=r.device, dtype=_float_dtype(r, baseline))
    if b.dim() == 1 and b.shape[0] == B // group_size and group_size > 1:
        b = b.repeat_interleave(group_size)
    if b.shape != r.shape:
        raise ValueError(
            f"baseline must have shape ({B},) or ({B // group_size},), got {tuple(baseline.shape)}"
        )
    ok = ok & torch.isfinite(b)
    r = torch.where(ok, r.to(b.dtype), torch.zeros_like(b))
    adv = torch.where(ok, r - b, torch.zeros_like(b))
    return adv, _metrics_for(r, ok, group_size)


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    group_size: int,
    baseline: torch.Tensor | None = None,
    token_rewards: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    subtract_group_mean: bool = False,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, Metrics]:
    """REINFORCE++ as published (Hu 2025, arXiv:2501.03262).   ``(B,), (B,), (B, T), (B, T) -> (B, T)``.

    Each token gets its own advantage: the return-to-go (γ = 1) of per-token rewards, the
    outcome reward at the response's last kept token plus ``token_rewards`` at every token
    (the KL penalty ``−β · KL_t`` with ``KL_t = log π_old(a_t) − log π_ref(a_t)``, and any other
    per-token shaping such as process rewards), then whitened over all kept tokens of the batch::

        x_i   = r_i                    (REINFORCE++)
        x_i   = r_i − mean_g           (REINFORCE++-baseline, ``subtract_group_mean=True``)
        G_it  = x_i + Σ_{t' ≥ t} u_it'        u = token_rewards   (with the KL only: x_i − β Σ_{t'≥t} KL_it')
        A_it  = (G_it − μ) / sqrt(σ² + eps),  μ, σ² = mean and population variance of G over the kept
                                              tokens (``mask``) of the valid rows (``ops.masked_whiten``)

    So a token is credited with the KL of the tokens *after* it (KL-to-go), and a longer
    response weighs more in the batch statistics than a shorter one (they are taken over
    tokens, not responses). Normalizing by batch rather than group statistics keeps the
    gradient's scale without up-weighting low-variance prompts. Masked positions and invalid
    rows give exactly 0; if the kept ``G`` are all equal every advantage is exactly 0. The
    ``subtract_group_mean`` variant needs ``group_size >= 2``.

    Without ``mask`` (and ``token_rewards``) each row is one token: the result is ``(B,)``, the
    rewards whitened over the valid rows (the same estimator for one-token responses).
    ``baseline`` is ignored.
    """
    del baseline
    _check_eps(eps)
    if subtract_group_mean:
        _require_groups("reinforce_pp (subtract_group_mean)", group_size)
    r, ok = _prepare(rewards, valid, group_size)
    count, mean, _, flat = _group_stats(r, ok, group_size)
    x = r
    if subtract_group_mean:
        x = (r.view(-1, group_size) - mean[:, None]).view(-1)
        x = torch.where(ok, x, torch.zeros_like(x))
    one_token = mask is None
    if one_token:
        if token_rewards is not None:
            raise ValueError("reinforce_pp: token_rewards need the (B, T) mask of the response tokens")
        keep = ok[:, None]
        returns = x[:, None]
    else:
        if mask.dim() != 2 or mask.shape[0] != r.shape[0]:
            raise ValueError(f"mask must have shape ({r.shape[0]}, T), got {tuple(mask.shape)}")
        keep = (mask != 0) & ok[:, None]
        returns = x[:, None].expand(mask.shape)
        if token_rewards is not None:
            if token_rewards.shape != mask.shape:
                raise ValueError(f"token_rewards must have shape {tuple(mask.shape)}, got "
                                 f"{tuple(token_rewards.shape)}")
            u = torch.where(keep, token_rewards.detach().to(x.dtype), torch.zeros((), dtype=x.dtype))
            to_go = u.flip(-1).cumsum(-1).flip(-1)   # Σ_{t' >= t} u_t' (masked positions add 0)
            returns = returns + to_go
    if keep.numel() == 0:
        return returns.new_zeros(keep.shape).squeeze(-1) if one_token else returns.new_zeros(keep.shape), \
            _group_metrics(count, flat)
    keepf = keep.to(x.dtype)
    adv = masked_whiten(returns, keepf, shift_mean=True, eps=eps)
    inf = torch.full_like(returns, float("inf"))
    batch_flat = ~(torch.where(keep, returns, -inf).amax() > torch.where(keep, returns, inf).amin())
    adv = torch.where(keep & ~batch_flat, adv, torch.zeros_like(adv))
    return (adv.squeeze(-1) if one_token else adv), _group_metrics(count, flat)


def raw_advantages(
    rewards: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    group_size: int,
    baseline: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """No baseline: the advantage is the raw reward (naive REINFORCE).   ``(B,) -> (B,)``.

        A_i = r_i  (valid rows),  0  (invalid rows)

    Unbiased but high-variance (Williams 1992). ``baseline`` is ignored.
    """
    del baseline
    r, ok = _prepare(rewards, valid, group_size)
    return r, _metrics_for(r, ok, group_size)


# --------------------------------------------------------------------------------------------
# token-level: GAE
# --------------------------------------------------------------------------------------------


def gae_advantages(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation.   ``(B, T), (B, T), (B, T) -> (B, T), (B, T)``.

    ``token_rewards[b, t]`` is the reward of the action at response position t (typically
    ``−β·k1_t`` everywhere plus the score at the last token, see
    :func:`posttrain.ops.kl_penalized_token_rewards`); ``values[b, t] = V(s_t)`` the critic's
    value of the state before that action. Backward recurrence over the kept positions:

        δ_t = r_t + γ V_{t+1} − V_t
        A_t = δ_t + γ λ A_{t+1}
        R_t = A_t + V_t                     (returns: the value targets)

    with ``V_{t+1} = 0`` and ``A_{t+1} = 0`` after the last kept token (the episode ends
    there). Masked positions are skipped, not treated as boundaries: the recurrence links each
    kept token to the *next kept* token of its row, so right padding ends the episode and a
    masked hole in the middle (e.g. tool output) is stepped over. Masked positions return 0 in
    both outputs, whatever ``values``/``token_rewards`` hold there (NaN included).

    ``whiten=True`` whitens the advantages over all kept tokens of the batch
    (``ops.masked_whiten``, population variance) *after* the returns are formed, so the value
    targets stay unwhitened. γ = 1, λ = 0.95 are the usual LLM-RLHF choices (episodes are
    short); λ = 1 gives the Monte-Carlo return minus V, λ = 0 the one-step TD error.

    Schulman et al. 2016 (arXiv:1506.02438); Ouyang et al. 2022 (InstructGPT). The loop over T
    is sequential (each step depends on the next) but vectorized over rows.
    """
    if token_rewards.shape != values.shape or token_rewards.dim() != 2:
        raise ValueError(
            f"token_rewards {tuple(token_rewards.shape)} and values {tuple(values.shape)} must "
            f"both have shape (B, T)"
        )
    if mask.shape != values.shape:
        raise ValueError(f"mask must have shape {tuple(values.shape)}, got {tuple(mask.shape)}")
    for name, v in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {v!r}")
    dtype = _float_dtype(token_rewards, values)
    keep = mask != 0
    zero = torch.zeros((), dtype=dtype, device=values.device)
    r = torch.where(keep, token_rewards.detach().to(dtype), zero)
    v = torch.where(keep, values.detach().to(dtype), zero)
    B, T = v.shape
    adv = torch.zeros_like(v)
    next_value = torch.zeros(B, dtype=dtype, device=v.device)
    next_adv = torch.zeros(B, dtype=dtype, device=v.device)
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = delta + gamma * lam * next_adv
        k = keep[:, t]
        adv[:, t] = torch.where(k, a_t, zero)
        next_value = torch.where(k, v[:, t], next_value)
        next_adv = torch.where(k, a_t, next_adv)
    returns = torch.where(keep, adv + v, zero)
    if whiten:
        adv = masked_whiten(adv, keep.to(dtype))
    return adv, returns


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


class AdvantageEstimator(NamedTuple):
    """An advantage estimator and what it needs, read by the loop instead of branching on names.

    - ``needs_groups``: needs several responses per prompt (``group_size >= 2``).
    - ``needs_critic``: needs a value model (per-token values).
    - ``needs_baseline``: needs the reward of a greedy rollout of each prompt (ReMax).
    - ``token_level``: the advantages are per token, ``(B, T)``: with ``needs_critic``, ``fn`` is
      :func:`gae_advantages` (per-token rewards and values in, advantages and returns out);
      without, the outcome signature plus ``token_rewards=`` and ``mask=`` (REINFORCE++).
      Otherwise the outcome signature, ``(B,)`` out.
    - ``hyperparameters``: the keyword arguments ``fn`` takes from the config.
    """

    name: str
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | Metrics]]
    needs_groups: bool
    needs_critic: bool
    needs_baseline: bool
    token_level: bool
    hyperparameters: tuple[str, ...]


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    est.name: est
    for est in (
        AdvantageEstimator(
            "grpo", group_normalized_advantages, True, False, False, False, ("eps", "normalize_by_std")
        ),
        AdvantageEstimator("rloo", rloo_advantages, True, False, False, False, ()),
        AdvantageEstimator("remax", remax_advantages, False, False, True, False, ()),
        AdvantageEstimator(
            "reinforce_pp",
            reinforce_pp_advantages,
            False,
            False,
            False,
            True,
            ("subtract_group_mean", "eps"),
        ),
        AdvantageEstimator("gae", gae_advantages, False, True, False, True, ("gamma", "lam", "whiten")),
        AdvantageEstimator("none", raw_advantages, False, False, False, False, ()),
    )
}


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The registry entry for ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid estimators: {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
