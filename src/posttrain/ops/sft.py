"""Supervised fine-tuning loss: masked negative log-likelihood."""

from __future__ import annotations

import torch

from .reductions import aggregate_loss, masked_normalize, masked_sum

SFT_NORMALIZATIONS = ("tokens", "sum", "constant")


def sft_loss(
    log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalization: str = "tokens",
    normalize_constant: float | None = None,
    num_tokens=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked NLL of the label tokens.

    Shapes: ``log_probs`` ``(B, T)`` = log π_θ(y_t | y_<t) at the label positions (already
    causally shifted, see :func:`posttrain.ops.token_log_probs`), ``mask`` ``(B, T)`` with 1 on
    the tokens to learn (e.g. assistant turns) -> scalar loss.

    With ``S = −Σ_{b,t} m · log_probs`` (the masked NLL sum):

    - ``"tokens"``:   ``S / N_tok``, where ``N_tok = Σ m`` of this call, or ``num_tokens``
      when given: pass the token count of the whole optimizer step so that gradient
      accumulation over micro-batches reproduces the one-batch gradient (see
      :func:`posttrain.ops.aggregate_loss`, mode ``token_mean``). 0 if there are no tokens.
    - ``"sum"``:      ``S``.
    - ``"constant"``: ``S / normalize_constant``.

    The denominator is the number of *kept* tokens, not the sequence length: prompt and
    padding positions neither add loss nor dilute it.

    Returns ``(loss, metrics)`` with detached metrics ``nll_sum`` (``S``) and ``num_tokens``
    (local ``Σ m``).
    """
    nll = -log_probs
    if normalization == "tokens":
        loss = aggregate_loss(nll, mask, "token_mean", num_tokens=num_tokens)
    elif normalization == "sum":
        loss = masked_sum(nll, mask)
    elif normalization == "constant":
        if normalize_constant is None:
            raise ValueError("sft_loss normalization 'constant' needs normalize_constant")
        loss = masked_normalize(nll, mask, normalize_constant)
    else:
        raise ValueError(
            f"unknown sft_loss normalization {normalization!r}; valid: {list(SFT_NORMALIZATIONS)}"
        )
    metrics = {
        "nll_sum": masked_sum(nll, mask).detach(),
        "num_tokens": mask.sum().detach(),
    }
    return loss, metrics
