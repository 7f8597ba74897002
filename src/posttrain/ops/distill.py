"""Token-level distillation divergences between a student's and a teacher's next-token
distributions, computed in chunks of rows.

Shape legend: ``B`` rows, ``T`` positions, ``V`` vocabulary; ``N = B·T`` flattened positions.

With ``p_S = softmax(z_S / τ)`` (student, trained) and ``p_T = softmax(z_T / τ)`` (teacher,
constant), per position:

==============  ======================================================================
``forward_kl``  KL(p_T ‖ p_S) = Σ_v p_T (log p_T − log p_S)   (mode covering; classic KD)
``reverse_kl``  KL(p_S ‖ p_T) = Σ_v p_S (log p_S − log p_T)   (mode seeking; on-policy KD)
``jsd``         β KL(p_T ‖ m) + (1 − β) KL(p_S ‖ m),  m = β p_T + (1 − β) p_S
                (the generalized JSD of GKD, Agarwal et al. 2024; β = 0.5 is the usual JSD;
                it tends to 0 at both ends of β, so use forward_kl / reverse_kl for those)
==============  ======================================================================

and the result is multiplied by τ² (Hinton et al. 2015: keeps the gradient's scale as τ
changes). All math in float32. Positions with ``mask == 0`` give 0.

Memory: the rows are processed ``chunk_size`` at a time under activation checkpointing, so
the ``(N, V)`` fp32 softmaxes and log-softmaxes of student and teacher never exist whole; only
one chunk's do, in the forward and again in the backward (recomputed). The inputs (the logits)
are the caller's. ``chunk_size=None`` takes the rows from the same byte budget as the log-prob
ops (:func:`posttrain.ops.logprobs.default_chunk_rows`).
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .logprobs import _resolve_chunk

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _divergence_rows(s_logits: torch.Tensor, t_logits: torch.Tensor, divergence: str, beta: float,
                     temperature: float) -> torch.Tensor:
    """(n, V), (n, V) -> (n,): the divergence of each row (see the module docstring), times τ²."""
    z_s, z_t = s_logits.float() / temperature, t_logits.float() / temperature
    lse_s = torch.logsumexp(z_s, dim=-1, keepdim=True)
    lse_t = torch.logsumexp(z_t, dim=-1, keepdim=True)
    # d = log p_S - log p_T, formed from the logit difference (not from two rounded log-softmaxes), so
    # small divergences keep their relative precision in float32
    d = (z_s - z_t) - (lse_s - lse_t)
    if divergence == "forward_kl":
        out = -(torch.exp(z_t - lse_t) * d).sum(-1)
    elif divergence == "reverse_kl":
        out = (torch.exp(z_s - lse_s) * d).sum(-1)
    else:
        # a = log m - log p_T = log(beta + (1 - beta) e^d), accurate for small d
        a = torch.log1p((1 - beta) * torch.expm1(d))
        kl_t = -(torch.exp(z_t - lse_t) * a).sum(-1)
        kl_s = (torch.exp(z_s - lse_s) * (d - a)).sum(-1)
        out = beta * kl_t + (1 - beta) * kl_s
    return out * temperature**2


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-position distillation divergence.   ``(..., V), (..., V), (...) -> (...)`` float32.

    ``teacher_logits`` are treated as constants (detached). Differentiable in
    ``student_logits``. See the module docstring for the formulas and the memory behaviour.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {list(DIVERGENCES)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the two models must share the vocabulary")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if divergence == "jsd" and not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta!r} (beta 0 / 1 would be identically 0: use "
                         "forward_kl or reverse_kl)")
    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V)
    t = teacher_logits.detach().reshape(-1, V)
    n = s.shape[0]
    rows = _resolve_chunk(chunk_size, V)
    parts = []
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        if s.requires_grad and torch.is_grad_enabled():
            parts.append(checkpoint(_divergence_rows, s[start:stop], t[start:stop], divergence, beta, temperature,
                                    use_reentrant=False))
        else:
            parts.append(_divergence_rows(s[start:stop], t[start:stop], divergence, beta, temperature))
    out = torch.cat(parts) if parts else s.new_zeros(0, dtype=torch.float32)
    out = out.reshape(lead)
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(f"mask must have shape {tuple(lead)}, got {tuple(mask.shape)}")
        out = torch.where(mask != 0, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out
