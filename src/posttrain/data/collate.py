"""Collators: lists of :class:`EncodedExample` to model-ready tensors.

``pad_collate`` right-pads a batch and returns an ``attention_mask``.

``packed_collate`` concatenates documents into rows and returns **no** ``attention_mask``:
with ``attention_mask=None`` (and no KV cache, i.e. ``use_cache=False``), transformers 5
reads the restarting ``position_ids`` as document boundaries
(``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal mask for
the sdpa / eager / flex backends. The flash-attention backends instead derive varlen
``cu_seqlens`` from ``position_ids`` (``modeling_flash_attention_utils._is_packed_sequence``),
but only when the batch is one flattened row; for more rows flatten the batch to
``(1, B * T)`` (``cu_seqlens`` here is already flattened that way).

``collate_sequences`` is the collator of the sequence-level methods (reward models, DPO and
its variants, KTO, exponential tilt): padded or packed, every token carries the index of
the example it belongs to (``sequence_ids``), so per-sequence sums of token log-probs come
from one forward pass with ``torch.zeros(S).index_add_(0, ids, values)`` over the kept
positions, identically for both layouts.

Two calls silently switch the block-diagonal mask off and let documents attend to each
other: passing an all-ones ``attention_mask`` with a packed batch, and leaving the KV cache
on. ``config.use_cache`` defaults to True, and the model then creates a cache even in
training mode, so call the model with ``use_cache=False`` (tests/test_data_packing_model.py
checks both hazards). Flash-attention callers with several rows can instead pass
``cu_seq_lens_q``/``cu_seq_lens_k`` (= ``cu_seqlens``) and ``max_length_q``/``max_length_k``
(= the longest document) as keyword arguments (read from transformers'
``_flash_attention_forward``; not exercised by the CPU tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .packing import best_fit_decreasing
from .tokenize import IGNORE_INDEX, EncodedExample


def _padded_length(n: int, multiple: int | None) -> int:
    if multiple is None:
        return n
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {multiple!r}")
    return -(-n // multiple) * multiple


def pad_collate(
    examples: Sequence[EncodedExample],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
    return_sequence_ids: bool = False,
) -> dict[str, torch.Tensor]:
    """Right-pad a batch.

    Returns ``(B, T)`` long tensors: ``input_ids`` (``pad_token_id`` at pads),
    ``attention_mask`` (1 real, 0 pad), ``labels`` (-100 at pads) and ``position_ids``
    (``0..len-1``, then 0 at pads). ``T`` is the longest example, rounded up to
    ``pad_to_multiple_of`` when given. With ``return_sequence_ids`` also ``sequence_ids``:
    ``b`` on every token of example ``b`` (row ``b``), -1 on padding.
    """
    if not examples:
        raise ValueError("pad_collate needs at least one example")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set the tokenizer's pad token (e.g. to its EOS token)")
    T = _padded_length(max(len(ex.input_ids) for ex in examples), pad_to_multiple_of)
    B = len(examples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[b, :n] = torch.as_tensor(ex.input_ids, dtype=torch.long)
        labels[b, :n] = torch.as_tensor(ex.labels, dtype=torch.long)
        attention_mask[b, :n] = 1
        position_ids[b, :n] = torch.arange(n)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
    }
    if return_sequence_ids:
        # Row b holds example b: its real tokens are exactly where the attention mask is 1.
        rows = torch.arange(B, dtype=torch.long).unsqueeze(1).expand(B, T)
        batch["sequence_ids"] = torch.where(attention_mask.bool(), rows, torch.full_like(rows, -1))
    return batch


def packed_collate(
    rows: Sequence[Sequence[EncodedExample]],
    pad_token_id: int,
    *,
    row_length: int,
    return_sequence_ids: bool = False,
) -> dict[str, torch.Tensor]:
    """Concatenate each row's documents into one sequence of ``row_length`` tokens.

    Returns:
        ``input_ids`` ``(B, row_length)``: the documents back to back, then ``pad_token_id``.
        ``labels`` ``(B, row_length)``: each document's labels with its *first* label set to
            -100 (in the shifted loss that label would be predicted from the previous
            document's last token), and -100 on padding.
        ``position_ids`` ``(B, row_length)``: ``0..len-1`` for every document; the trailing
            padding counts ``0, 1, 2, ...`` as a pseudo-document of its own.
        ``cu_seqlens`` ``(D + 1,)`` int32: cumulative document lengths over the flattened
            ``(B * row_length)`` batch, padding pseudo-documents included (flash-attention
            varlen format).
        ``num_docs`` ``(B,)`` long: real documents per row.
        ``sequence_ids`` ``(B, row_length)`` long, only with ``return_sequence_ids``: the
            document's index in flattened row order (row 0's documents first, in order) on
            every token of that document, -1 on padding.

    There is deliberately no ``attention_mask`` (see the module docstring).

    Raises:
        ValueError: a row longer than ``row_length``, an empty row, or an empty document.
    """
    if not rows:
        raise ValueError("packed_collate needs at least one row")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set the tokenizer's pad token (e.g. to its EOS token)")
    if isinstance(row_length, bool) or not isinstance(row_length, int) or row_length < 1:
        raise ValueError(f"row_length must be a positive integer, got {row_length!r}")
    B = len(rows)
    input_ids = torch.full((B, row_length), pad_token_id, dtype=torch.long)
    labels = torch.full((B, row_length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, row_length), dtype=torch.long)
    num_docs = torch.zeros(B, dtype=torch.long)
    sequence_ids = torch.full((B, row_length), -1, dtype=torch.long)
    doc_index = 0
    cu = [0]
    for b, docs in enumerate(rows):
        if not docs:
            raise ValueError(f"row {b} has no documents")
        total = sum(len(d.input_ids) for d in docs)
        if total > row_length:
            raise ValueError(
                f"row {b} holds {total} tokens, more than row_length={row_length}; pack with "
                "best_fit_decreasing(lengths, capacity=row_length)"
            )
        pos = 0
        for d, doc in enumerate(docs):
            n = len(doc.input_ids)
            if n == 0:
                raise ValueError(f"row {b}, document {d} is empty")
            input_ids[b, pos : pos + n] = torch.as_tensor(doc.input_ids, dtype=torch.long)
            labels[b, pos : pos + n] = torch.as_tensor(doc.labels, dtype=torch.long)
            labels[b, pos] = IGNORE_INDEX
            position_ids[b, pos : pos + n] = torch.arange(n)
            sequence_ids[b, pos : pos + n] = doc_index
            doc_index += 1
            pos += n
            cu.append(b * row_length + pos)
        if pos < row_length:
            position_ids[b, pos:] = torch.arange(row_length - pos)
            cu.append((b + 1) * row_length)
        num_docs[b] = len(docs)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "num_docs": num_docs,
    }
    if return_sequence_ids:
        batch["sequence_ids"] = sequence_ids
    return batch


def collate_sequences(
    examples: Sequence[EncodedExample],
    pad_token_id: int,
    *,
    packing: bool,
    row_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor | int]:
    """A batch in which every token knows which example (sequence) it belongs to.

    Legend: ``S = len(examples)``; ``B`` rows of ``T`` tokens.

    Always returns:
        ``input_ids`` ``(B, T)`` long.
        ``labels`` ``(B, T)`` long: Hugging Face convention, *unshifted*, -100 where not
            trained (prompt, padding; with packing also each document's first token).
        ``position_ids`` ``(B, T)`` long: ``0..len-1`` per example.
        ``sequence_ids`` ``(B, T)`` long: ``s`` on *every* token of ``examples[s]`` (prompt
            tokens included), -1 on padding. After the causal shift a target position ``t``
            belongs to ``sequence_ids[:, t + 1]``.
        ``num_sequences``: ``S`` as a plain Python ``int`` (a size, known without a device
            sync; use it for ``torch.zeros(S).index_add_(0, ids, values)``).

    ``packing=False``: one example per row (``B = S``, row ``s`` holds ``examples[s]``), right
    padding to the longest example (rounded up to ``pad_to_multiple_of``), plus
    ``attention_mask`` ``(B, T)`` (:func:`pad_collate`). ``row_length`` is ignored.

    ``packing=True``: the examples are packed best-fit-decreasing
    (:func:`~posttrain.data.packing.best_fit_decreasing`) into rows of ``T = row_length``
    tokens (:func:`packed_collate`: positions restart per document, the first label of every
    document is -100, **no** ``attention_mask``; call the model with ``use_cache=False``).
    ``cu_seqlens`` and ``num_docs`` of :func:`packed_collate` are returned too. The
    arrangement is a deterministic function of the example lengths.

    Raises:
        ValueError: no examples, an empty example, ``packing=True`` without a positive
            ``row_length``, or an example longer than ``row_length`` (apply the over-long
            policy when encoding; nothing is cut here).
    """
    if not examples:
        raise ValueError("collate_sequences needs at least one example")
    lengths = [len(ex.input_ids) for ex in examples]
    for s, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"example {s} is empty")
    if not packing:
        batch: dict = pad_collate(
            examples, pad_token_id, pad_to_multiple_of=pad_to_multiple_of, return_sequence_ids=True
        )
        batch["num_sequences"] = len(examples)
        return batch
    if isinstance(row_length, bool) or not isinstance(row_length, int) or row_length < 1:
        raise ValueError(f"packing=True needs row_length, a positive integer; got {row_length!r}")
    for s, n in enumerate(lengths):
        if n > row_length:
            raise ValueError(
                f"example {s} has {n} tokens, more than row_length={row_length}; encode with "
                "max_length <= row_length (the over-long policy truncates or drops, and counts it)"
            )
    bins = best_fit_decreasing(lengths, row_length)
    batch = packed_collate(
        [[examples[i] for i in b] for b in bins], pad_token_id, row_length=row_length, return_sequence_ids=True
    )
    # packed_collate numbers documents in flattened row order; map back to input order.
    order = torch.tensor([i for b in bins for i in b], dtype=torch.long)
    flat = batch["sequence_ids"]
    batch["sequence_ids"] = torch.where(flat >= 0, order[flat.clamp_min(0)], flat)
    batch["num_sequences"] = len(examples)
    return batch
