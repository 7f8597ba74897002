"""Masked reductions and the one loss-aggregation function.

Shape legend: ``B`` rows (sequences), ``T`` token positions. ``mask`` has the shape of the
tensor it masks (or broadcasts to it); 1 keeps an element, 0 drops it. Masks are normally
0/1 but may hold non-negative weights.

Masked-out elements never leak into a result, even if they hold ``inf`` or ``NaN`` (padding
positions often do): every reduction selects with ``torch.where`` before summing, so both
the value and the gradient at a dropped position are exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Dim = int | tuple[int, ...] | None


def _apply_mask(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tensor * mask, with exact zeros (no NaN from ``inf * 0``) where mask == 0."""
    mask = mask.to(tensor.dtype)
    return torch.where(mask != 0, tensor * mask, torch.zeros((), dtype=tensor.dtype, device=tensor.device))


def _safe_div(numerator: torch.Tensor, denominator) -> torch.Tensor:
    """numerator / denominator, and 0 wherever denominator == 0 (never NaN, gradient 0 there)."""
    denominator = torch.as_tensor(denominator, dtype=numerator.dtype, device=numerator.device)
    nonzero = denominator != 0
    ratio = numerator / torch.where(nonzero, denominator, torch.ones_like(denominator))
    return torch.where(nonzero, ratio, torch.zeros_like(ratio))


