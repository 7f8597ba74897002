"""KL(π_θ ‖ π_ref): single-sample estimators and the exact full-vocabulary value.

Convention (Schulman 2020, as in reference note 001 §9.4): the tokens were sampled from the
current policy π_θ, and

    r = π_ref(a) / π_θ(a),     log r = log π_ref(a) − log π_θ(a)

    k1 = −log r                       unbiased, signed, high variance
    k2 = ½ (log r)²                   ≥ 0, biased (second-order accurate near r = 1)
    k3 = (r − 1) − log r              ≥ 0 and unbiased: E_{a~π_θ}[r − 1] = 0, so the (r − 1)
                                      term is a zero-mean control variate that lowers variance

All three estimate KL(π_θ ‖ π_ref) = E_{a~π_θ}[log π_θ(a) − log π_ref(a)] (the "reverse" KL
from the policy's point of view) and are 0 when π_θ = π_ref. Note the direction of ``r``: some
code bases write k3 with π_θ/π_ref instead, which estimates the other KL.

Shape legend: ``(B, T)`` per-token log-probs of the sampled tokens; ``V`` vocabulary size.
Estimators are elementwise and return float32 ``(B, T)``; masking and aggregation are the
caller's job (:func:`posttrain.ops.aggregate_loss`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .logprobs import _compute_dtype, _log_probs, _resolve_chunk, _row_ranges, _rows


def _log_ratio(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """log r = log π_ref − log π_θ in fp32 (fp64 stays fp64), optionally clamped to ±clamp."""
    dtype = _compute_dtype(log_probs.dtype, ref_log_probs.dtype)
    log_r = ref_log_probs.to(dtype) - log_probs.to(dtype)
    return log_r if clamp is None else log_r.clamp(-clamp, clamp)


def kl_k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, clamp: float | None = None) -> torch.Tensor:
    """k1 = −log r = log π_θ − log π_ref.   ``(B, T), (B, T) -> (B, T)``.

    Unbiased for KL(π_θ ‖ π_ref) under samples from π_θ, but can be negative per token. Its
    gradient w.r.t. log π_θ is 1 (the "in-reward" estimator of PPO/InstructGPT).
    ``clamp`` bounds ``log r`` to ``[−clamp, clamp]`` before use.
    """
    return -_log_ratio(log_probs, ref_log_probs, clamp)


def kl_k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, clamp: float | None = None) -> torch.Tensor:
    """k2 = ½ (log r)².   ``(B, T), (B, T) -> (B, T)``.

    Non-negative and biased (it matches KL only to second order in ``r − 1``); as a loss its
    gradient is ``(log π_θ − log π_ref) ∇log π_θ``. ``clamp`` bounds ``log r`` first.
    """
    log_r = _log_ratio(log_probs, ref_log_probs, clamp)
    return 0.5 * log_r * log_r


K3_MAX_LOG_RATIO = 20.0


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, clamp: float | None = None) -> torch.Tensor:
    """k3 = (r − 1) − log r,  r = π_ref / π_θ.   ``(B, T), (B, T) -> (B, T)``.

    Non-negative (since ``e^x ≥ 1 + x``) and unbiased for KL(π_θ ‖ π_ref) under samples from
    π_θ, with lower variance than k1 when π_θ is close to π_ref. This is the in-loss estimator
    of GRPO / DeepSeekMath. Computed as ``expm1(log r) − log r`` in fp32, which keeps precision
    for tiny ``log r``. ``clamp`` bounds ``log r`` to ``[−clamp, clamp]`` first.

    Overflow guard, always on: ``log r`` is capped at ``K3_MAX_LOG_RATIO = 20`` (the bound
    verl uses). A token the policy gives e^20 ≈ 4.9e8 times less probability than the reference
    would otherwise overflow ``exp`` at log r > 88.7 (inf loss, NaN gradient); above the cap its
    k3 is the value at 20 (≈ 4.9e8) and its gradient 0. Only the upper side is capped: for
    log r < 0, k3 grows linearly (≈ −log r − 1) and cannot overflow, so its value and gradient
    stay exact (verl also clamps that side, at −20, and the result to ±10).
    """
    log_r = _log_ratio(log_probs, ref_log_probs, clamp).clamp(max=K3_MAX_LOG_RATIO)
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    estimator: str = "k3",
    clamp: float | None = None,
) -> torch.Tensor:
    """Per-token KL estimate by name: ``KL_ESTIMATORS[estimator](log_probs, ref_log_probs, clamp)``.

    Shapes ``(B, T), (B, T) -> (B, T)``; ``log_probs`` are log π_θ of the sampled tokens,
    ``ref_log_probs`` log π_ref of the same tokens. Unknown names raise ``ValueError``.
    """
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; valid estimators: {sorted(KL_ESTIMATORS)}"
        ) from None
    return fn(log_probs, ref_log_probs, clamp=clamp)


# ---- exact KL over the full vocabulary ------------------------------------------------------


class _ExactKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, chunk_size):
        dtype = _compute_dtype(logits.dtype, ref_logits.dtype)
        num_rows = logits.numel() // logits.shape[-1]
        lse = torch.empty(num_rows, dtype=dtype, device=logits.device)
        ref_lse = torch.empty_like(lse)
        kl = torch.empty_like(lse)
        for s, e in _row_ranges(num_rows, chunk_size):
            z = _rows(logits, s, e).to(dtype)
            zr = _rows(ref_logits, s, e).to(dtype)
            lse[s:e] = torch.logsumexp(z, dim=-1)
            ref_lse[s:e] = torch.logsumexp(zr, dim=-1)
            log_p, log_q = _log_probs(z, lse[s:e]), _log_probs(zr, ref_lse[s:e])
            p = log_p.exp()
            kl[s:e] = log_p.sub_(log_q).mul_(p).sum(-1)
        ctx.save_for_backward(logits, ref_logits, lse, ref_lse, kl)
        ctx.chunk_size = chunk_size
        return kl.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        logits, ref_logits, lse, ref_lse, kl = ctx.saved_tensors
        need_z, need_ref = ctx.needs_input_grad[:2]
        g = grad_out.reshape(-1).to(lse.dtype)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if need_z else None
        grad_ref = (
            torch.empty(ref_logits.shape, dtype=ref_logits.dtype, device=ref_logits.device)
            if need_ref
            else None
        )
        V = logits.shape[-1]
        for s, e in _row_ranges(lse.numel(), ctx.chunk_size):
            log_p = _log_probs(_rows(logits, s, e).to(lse.dtype), lse[s:e])
            log_q = _log_probs(_rows(ref_logits, s, e).to(lse.dtype), ref_lse[s:e])
            p = log_p.exp()
            g_c = g[s:e, None]
            if need_ref:  # dKL/dz_ref = q − p
                grad_ref.view(-1, V)[s:e] = (log_q.exp() - p) * g_c
            if need_z:  # dKL/dz = p ⊙ (log p − log q − KL)   (in place in log_p's buffer)
                grad.view(-1, V)[s:e] = log_p.sub_(log_q).sub_(kl[s:e, None]).mul_(p).mul_(g_c)
        return grad, grad_ref, None


def exact_kl(
    logits: torch.Tensor, ref_logits: torch.Tensor, *, chunk_size: int | None = None
) -> torch.Tensor:
    """Exact per-position KL(π_θ ‖ π_ref) summed over the whole vocabulary.

    Shapes: ``logits``, ``ref_logits`` ``(B, T, V)`` (or ``(..., V)``, any float dtypes)
    -> ``(B, T)`` float32.

        KL = Σ_v p_θ(v) (log p_θ(v) − log p_ref(v)),   p = softmax(logits), p_ref = softmax(ref)

    ≥ 0, and 0 exactly when the two rows define the same distribution. Differentiable w.r.t.
    both inputs (custom autograd Function):

        dKL/dz     = p_θ ⊙ (log p_θ − log p_ref − KL)
        dKL/dz_ref = p_ref − p_θ

    Memory: rows are processed ``chunk_size`` at a time in fp32. Only the inputs and three
    floats per row are kept for backward, which recomputes both softmaxes per chunk; the
    returned gradients are the only ``(N, V)`` allocations (in the inputs' dtypes). Plain
    autograd over chunks would instead keep several ``(N, V)`` fp32 tensors alive.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} must match"
        )
    return _ExactKL.apply(logits, ref_logits, _resolve_chunk(chunk_size, logits.shape[-1]))
