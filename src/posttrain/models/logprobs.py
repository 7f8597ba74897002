"""The one log-prob path: per-token log-probs (and entropy) of given targets under a causal LM.

Every method (SFT, DPO's policy and reference, RL's policy / old / reference, distillation)
gets its log-probs here, so padded, packed and per-example inputs are scored identically.

Conventions, with ``(B, T)`` = batch x sequence:

* ``targets[b, t]`` is the token that position ``t`` predicts (already shifted); negative
  targets (``-100``) are ignored and score 0. :func:`shift_labels` turns Hugging Face style
  labels (``labels[t] = input_ids[t]`` where trained, ``-100`` elsewhere) into targets.
* When the model's output layer is a plain linear head, the head is fused with the
  log-softmax (:func:`posttrain.ops.linear_log_probs`): the ``(B, T, V)`` logits are never
  materialized, in the forward or the backward pass. Otherwise (logit soft-capping, scaled
  logits, custom heads) the model's own logits go through the chunked
  :func:`posttrain.ops.token_log_probs`.
"""

from __future__ import annotations

import torch

from ..ops import compute_entropy, linear_log_probs, token_log_probs
from ..ops.logprobs import default_chunk_rows
from .peft import hf_model

# Config attributes that change logits after the linear head; such models use the logits path.
_POST_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def chunk_rows(vocab_size: int) -> int:
    """Rows per log-softmax chunk: the ops' byte budget (one fp32 ``(rows, V)`` buffer of at most
    ``posttrain.ops.logprobs.CHUNK_BYTES``)."""
    return default_chunk_rows(vocab_size)


def forward_kwargs(input_ids, attention_mask=None, position_ids=None) -> dict:
    """The keyword arguments of every training / scoring forward pass. ``use_cache=False`` matters
    for packing: with a cache transformers ignores ``position_ids`` when building the mask, and
    the documents of a row would attend to each other."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    return kwargs


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``(B, T)`` HF labels -> ``(B, T)`` targets: ``targets[:, t] = labels[:, t + 1]``, last = ignore."""
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    return targets


def fused_head(model) -> torch.nn.Linear | None:
    """The model's output linear layer if log-probs may be fused with it, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return None
    cfg = getattr(model, "config", None)
    for attr in _POST_HEAD_ATTRS:
        value = getattr(cfg, attr, None)
        if value not in (None, 1, 1.0, False):
            return None
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return None
    if type(head.weight).__name__ == "DTensor" or hasattr(head.weight, "ds_id"):
        return None  # sharded (FSDP2, DeepSpeed ZeRO-3): only the model's own forward gathers the weight
    return head


def token_log_probs_from_model(
    model,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    return_entropy: bool = False,
    fused: bool = True,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token ``log p(targets[b, t] | input_ids[b, :t+1])`` -> ``{"log_probs": (B, T)[, "entropy": (B, T)]}``.

    Both outputs are float32 and carry gradients when the model does. ``position_ids``
    restarting at 0 inside a row mark packed documents (attention then stays inside each
    document; see :mod:`posttrain.data.collate`).
    """
    with hf_model(model) as model:
        return _token_log_probs_from_model(model, input_ids, targets, attention_mask=attention_mask,
                                           position_ids=position_ids, return_entropy=return_entropy, fused=fused,
                                           chunk_size=chunk_size)


def _token_log_probs_from_model(model, input_ids, targets, *, attention_mask, position_ids, return_entropy, fused,
                                chunk_size) -> dict[str, torch.Tensor]:
    batch_shape = input_ids.shape
    if position_ids is not None and attention_mask is None and input_ids.shape[0] > 1 and \
            str(getattr(model.config, "_attn_implementation", "")).startswith("flash"):
        # flash-attention derives varlen boundaries from position_ids only for a single row;
        # every packed row starts a document, so one long row keeps the same boundaries
        input_ids, targets, position_ids = (t.reshape(1, -1) for t in (input_ids, targets, position_ids))
    head = fused_head(model) if fused else None
    if chunk_size is None:
        chunk_size = chunk_rows(model.config.vocab_size)
    # use_cache=False matters for packing: with a cache transformers ignores position_ids when
    # building the mask and documents in a row would attend to each other
    kwargs = forward_kwargs(input_ids, attention_mask, position_ids)
    if head is not None:
        hidden = model.base_model(**kwargs).last_hidden_state
        # under bf16/fp16 autocast the head and its log-softmax still run in fp32
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            log_probs, entropy = linear_log_probs(
                hidden.float(), head.weight, targets, bias=head.bias, chunk_size=chunk_size,
                return_entropy=return_entropy,
            )
    else:
        logits = model(**kwargs).logits
        log_probs = token_log_probs(logits, targets, chunk_size=chunk_size)
        entropy = compute_entropy(logits, chunk_size=chunk_size) if return_entropy else None
    out = {"log_probs": log_probs.reshape(batch_shape)}
    if return_entropy:
        out["entropy"] = entropy.reshape(batch_shape)
    return out