def masked_sum(tensor: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Sum of ``tensor * mask``.

    Shapes: ``tensor`` ``(B, T)`` (any shape), ``mask`` broadcastable to it. ``dim=None`` sums all
    elements to a scalar; an int or tuple sums over those dims (others are kept, as ``Tensor.sum``).

        S = Σ_{i in dim} x_i m_i
    """
    masked = _apply_mask(tensor, mask)
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Mean of ``tensor`` over the elements where ``mask`` is set.

    Shapes as in :func:`masked_sum`.

        mean = Σ x_i m_i / Σ m_i

    Where the mask count ``Σ m_i`` is 0 (an all-padding row, an empty batch) the result is
    **0**, not NaN, and its gradient is 0. Callers that must tell "empty" from "mean 0" should
    look at ``mask.sum(dim)`` themselves.
    """
    shape = torch.broadcast_shapes(tensor.shape, mask.shape)
    count = torch.broadcast_to(mask.to(tensor.dtype), shape)
    count = count.sum() if dim is None else count.sum(dim)
    return _safe_div(masked_sum(tensor, mask, dim), count)


def masked_normalize(
    tensor: torch.Tensor, mask: torch.Tensor, normalize_constant: float, dim: Dim = None
) -> torch.Tensor:
    """Masked sum divided by a fixed constant (not by the mask count).

    Shapes as in :func:`masked_sum`.

        out = Σ x_i m_i / C

    A constant denominator makes every kept element's gradient ``m_i / C`` independent of how
    many elements are kept (the Dr. GRPO idea; see :func:`aggregate_loss`).
    """
    return masked_sum(tensor, mask, dim) / normalize_constant


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalize ``values`` to zero mean and unit variance over the masked-in elements.

    Shapes: ``values`` ``(B, T)`` (any shape), ``mask`` broadcastable to it. Statistics are taken
    over all masked-in elements together (one mean, one variance for the whole tensor).

        μ = masked_mean(x),  σ² = masked_mean((x − μ)²)
        out = (x − μ) / sqrt(σ² + eps)          if shift_mean
        out = (x − μ) / sqrt(σ² + eps) + μ      otherwise (rescale only, keep the mean)

    Simplifications / conventions: σ² is the population variance (divide by the count, no
    Bessel correction; TRL and verl use the unbiased one, which differs by n/(n−1) and is
    undefined for a single element). Masked-out positions are returned as 0. An empty mask
    gives all zeros.
    """
    mean = masked_mean(values, mask)
    centered = values - mean
    var = masked_mean(centered * centered, mask)
    whitened = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _apply_mask(whitened, (mask != 0).to(values.dtype))


# --------------------------------------------------------------------------------------------
# Loss aggregation
# --------------------------------------------------------------------------------------------


def _local_num_tokens(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum()


def _local_num_sequences(mask: torch.Tensor) -> torch.Tensor:
    return (mask.sum(-1) != 0).sum()


def _token_mean(loss, mask, *, num_tokens=None, num_sequences=None, normalize_constant=None):
    n_tok = _local_num_tokens(mask) if num_tokens is None else num_tokens
    return _safe_div(masked_sum(loss, mask), n_tok)


def _seq_mean_token_mean(loss, mask, *, num_tokens=None, num_sequences=None, normalize_constant=None):
    per_row = masked_mean(loss, mask, dim=-1)  # rows with no tokens give 0
    n_seq = _local_num_sequences(mask) if num_sequences is None else num_sequences
    return _safe_div(per_row.sum(), n_seq)


def _seq_mean_token_sum(loss, mask, *, num_tokens=None, num_sequences=None, normalize_constant=None):
    n_seq = _local_num_sequences(mask) if num_sequences is None else num_sequences
    return _safe_div(masked_sum(loss, mask), n_seq)


def _seq_mean_token_sum_norm(
    loss, mask, *, num_tokens=None, num_sequences=None, normalize_constant=None
):
    if normalize_constant is None:
        raise ValueError(
            "loss aggregation 'seq_mean_token_sum_norm' needs normalize_constant "
            "(e.g. the maximum generation length)"
        )
    n_seq = _local_num_sequences(mask) if num_sequences is None else num_sequences
    n_seq = torch.as_tensor(n_seq, dtype=loss.dtype, device=loss.device)
    return _safe_div(masked_sum(loss, mask), normalize_constant * n_seq)


LOSS_AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum": _seq_mean_token_sum,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_mean",
    *,
    num_tokens=None,
    num_sequences=None,
    normalize_constant: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``(B, T)`` with mask ``(B, T)`` to a scalar.

    With ``l`` the loss, ``m`` the mask, ``n_i = Σ_t m_it`` the kept tokens of row ``i``:

    ============================  ===========================================================
    ``token_mean``                Σ_{i,t} l·m / N_tok
    ``seq_mean_token_mean``       Σ_i (Σ_t l·m / n_i) / N_seq    (rows with n_i = 0 give 0)
    ``seq_mean_token_sum``        Σ_{i,t} l·m / N_seq
    ``seq_mean_token_sum_norm``   Σ_{i,t} l·m / (C · N_seq)      (Dr. GRPO; C required)
    ============================  ===========================================================

    ``token_mean`` weights every token equally (DAPO); ``seq_mean_token_mean`` weights every
    sequence equally, so a token of a short answer weighs more (original GRPO);
    ``seq_mean_token_sum_norm`` replaces the length n_i by a constant C (e.g. the maximum
    generation length), so each token's gradient ``1 / (C · N_seq)`` does not depend on the
    length of its response (Dr. GRPO).

    Global counts and gradient accumulation. ``num_tokens`` (N_tok) and ``num_sequences``
    (N_seq) should be the counts over the *whole optimizer step*: all micro-batches, and all
    data-parallel ranks. Every mode is then a sum of per-row terms over one shared constant
    denominator, so splitting the rows into micro-batches and summing (accumulating) the
    per-micro-batch losses gives exactly the one-big-batch loss and gradient. With local
    counts each micro-batch would divide by its own count and micro-batches with few tokens
    would be over-weighted (the 2024 transformers gradient-accumulation bug). When left as
    ``None`` they default to the local counts of this call: ``N_tok = mask.sum()`` and
    ``N_seq`` = number of rows with at least one kept token. A data-parallel backend that
    *averages* gradients over W ranks needs the loss multiplied by W on top of this.

    Counts may be Python numbers or tensors. A zero count gives a loss of 0 (never NaN).
    ``mode`` must be a key of ``LOSS_AGGREGATIONS``; anything else raises ``ValueError``.
    """
    try:
        fn = LOSS_AGGREGATIONS[mode]
    except KeyError:
        raise ValueError(
            f"unknown loss aggregation mode {mode!r}; valid modes: {sorted(LOSS_AGGREGATIONS)}"
        ) from None
    return fn(
        per_token_loss,
        mask,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        normalize_constant=normalize_constant,
    )
