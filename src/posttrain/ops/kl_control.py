"""KL in the reward (InstructGPT style) and the KL coefficient controllers.

Shape legend: ``B`` rows (responses), ``T`` response token positions.

Placing the KL *in the reward* (reference note 001 §9.4, "Style A") turns the per-token
estimate ``k1_t = log π_θ(a_t) − log π_ref(a_t)`` into a per-token reward ``−β k1_t`` and adds
the sequence score at the response's last token; an advantage estimator (GAE with a critic)
then spreads it over the tokens. The controllers decide β: fixed, or adapted toward a target
KL (Ziegler et al. 2019, arXiv:1909.08593). They are plain Python objects with a JSON-able
``state_dict`` so a resumed run continues with the same β.
"""

from __future__ import annotations

import math

import torch


def kl_penalized_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta
) -> torch.Tensor:
    """Per-token rewards with the KL penalty folded in.   ``(B,), (B, T), (B, T) -> (B, T)``.

        reward[i, t] = −β · kl[i, t]                    on every kept token t of row i
        reward[i, T_i] += scores[i]                     T_i = the last kept position of row i
        reward[i, t] = 0                                on masked positions

    ``kl`` is a per-token KL estimate (normally ``ops.kl_k1``, the estimator whose gradient is
    principled in the reward); it is detached: rewards are constants. ``beta`` is a float
    (e.g. a controller's ``value``) or a scalar tensor. A row with an empty mask gets all
    zeros (its score is dropped). Masked positions of ``kl`` may hold anything (NaN
    included). Ouyang et al. 2022 (InstructGPT); Stiennon et al. 2020.
    """
    if kl.dim() != 2 or mask.shape != kl.shape:
        raise ValueError(
            f"kl and mask must both have shape (B, T), got {tuple(kl.shape)} and {tuple(mask.shape)}"
        )
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores must have shape ({kl.shape[0]},), got {tuple(scores.shape)}")
    dtype = torch.promote_types(torch.promote_types(kl.dtype, scores.dtype), torch.float32)
    keep = mask != 0
    zero = torch.zeros((), dtype=dtype, device=kl.device)
    rewards = torch.where(keep, -beta * kl.detach().to(dtype), zero)
    T = kl.shape[1]
    positions = torch.arange(1, T + 1, device=kl.device).expand_as(keep)
    # 1-based position of each row's last kept token (0 for a row without any)
    last = torch.where(keep, positions, torch.zeros_like(positions)).amax(-1, keepdim=True)
    at_last = (positions == last) & keep
    score = scores.detach().to(dtype)[:, None].expand_as(rewards)
    return torch.where(at_last, rewards + score, rewards)


def _check_number(name: str, value, *, positive: bool = True) -> float:
    value = float(value)
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


class FixedKLController:
    """A constant KL coefficient β. ``update`` does nothing."""

    def __init__(self, kl_coef: float):
        self.value = _check_number("kl_coef", kl_coef, positive=False)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (the coefficient is fixed)."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = _check_number("value", state["value"], positive=False)

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value!r})"


class AdaptiveKLController:
    """Proportional control of β toward a target KL (Ziegler et al. 2019, §2.2).

    After each step with measured KL ``current_kl`` (per response, the same quantity as
    ``target``) over ``n_steps`` samples (or steps, in whichever unit ``horizon`` is given):

        e   = clip( current_kl / target − 1, −0.2, 0.2 )
        β  ← β · (1 + e · n_steps / horizon)

    A KL above target raises β, below target lowers it; the clip bounds one update's change
    to a factor in [1 − 0.2·n/H, 1 + 0.2·n/H] (so keep n ≪ H; n < 5H keeps β positive).
    Ziegler et al. count n in samples (H = 10000); ``current_kl`` is a Python number (calling
    ``float`` on a device tensor syncs; do it once per step, outside ``ops``).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = _check_number("init_kl_coef", init_kl_coef)
        self.target = _check_number("target", target)
        self.horizon = _check_number("horizon", horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl!r}")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps!r}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        """Restore β. ``target`` and ``horizon`` come from the config, not the checkpoint."""
        self.value = _check_number("value", state["value"])

    def __repr__(self) -> str:
        return (
            f"AdaptiveKLController(value={self.value!r}, target={self.target!r}, "
            f"horizon={self.horizon!r})"
        )