def get_response_log_probs(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    return_token_entropy: bool = False,
) -> dict[str, torch.Tensor]:
    """Reference note 004's contract: ``labels`` are the shifted ``input_ids`` (as returned by
    :func:`posttrain.data.tokenize_prompt_and_output`); returns ``{"log_probs": (B, T)}`` and,
    if asked, ``"token_entropy": (B, T)``. Nothing is masked here."""
    out = token_log_probs_from_model(model, input_ids, labels, return_entropy=return_token_entropy)
    result = {"log_probs": out["log_probs"]}
    if return_token_entropy:
        result["token_entropy"] = out["entropy"]
    return result


def selected_log_probs(
    model,
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    return_logits: bool = False,
) -> dict[str, torch.Tensor]:
    """Log-probs of ``targets`` ``(M,)`` predicted by the hidden states at flattened ``rows`` ``(M,)``.

    Only the M selected positions go through the LM head (with a plain linear head, fused with
    the log-softmax). ``attention_mask`` may be 2-D (padding) or an explicit 4-D mask (e.g. a
    prefix-shared layout, :func:`posttrain.data.collate_shared_prefix`).
    ``temperature`` scores under ``softmax(logits / temperature)``, the distribution a sampler
    at that temperature draws from (online RL trains the tempered policy it sampled).
    Returns ``{"log_probs": (M,)[, "entropy": (M,)][, "logits": (M, V)]}`` in float32. ``model`` may
    be a ``PeftModel`` or the adapter-disabled reference view (:mod:`posttrain.models.peft`).
    ``return_logits`` also returns the full (temperature-scaled) logits of the M positions, from
    the same forward pass (for an exact full-vocabulary KL); the log-probs are computed exactly as
    without it.
    """
    with hf_model(model) as model:
        return _selected_log_probs(model, input_ids, rows, targets, attention_mask=attention_mask,
                                   position_ids=position_ids, return_entropy=return_entropy, chunk_size=chunk_size,
                                   temperature=temperature, return_logits=return_logits)


def _selected_log_probs(model, input_ids, rows, targets, *, attention_mask, position_ids, return_entropy, chunk_size,
                        temperature, return_logits=False) -> dict[str, torch.Tensor]:
    head = fused_head(model)
    kwargs = forward_kwargs(input_ids, attention_mask, position_ids)
    if chunk_size is None:
        chunk_size = chunk_rows(model.config.vocab_size)
    if head is not None:
        hidden = model.base_model(**kwargs).last_hidden_state
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            picked, bias = picked.float(), head.bias
            if temperature != 1.0:  # (h W + b) / T = (h / T) W + b / T
                picked = picked / temperature
                bias = None if bias is None else bias / temperature
            log_probs, entropy = linear_log_probs(picked, head.weight, targets, bias=bias,
                                                  chunk_size=chunk_size, return_entropy=return_entropy)
            if return_logits:
                logits = torch.nn.functional.linear(picked, head.weight.float(), None if bias is None else bias.float())
    else:
        logits = model(**kwargs).logits
        picked = logits.reshape(-1, logits.shape[-1]).index_select(0, rows)
        if temperature != 1.0:
            picked = picked.float() / temperature
        log_probs = token_log_probs(picked[None], targets[None], chunk_size=chunk_size)[0]
        entropy = compute_entropy(picked[None], chunk_size=chunk_size)[0] if return_entropy else None
        logits = picked.float()
    out = {"log_probs": log_probs}
    if return_entropy:
        out["entropy"] = entropy
    if return_logits:
        out["logits"] = logits
    return out


def selected_logits(
    model,
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The full next-token logits at flattened ``rows`` ``(M,)`` -> ``(M, V)`` float32 (with gradient
    when the model has one). Only the M selected positions go through the output head, so the
    ``(B, T, V)`` logits of the whole batch never exist (distillation needs whole distributions;
    :func:`posttrain.ops.token_divergence` then works through them in chunks)."""
    with hf_model(model) as m:
        kwargs = forward_kwargs(input_ids, attention_mask, position_ids)
        head = fused_head(m)
        if head is not None:
            hidden = m.base_model(**kwargs).last_hidden_state
            picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
            with torch.autocast(device_type=picked.device.type, enabled=False):
                return torch.nn.functional.linear(picked.float(), head.weight.float(),
                                                  None if head.bias is None else head.bias.float())
        logits = m(**kwargs).logits
        return logits.reshape(-1, logits.shape[-1]).index_select(0, rows).float()
