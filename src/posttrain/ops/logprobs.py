"""Per-token log-probabilities and entropies, chunked so the full fp32 log-softmax never exists.

Shape legend: ``B`` batch rows, ``T`` positions, ``V`` vocabulary size, ``H`` hidden size,
``N = B·T`` flattened positions. Any number of leading dims is accepted where the docs say
``(..., V)``; they are flattened to ``N`` rows internally.

Memory. A naive ``log_softmax(logits.float()).gather(...)`` holds an ``(N, V)`` fp32 tensor
for the forward (kept alive for backward) plus another for the gradient. Here the rows are
processed ``chunk_size`` at a time: the forward keeps only the inputs (which already exist) and
one float per row (the log-sum-exp, plus the entropy where needed); the backward recomputes
softmax chunk by chunk. Transient memory is two or three ``(chunk_size, V)`` fp32 buffers; the
only ``(N, V)`` allocation is the returned gradient, in the logits' own dtype.
:func:`linear_log_probs` goes further and never builds the ``(N, V)`` logits at all.

Choosing ``chunk_size``: one buffer is ``chunk_size · V · 4`` bytes, e.g. 512 MiB for 1024 rows
at V = 131072, and the saving disappears once ``chunk_size`` reaches ``N``. The default
(``chunk_size=None``) takes the rows from a byte budget, :func:`default_chunk_rows`: one fp32
``(rows, V)`` buffer of at most ``CHUNK_BYTES`` (32 MiB), i.e. 256 rows at V = 32768 and 64 at
V = 131072, which keeps the peak near the fused 256-row figures of BENCHMARKS.md whatever the
vocabulary; small vocabularies get whole batches in one chunk.

Precision: the math runs in float32 (float64 inputs stay float64), whatever the input dtype
(bf16 / fp16 logits are upcast one chunk at a time). Outputs are float32 (or float64).

Causal shift is the caller's job: ``logits[:, :-1]`` predict ``labels[:, 1:]``. Non-contiguous
logits such as ``logits[:, :-1]`` are read one chunk at a time, never copied whole.
"""

from __future__ import annotations

import torch

# ---- chunking helpers (shared with kl.py) --------------------------------------------------

#: Byte budget of one fp32 ``(rows, V)`` chunk buffer when ``chunk_size`` is not given.
CHUNK_BYTES = 32 << 20
MIN_CHUNK_ROWS = 16


def default_chunk_rows(vocab_size: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so one fp32 ``(rows, V)`` buffer stays within ``budget_bytes`` (at least
    ``MIN_CHUNK_ROWS``, so tiny budgets do not degenerate into row-by-row loops)."""
    return max(MIN_CHUNK_ROWS, budget_bytes // (4 * max(1, int(vocab_size))))


def _resolve_chunk(chunk_size: int | None, vocab_size: int) -> int:
    return default_chunk_rows(vocab_size) if chunk_size is None else chunk_size


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any input is float64."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def _row_ranges(num_rows: int, chunk_size: int) -> list[tuple[int, int]]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, num_rows)) for s in range(0, num_rows, chunk_size)]


def _rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``x (..., V)`` seen as ``(N, V)``.

    A view when ``x`` is contiguous; otherwise a copy of just those rows (never of all of ``x``).
    """
    if x.is_contiguous():
        return x.view(-1, x.shape[-1])[start:stop]
    index = torch.unravel_index(torch.arange(start, stop, device=x.device), x.shape[:-1])
    return x[index]


def _check_labels(logits_shape: torch.Size, labels: torch.Tensor) -> None:
    if tuple(logits_shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the leading dims of the "
            f"scores {tuple(logits_shape)}"
        )


def _safe_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened ``(N,)`` labels with negatives replaced by 0, and the ``(N,)`` validity mask."""
    flat = labels.reshape(-1)
    valid = flat >= 0
    return flat.clamp(min=0), valid


def _log_probs(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log p = z − lse for a chunk ``(n, V)``; ``-inf`` logits give the most negative finite
    float instead of ``-inf`` so that ``p · log p`` is 0, not NaN."""
    return (z - lse[:, None]).clamp_min_(torch.finfo(z.dtype).min)


def _entropy_from(log_p: torch.Tensor) -> torch.Tensor:
    """H = −Σ_v p_v log p_v for a chunk of log-probs ``(n, V)`` -> ``(n,)``."""
    return -log_p.exp().mul_(log_p).sum(-1)


# ---- token log-probs on existing logits -----------------------------------------------------


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, chunk_size):
        dtype = _compute_dtype(logits.dtype)
        safe, valid = _safe_labels(labels)
        num_rows = safe.numel()
        lse = torch.empty(num_rows, dtype=dtype, device=logits.device)
        picked = torch.empty(num_rows, dtype=dtype, device=logits.device)
        for s, e in _row_ranges(num_rows, chunk_size):
            z = _rows(logits, s, e).to(dtype)
            lse[s:e] = torch.logsumexp(z, dim=-1)
            picked[s:e] = z.gather(1, safe[s:e, None]).squeeze(1)
        out = torch.where(valid, picked - lse, torch.zeros_like(lse))
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.chunk_size = chunk_size
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, safe, valid, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        g = torch.where(valid, grad_out.reshape(-1).to(lse.dtype), torch.zeros_like(lse))
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_rows = grad.view(-1, logits.shape[-1])
        for s, e in _row_ranges(safe.numel(), ctx.chunk_size):
            z = _rows(logits, s, e).to(lse.dtype)
            # d(z_y − lse)/dz = onehot(y) − softmax(z)
            dz = (z - lse[s:e, None]).exp_().mul_(-g[s:e, None])
            dz.scatter_add_(1, safe[s:e, None], g[s:e, None])
            grad_rows[s:e] = dz
        return grad, None, None


