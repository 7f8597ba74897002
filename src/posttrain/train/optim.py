"""Optimizer and learning-rate schedule: the standard SFT recipe (reference note 003).

* AdamW with betas (0.9, 0.95), eps 1e-8, decoupled weight decay 0.1 applied to weight
  matrices only; biases and normalization gains (every parameter with fewer than two
  dimensions) get no decay.
* Linear warmup then cosine decay to a floor, stepped once per optimizer step::

      t <  T_w:  lr_t = peak * (t + 1) / T_w
      t >= T_w:  lr_t = peak * (floor + (1 - floor) * 0.5 * (1 + cos(pi * (t - T_w) / (T - T_w))))

  With T=10, T_w=2, peak=2e-5, floor=0.1 this gives 1.0e-5, 2.0e-5, 1.44e-5 and 2.69e-6 at
  steps 0, 1, 5 and 9 (the note's worked values; tested).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and undecayed biases / norm gains.

    Only parameters with ``requires_grad`` are included; tied parameters appear once.
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` (or the model's own ``optimizer_groups(weight_decay)``,
    e.g. a policy and a critic with their own learning rates), with torch's fused kernel where
    it applies.

    The fused kernel is ~4x faster than torch's CPU default (a per-tensor loop) for the same
    math; devices or dtypes it does not support fall back to the default implementation.
    """
    if hasattr(model, "optimizer_groups"):
        groups = model.optimizer_groups(weight_decay)
    else:
        groups = parameter_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, min_lr_ratio: float
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine_factor`; call ``.step()`` once per optimizer step."""
    return LambdaLR(
        optimizer,
        lambda step: warmup_cosine_factor(step, total_steps, warmup_steps, min_lr_ratio),
    )
