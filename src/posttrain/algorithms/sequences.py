"""Shared pieces of the sequence-level methods (reward models, DPO family, KTO, tilt).

* :func:`sequence_log_probs` — per-sequence sums of response-token log-probs and response
  lengths for a batch from :func:`posttrain.data.collate_sequences`, through the one log-prob
  path; padded and packed batches give the same numbers.
* :class:`UnitPlan` — deterministic micro-batches of *units* (a pair, an unpaired example, a
  K-set), so the members of a unit always share a micro-batch.
* :func:`reference_policy` — the reference model: a frozen, eval-mode copy of the initial policy
  (:func:`frozen_copy`), or for a LoRA model the same model with its adapter disabled.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from ..data import EncodedExample, collate_sequences, collate_shared_prefix, prediction_index
from ..models.logprobs import selected_log_probs
from ..models.peft import AdapterDisabled, is_peft
from ..ops import sequence_counts, sequence_sums
from ..train.plan import StepPlan


def sequence_log_probs(model, batch: dict, *, return_entropy: bool = False) -> dict[str, torch.Tensor]:
    """``{"logps": (S,), "lengths": (S,)[, "entropy_sum": (S,)]}`` for the batch's S sequences.

    ``logps[s]`` is the sum of ``log p(token | its context)`` over sequence ``s``'s trained
    tokens and ``lengths[s]`` their number. The batch names those tokens by prediction index
    (``lp_rows`` / ``lp_targets`` / ``lp_seq``, see :mod:`posttrain.data.prefix`), so ordinary
    padded or packed batches and prefix-shared ones go through the same code.
    """
    out = selected_log_probs(
        model, batch["input_ids"], batch["lp_rows"], batch["lp_targets"],
        attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"),
        return_entropy=return_entropy,
    )
    n = int(batch["num_sequences"])
    seq = batch["lp_seq"]
    ones = torch.ones_like(out["log_probs"])
    result = {"logps": sequence_sums(out["log_probs"], seq, n), "lengths": sequence_counts(ones, seq, n)}
    if return_entropy:
        result["entropy_sum"] = sequence_sums(out["entropy"].detach(), seq, n)
    return result


@torch.no_grad()
def reference_log_probs(ref_model, batch: dict) -> torch.Tensor:
    """Sequence log-probs under the frozen reference (eval mode: no dropout), same path as the policy."""
    was = ref_model.training
    ref_model.eval()
    logps = sequence_log_probs(ref_model, batch)["logps"]
    ref_model.train(was)
    return logps


def reference_policy(model):
    """The frozen reference of ``model``: the same weights with the adapter disabled for a LoRA model
    (no copy; :class:`posttrain.models.peft.AdapterDisabled`), else an independent frozen copy."""
    if is_peft(model):
        return AdapterDisabled(model)
    return frozen_copy(model)


def frozen_copy(model):
    """An independent, eval-mode, gradient-free copy of ``model`` (the reference policy)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class UnitPlan(StepPlan):
    """Micro-batches of whole units (a pair, an unpaired example, a K-set), so the members of a
    unit always share a micro-batch; per epoch the units are shuffled.
    ``unit_sequences(unit)`` lists a unit's sequences and ``unit_targets(unit)`` what the loss
    learns from besides them (labels, rewards, margins); both are hashed into the fingerprint,
    so a resume with changed data is refused. ``collate(units)`` builds a batch of several units
    (the algorithm picks the layout)."""

    def __init__(self, units: Sequence, *, collate: Callable[[list], dict],
                 unit_sequences: Callable[[object], list[EncodedExample]], micro_batch_size: int,
                 grad_accum: int, epochs: float, max_steps: int, seed: int, tag: str,
                 unit_targets: Callable[[object], object] = lambda u: None):
        self.units = list(units)

        def content():
            for u in self.units:
                yield [[e.input_ids, e.labels] for e in unit_sequences(u)]
                yield unit_targets(u)

        def epoch_units(epoch: int, rng) -> list[int]:
            order = list(range(len(self.units)))
            rng.shuffle(order)
            return order

        super().__init__(n_items=len(self.units), epoch_units=epoch_units,
                         collate=lambda mb: collate([self.units[i] for i in mb]),
                         content=content,
                         micro_batch_size=micro_batch_size, grad_accum=grad_accum, epochs=epochs,
                         max_steps=max_steps, seed=seed, tag=tag)


def collate_examples(examples: list[EncodedExample], *, pad_token_id: int, packing: bool,
                     row_length: int) -> dict:
    """:func:`posttrain.data.collate_sequences` plus prediction indices and the engine's counts."""
    batch = collate_sequences(examples, pad_token_id, packing=packing, row_length=row_length)
    batch.update(prediction_index(batch["labels"], batch["sequence_ids"]))
    batch["num_input_tokens"] = sum(len(e) for e in examples)
    return batch


def collate_groups(groups: list[list[EncodedExample]], sequence_ids: list[list[int]], *, pad_token_id: int,
                   packing: bool, row_length: int, share_prefix: bool, attn_implementation: str) -> dict:
    """Batch groups of same-prompt sequences (pairs, K-sets): prefix-shared documents when
    ``share_prefix`` and the attention implementation takes an explicit 4-D mask, else the
    ordinary layout with sequences ordered by ``sequence_ids``."""
    if share_prefix and attn_implementation in PREFIX_SHARING_ATTENTION:
        mask_dtype = torch.bool if attn_implementation == "sdpa" else torch.float32
        return collate_shared_prefix(groups, sequence_ids, pad_token_id, row_length=row_length, mask_dtype=mask_dtype)
    order = sorted(((sid, e) for g, ids in zip(groups, sequence_ids, strict=True)
                    for e, sid in zip(g, ids, strict=True)), key=lambda x: x[0])
    return collate_examples([e for _, e in order], pad_token_id=pad_token_id, packing=packing, row_length=row_length)


# attention implementations that accept an explicit 4-D mask (flash-attention does not)
PREFIX_SHARING_ATTENTION = ("sdpa", "eager")


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (0.0 when either side is constant)."""
    xt = torch.tensor(list(x), dtype=torch.float64)
    yt = torch.tensor(list(y), dtype=torch.float64)
    if len(xt) < 2 or xt.std() == 0 or yt.std() == 0:
        return 0.0
    xc, yc = xt - xt.mean(), yt - yt.mean()
    return float((xc * yc).sum() / (xc.norm() * yc.norm()))