def token_log_probs(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int | None = None
) -> torch.Tensor:
    """Log-probability of each label under the softmax of its logits row.

    Shapes: ``logits`` ``(B, T, V)`` (or any ``(..., V)``; any float dtype), ``labels``
    ``(B, T)`` long -> ``(B, T)`` float32.

        out[b, t] = z[b, t, y] − logsumexp_v z[b, t, v],   y = labels[b, t]

    Positions with ``label < 0`` (e.g. -100 padding) give 0 and receive no gradient.
    Backward: ``dz = g · (onehot(y) − softmax(z))``, recomputed ``chunk_size`` rows at a time;
    the gradient is returned in ``logits.dtype``. Equivalent to
    ``log_softmax(logits.float(), -1).gather(-1, labels[..., None])`` with masking, minus the
    ``(N, V)`` fp32 intermediates.
    """
    _check_labels(logits.shape, labels)
    return _TokenLogProbs.apply(logits, labels, _resolve_chunk(chunk_size, logits.shape[-1]))


# ---- entropy on existing logits -------------------------------------------------------------


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, chunk_size):
        dtype = _compute_dtype(logits.dtype)
        num_rows = logits.numel() // logits.shape[-1]
        lse = torch.empty(num_rows, dtype=dtype, device=logits.device)
        entropy = torch.empty(num_rows, dtype=dtype, device=logits.device)
        for s, e in _row_ranges(num_rows, chunk_size):
            z = _rows(logits, s, e).to(dtype)
            lse[s:e] = torch.logsumexp(z, dim=-1)
            entropy[s:e] = _entropy_from(_log_probs(z, lse[s:e]))
        ctx.save_for_backward(logits, lse, entropy)
        ctx.chunk_size = chunk_size
        return entropy.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        g = grad_out.reshape(-1).to(lse.dtype)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_rows = grad.view(-1, logits.shape[-1])
        for s, e in _row_ranges(lse.numel(), ctx.chunk_size):
            log_p = _log_probs(_rows(logits, s, e).to(lse.dtype), lse[s:e])
            p = log_p.exp()
            # dH/dz = −p ⊙ (log p + H)   (in place in log_p's buffer)
            grad_rows[s:e] = log_p.add_(entropy[s:e, None]).mul_(p).mul_(-g[s:e, None])
        return grad, None


