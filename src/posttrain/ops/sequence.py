"""Per-token values -> per-sequence values, for padded and packed rows alike.

Shape legend: ``B`` rows, ``T`` positions, ``S`` sequences. ``sequence_ids`` ``(B, T)`` long
gives, for every position, the index in ``[0, S)`` of the sequence it belongs to, or ``-1``
for a position that belongs to none (padding). A padded batch has one sequence per row
(``sequence_ids[b, t] = b`` on the row's real tokens); a packed row holds several sequences
side by side. Every function here treats the two layouts identically: it only looks at the
ids, never at row boundaries, so the same sequences give the same results (and gradients)
however they were laid out.

A sequence never spans two rows (packing keeps documents whole); :func:`pool_sequences`
mode ``last`` relies on that.
"""

from __future__ import annotations

import torch

POOLING_MODES = ("last", "mean", "eos")


def _check_layout(values: torch.Tensor, sequence_ids: torch.Tensor, name: str = "values") -> None:
    if values.shape != sequence_ids.shape:
        raise ValueError(
            f"{name} {tuple(values.shape)} and sequence_ids {tuple(sequence_ids.shape)} must have "
            "the same shape"
        )
    if sequence_ids.dtype.is_floating_point or sequence_ids.dtype == torch.bool:
        raise ValueError(f"sequence_ids must be an integer tensor, got {sequence_ids.dtype}")


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs (bf16 / fp16 sums are accumulated in fp32)."""
    return torch.promote_types(torch.float32, dtype) if dtype.is_floating_point else torch.float32


def _flat(sequence_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened ``(B·T,)`` ids with ``-1`` replaced by 0, and the ``(B·T,)`` membership mask."""
    flat = sequence_ids.reshape(-1)
    member = flat >= 0
    return torch.where(member, flat, torch.zeros_like(flat)), member


def sequence_sums(
    values: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int
) -> torch.Tensor:
    """Per-sequence sum of per-token values.   ``(B, T), (B, T), S -> (S,)``.

        out[s] = Σ_{b,t : sequence_ids[b,t] = s} values[b, t]

    Used to turn per-token log-probs (already 0 wherever nothing is trained) into sequence
    log-probs ``log π(y|x) = Σ_t log π(y_t | x, y_<t)``. Positions with id ``-1`` are dropped
    exactly (their value, even ``inf``/``NaN``, never reaches the result, and their gradient is
    0). Differentiable w.r.t. ``values`` (a scatter-add: ``∂out[s]/∂values[b,t] = 1`` where the
    id is ``s``). A sequence with no position gives 0. The sum is taken in float32 (float64
    stays float64). Ids must lie in ``[-1, S)``; larger ids raise inside ``index_add``.
    """
    _check_layout(values, sequence_ids)
    dtype = _float_dtype(values.dtype)
    index, member = _flat(sequence_ids)
    src = values.reshape(-1).to(dtype)
    src = torch.where(member, src, torch.zeros((), dtype=dtype, device=src.device))
    out = torch.zeros(num_sequences, dtype=dtype, device=values.device)
    return out.index_add(0, index, src)


def sequence_counts(
    mask: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int
) -> torch.Tensor:
    """Number of positions with ``mask != 0`` in each sequence.   ``(B, T), (B, T), S -> (S,)`` long.

        out[s] = #{(b, t) : sequence_ids[b,t] = s  and  mask[b,t] ≠ 0}

    With the loss mask this is each response's token count ``|y|`` (the length used by the
    length-normalized preference losses). Positions with id ``-1`` are not counted.
    """
    _check_layout(mask, sequence_ids, "mask")
    index, member = _flat(sequence_ids)
    keep = (mask.reshape(-1) != 0) & member
    out = torch.zeros(num_sequences, dtype=torch.long, device=mask.device)
    return out.index_add(0, index, keep.long())


