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

Numerics: every term is finite for any finite logits, however far apart (the JSD mixture's
``log m`` is formed without an ``exp`` that can overflow), and ``-inf`` logits (masked vocabulary
entries, probability 0) contribute their limits: 0 where the weighting distribution is 0
(``0 · log 0 = 0``), ``+inf`` only where the KL truly is infinite (forward KL with
``p_S = 0 < p_T``, reverse KL with ``p_T = 0 < p_S``); the JSD is always finite
(≤ −β log β − (1 − β) log(1 − β)). Gradients are finite wherever the value is.

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


def _xlogy_rows(p: torch.Tensor, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Σ_v p·x over the entries where ``present`` (p > 0), 0 elsewhere, with no 0·inf in the value
    or in the gradient (``x`` may be ±inf where p = 0: it is replaced before the product)."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(present, p * torch.where(present, x, zero), zero).sum(-1)


def _divergence_rows(s_logits: torch.Tensor, t_logits: torch.Tensor, divergence: str, beta: float,
                     temperature: float) -> torch.Tensor:
    """(n, V), (n, V) -> (n,): the divergence of each row (see the module docstring), times τ²."""
    z_s, z_t = s_logits.float() / temperature, t_logits.float() / temperature
    lse_s = torch.logsumexp(z_s, dim=-1, keepdim=True)
    lse_t = torch.logsumexp(z_t, dim=-1, keepdim=True)
    log_ps, log_pt = z_s - lse_s, z_t - lse_t
    on_s, on_t = log_ps > -math.inf, log_pt > -math.inf   # entries with probability > 0
    both = on_s & on_t
    zero = torch.zeros((), dtype=z_s.dtype, device=z_s.device)
    # d = log p_S - log p_T where both are > 0, formed from the logit difference (not from two rounded
    # log-softmaxes); 0 elsewhere (where one side is 0 the terms below take their limits instead).
    # Its absolute error is that of lse_s - lse_t, ~1e-7 in float32, so divergences much below that
    # (nearly equal distributions) are not resolved relatively.
    d = torch.where(both, (z_s - z_t) - (lse_s - lse_t), zero)
    p_s, p_t = log_ps.exp(), log_pt.exp()
    if divergence == "forward_kl":
        # p_T > 0 = p_S gives +inf: the true value
        out = -_xlogy_rows(p_t, torch.where(on_s, d, -math.inf), on_t)
    elif divergence == "reverse_kl":
        out = _xlogy_rows(p_s, torch.where(on_t, d, math.inf), on_s)
    else:
        # a = log m - log p_T = log(beta + (1 - beta) e^d) and b = log p_S - log m = d - a, each written so
        # that no exp overflows and small |d| keeps its precision:
        #   d <= 0:  a = log1p((1 - beta) expm1(d)),        b = d - a
        #   d >  0:  a = d + log1p(beta expm1(-d)),         b = -log1p(beta expm1(-d))
        # (clamping the branch inputs keeps the unused branch finite, so its zero gradient stays 0)
        d_neg, d_pos = d.clamp(max=0.0), d.clamp(min=0.0)
        a_neg = torch.log1p((1 - beta) * torch.expm1(d_neg))
        c_pos = torch.log1p(beta * torch.expm1(-d_pos))
        up = d > 0
        a = torch.where(up, d_pos + c_pos, a_neg)
        b = torch.where(up, -c_pos, d_neg - a_neg)
        # one side 0: p_S = 0 gives m = beta p_T (a = log beta); p_T = 0 gives m = (1 - beta) p_S
        a = torch.where(both, a, math.log(beta))
        b = torch.where(both, b, -math.log1p(-beta))
        kl_t = -_xlogy_rows(p_t, a, on_t)
        kl_s = _xlogy_rows(p_s, b, on_s)
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