def compute_entropy(logits: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of the softmax distribution of each logits row.

    Shapes: ``logits`` ``(B, T, V)`` (or ``(..., V)``; any float dtype) -> ``(B, T)`` float32.

        H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v,   p = softmax(z)

    computed as ``−Σ p · (z − logsumexp(z))`` so that huge logits (±1e4) do not cancel
    catastrophically. Gradient ``dH/dz = −p ⊙ (log p + H)``, recomputed per chunk. In nats;
    0 for a one-hot distribution, ``log V`` for a uniform one. ``-inf`` logits are allowed
    (they contribute 0).
    """
    return _Entropy.apply(logits, _resolve_chunk(chunk_size, logits.shape[-1]))


# ---- fused LM head: hidden states -> log-probs (+ entropy) ----------------------------------


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, with_entropy):
        ctx.set_materialize_grads(False)
        dtype = _compute_dtype(hidden.dtype, weight.dtype)
        h = hidden.reshape(-1, hidden.shape[-1])
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        safe, valid = _safe_labels(labels)
        num_rows = h.shape[0]
        lse = torch.empty(num_rows, dtype=dtype, device=h.device)
        picked = torch.empty(num_rows, dtype=dtype, device=h.device)
        entropy = torch.empty(num_rows if with_entropy else 0, dtype=dtype, device=h.device)
        for s, e in _row_ranges(num_rows, chunk_size):
            z = _chunk_logits(h[s:e], w, b)
            lse[s:e] = torch.logsumexp(z, dim=-1)
            picked[s:e] = z.gather(1, safe[s:e, None]).squeeze(1)
            if with_entropy:
                entropy[s:e] = _entropy_from(_log_probs(z, lse[s:e]))
        log_probs = torch.where(valid, picked - lse, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, bias, safe, valid, lse, entropy)
        ctx.chunk_size = chunk_size
        if with_entropy:
            return log_probs.view(labels.shape), entropy.view(labels.shape)
        return log_probs.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_lp, grad_ent=None):
        hidden, weight, bias, safe, valid, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if (grad_lp is None and grad_ent is None) or not (need_h or need_w or need_b):
            return None, None, None, None, None, None
        dtype = lse.dtype
        h = hidden.reshape(-1, hidden.shape[-1])
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        zeros = torch.zeros_like(lse)
        g_lp = zeros if grad_lp is None else grad_lp.reshape(-1).to(dtype)
        g_lp = torch.where(valid, g_lp, zeros)
        g_ent = None if grad_ent is None else grad_ent.reshape(-1).to(dtype)

        grad_h = torch.empty(h.shape, dtype=dtype, device=h.device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=dtype, device=w.device) if need_w else None
        grad_b = torch.zeros(w.shape[0], dtype=dtype, device=w.device) if need_b else None
        for s, e in _row_ranges(h.shape[0], ctx.chunk_size):
            h_c = h[s:e].to(dtype)
            log_p = _log_probs(_chunk_logits(h_c, w, b), lse[s:e])
            p = log_p.exp()
            # dz = g_H · (−p ⊙ (log p + H)) + g_lp · (onehot(y) − p), reusing the two buffers
            if g_ent is None:
                dz = p.mul_(-g_lp[s:e, None])
            else:
                dz = log_p.add_(entropy[s:e, None]).mul_(p).mul_(-g_ent[s:e, None])
                dz -= p.mul_(g_lp[s:e, None])
            dz.scatter_add_(1, safe[s:e, None], g_lp[s:e, None])
            if need_h:
                grad_h[s:e] = dz @ w
            if need_w:
                grad_w.addmm_(dz.t(), h_c)
            if need_b:
                grad_b += dz.sum(0)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype).view(hidden.shape),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """z = h W^T (+ b) for one chunk of rows, in ``w``'s (compute) dtype: ``(n, H) -> (n, V)``."""
    h = h.to(w.dtype)
    return h @ w.t() if b is None else torch.addmm(b, h, w.t())


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused LM head + log-softmax + gather (+ entropy), without the ``(N, V)`` logits.

    Shapes: ``hidden`` ``(..., H)`` (e.g. ``(B, T, H)``), ``weight`` ``(V, H)`` (an
    ``nn.Linear`` / ``lm_head`` weight), ``bias`` ``(V,)`` or None, ``labels`` ``(...)`` long
    -> ``(log_probs (...), entropy (...) or None)``, float32.

    Per chunk of rows: ``z = h Wᵀ + b`` in fp32, then

        log_probs = z_y − logsumexp(z)          (0 where label < 0)
        entropy   = −Σ_v p_v log p_v            (only if ``return_entropy``)

    Backward recomputes each chunk's logits and, with upstream gradients ``g_lp`` and ``g_H``,

        dz = g_lp · (onehot(y) − p) + g_H · (−p ⊙ (log p + H))
        grad_hidden = dz W,   grad_weight = Σ_chunks dzᵀ h,   grad_bias = Σ_rows dz

    Positions with ``label < 0`` contribute no log-prob gradient (their entropy still counts).
    Memory: beyond the inputs, a few ``(chunk_size, V)`` fp32 buffers, one fp32 ``(V, H)``
    gradient accumulator (and an fp32 copy of ``weight`` if it is low precision); nothing of
    size ``N × V``. Compute cost: the logits matmul runs twice (forward and backward).
    """
    _check_labels(hidden.shape, labels)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, H) with H = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    out = _LinearLogProbs.apply(hidden, weight, bias, labels, _resolve_chunk(chunk_size, weight.shape[0]),
                                return_entropy)
    if return_entropy:
        return out[0], out[1]
    return out, None