def _last_position(
    eligible: torch.Tensor, index: torch.Tensor, num_sequences: int, mode: str
) -> torch.Tensor:
    """For each sequence, the largest flat position ``b·T + t`` that is eligible -> ``(S,)`` long.

    Raises ``ValueError`` naming the sequences that have no eligible position (this check
    reads one boolean back from the device).
    """
    positions = torch.arange(index.numel(), device=index.device)
    positions = torch.where(eligible, positions, torch.full_like(positions, -1))
    last = torch.full((num_sequences,), -1, dtype=torch.long, device=index.device)
    last = last.scatter_reduce(0, index, positions, reduce="amax", include_self=True)
    _raise_if_empty(last < 0, mode)
    return last


def _raise_if_empty(empty: torch.Tensor, mode: str) -> None:
    if bool(empty.any()):
        bad = empty.nonzero().flatten().tolist()
        shown = ", ".join(str(i) for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise ValueError(
            f"sequence {bad[0]} has no position eligible for {mode!r} pooling "
            f"({len(bad)} such sequence(s): {shown})"
        )


def pool_sequences(
    values: torch.Tensor,
    sequence_ids: torch.Tensor,
    num_sequences: int,
    *,
    mode: str,
    token_mask: torch.Tensor | None = None,
    eos_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reward-model pooling of per-token scores to one score per sequence.   ``-> (S,)``.

    Shapes: ``values`` ``(B, T)`` per-token scores, ``sequence_ids`` ``(B, T)`` long (``-1`` =
    no sequence), ``token_mask`` / ``eos_mask`` ``(B, T)`` (bool or 0/1).

    The score head is linear and applied at every position, so pooling the per-token scores
    equals scoring the pooled hidden state (``w·mean(h) + b = mean(w·h + b)``); this lets the
    model run its head on the whole ``(B, T, H)`` output and pool afterwards.

    ``mode``:

    - ``"last"``: the value at the sequence's last position (the largest ``t`` carrying its
      id). Right padding, left padding and packed rows all give the right token, because the
      position comes from the ids, not from ``T − 1`` or an attention-mask sum.
    - ``"mean"``: the mean over the sequence's positions where ``token_mask`` is set (the
      response tokens): ``Σ_t m_t v_t / Σ_t m_t``.
    - ``"eos"``: the value at the *last* position inside the sequence where ``eos_mask`` is set
      (e.g. the final end-of-turn token of a multi-turn chat).

    A sequence with no eligible position (no position at all, no ``token_mask`` token, no EOS
    token) raises ``ValueError`` naming the sequence index; callers turn it into a user error.
    That check reads one boolean back from the device. Differentiable w.r.t. ``values``.
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; valid modes: {list(POOLING_MODES)}")
    _check_layout(values, sequence_ids)
    index, member = _flat(sequence_ids)
    flat_values = values.reshape(-1).to(_float_dtype(values.dtype))

    if mode == "last":
        return flat_values[_last_position(member, index, num_sequences, mode)]

    if mode == "eos":
        if eos_mask is None:
            raise ValueError("pool_sequences mode 'eos' needs eos_mask")
        _check_layout(eos_mask, sequence_ids, "eos_mask")
        eligible = member & (eos_mask.reshape(-1) != 0)
        return flat_values[_last_position(eligible, index, num_sequences, mode)]

    # mode == "mean"
    if token_mask is None:
        raise ValueError("pool_sequences mode 'mean' needs token_mask")
    _check_layout(token_mask, sequence_ids, "token_mask")
    counts = sequence_counts(token_mask, sequence_ids, num_sequences)
    _raise_if_empty(counts == 0, mode)
    keep = (token_mask != 0) & (sequence_ids >= 0)
    zero = torch.zeros((), dtype=flat_values.dtype, device=values.device)
    masked = torch.where(keep, values.to(flat_values.dtype), zero)
    return sequence_sums(masked, sequence_ids, num_sequences) / counts.to(flat_values.dtype)
