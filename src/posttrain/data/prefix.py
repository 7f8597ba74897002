"""Prediction indices and prefix-shared batches for sequence-level methods.

Sequence-level losses (DPO and its family, the tilt NLL) need, per sequence, the sum of the
log-probs of its trained tokens. A batch describes those as three flat index tensors:

* ``lp_rows`` ``(M,)`` — the row of the flattened ``(B*T, H)`` hidden states that predicts
  each trained token,
* ``lp_targets`` ``(M,)`` — that token's id,
* ``lp_seq`` ``(M,)`` — the sequence it belongs to,

so the LM head runs on the M trained positions only, and the per-sequence sums are one
``index_add``. :func:`prediction_index` derives them for the ordinary layouts of
:func:`posttrain.data.collate_sequences` (padded or packed).

:func:`collate_shared_prefix` is the faster layout for groups of responses to the same
prompt (a preference pair, a K-set): the group becomes ONE document

    [ shared prefix | response 1 | response 2 | ... ]

with position ids ``0..L-1`` for the prefix and ``L, L+1, ...`` again for every response, and
a 4-D attention mask in which each response sees the prefix and itself (causally) but never
another response. Every sequence gets exactly the context it has on its own, so its
log-probs are the same as in the ordinary layout (tested, with gradients), while the prompt is
encoded once instead of once per response. The hidden state that predicts a response's first
token is the prefix's last one, shared by all responses of the group.

The shared prefix is the longest common prefix of the group's token ids, capped so that every
response keeps at least one token of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .packing import best_fit_decreasing
from .tokenize import IGNORE_INDEX, EncodedExample


def prediction_index(labels: torch.Tensor, sequence_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``lp_rows`` / ``lp_targets`` / ``lp_seq`` for an ordinary ``(B, T)`` batch.

    Position ``t`` is a target when ``labels[b, t] != -100`` and position ``t - 1`` belongs to
    the same sequence (so nothing is predicted across a packed document boundary).
    """
    b, t = labels.shape
    same = torch.zeros_like(labels, dtype=torch.bool)
    same[:, 1:] = (sequence_ids[:, 1:] == sequence_ids[:, :-1]) & (sequence_ids[:, 1:] >= 0)
    is_target = same & (labels != IGNORE_INDEX)
    bi, ti = is_target.nonzero(as_tuple=True)
    return {
        "lp_rows": bi * t + ti - 1,
        "lp_targets": labels[bi, ti],
        "lp_seq": sequence_ids[bi, ti],
    }


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs) - 1  # every response keeps at least one token
    i = 0
    while i < n and all(s[i] == seqs[0][i] for s in seqs[1:]):
        i += 1
    return i


def collate_shared_prefix(
    groups: Sequence[Sequence[EncodedExample]],
    sequence_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    row_length: int,
    mask_dtype: torch.dtype = torch.bool,
) -> dict:
    """Pack groups of same-prompt sequences as prefix-shared documents (see module docstring).

    ``sequence_ids[g][i]`` is the index that ``groups[g][i]`` gets in the per-sequence outputs.
    Documents are packed best-fit-decreasing into rows of ``row_length`` (a document longer than
    that gets a row of its own length). ``mask_dtype`` is ``torch.bool`` (True = may attend; for
    sdpa) or a float dtype (an additive mask of 0 / min; for eager attention).

    Returns ``input_ids``, ``position_ids`` ``(B, T)``, ``attention_mask`` ``(B, 1, T, T)``,
    ``lp_rows``, ``lp_targets``, ``lp_seq`` ``(M,)``, ``num_sequences``, ``num_input_tokens``
    (tokens as if unshared) and ``num_computed_tokens``.
    """
    docs = []
    for group, ids in zip(groups, sequence_ids, strict=True):
        seqs = [e.input_ids for e in group]
        prefix = _common_prefix(seqs) if len(seqs) > 1 else len(seqs[0])
        tokens = list(seqs[0][:prefix])
        positions = list(range(prefix))
        segments = []  # (start offset in doc, example, sequence id)
        for e, sid in zip(group, ids, strict=True):
            start = len(tokens)
            tokens += e.input_ids[prefix:]
            positions += list(range(prefix, len(e.input_ids)))
            segments.append((start, e, sid))
        docs.append((tokens, positions, prefix, segments))
    capacity = max(row_length, max(len(d[0]) for d in docs))
    bins = best_fit_decreasing([len(d[0]) for d in docs], capacity)
    width = max(sum(len(docs[i][0]) for i in b) for b in bins)
    n_rows = len(bins)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    allow = torch.zeros((n_rows, width, width), dtype=torch.bool)
    rows, targets, seqs = [], [], []
    for r, b in enumerate(bins):
        off = 0
        for i in b:
            tokens, positions, prefix, segments = docs[i]
            n = len(tokens)
            input_ids[r, off : off + n] = torch.tensor(tokens)
            position_ids[r, off : off + n] = torch.tensor(positions)
            causal = torch.ones((n, n), dtype=torch.bool).tril()
            block = torch.zeros((n, n), dtype=torch.bool)
            block[:prefix, :prefix] = causal[:prefix, :prefix]
            for start, e, sid in segments:
                end = start + len(e.input_ids) - prefix
                block[start:end, :prefix] = True
                block[start:end, start:end] = causal[: end - start, : end - start]
                # physical column of each of the sequence's own positions 0..len-1
                phys = torch.cat([torch.arange(prefix), torch.arange(start, end)])
                labels = torch.tensor(e.labels)
                t = (labels[1:] != IGNORE_INDEX).nonzero().squeeze(1) + 1  # trained positions
                rows.append(r * width + off + phys[t - 1])
                targets.append(labels[t])
                seqs.append(torch.full_like(t, sid))
            allow[r, off : off + n, off : off + n] = block
            off += n
        # padding positions attend to themselves only (a fully masked row would give NaN)
        pad = torch.arange(off, width)
        allow[r, pad, pad] = True
    if mask_dtype == torch.bool:
        mask = allow[:, None]
    else:
        mask = torch.zeros(allow.shape, dtype=mask_dtype).masked_fill_(~allow, torch.finfo(mask_dtype).min)[:, None]
    n_seq = sum(len(ids) for ids in sequence_ids)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": mask,
        "lp_rows": torch.cat(rows).long(),
        "lp_targets": torch.cat(targets).long(),
        "lp_seq": torch.cat(seqs).long(),
        "num_sequences": n_seq,
        "num_input_tokens": sum(len(e) for g in groups for e in g),
        "num_computed_tokens": sum(len(d[0]) for d in docs),
    }
