"""Padding and packing collators (structure; model-level equivalence is in
test_data_packing_model.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.data.collate import packed_collate, pad_collate
from posttrain.data.tokenize import IGNORE_INDEX, EncodedExample

PAD = 99


def ex(ids, n_prompt=0):
    return EncodedExample(list(ids), [IGNORE_INDEX] * n_prompt + list(ids[n_prompt:]))


def test_pad_collate_by_hand():
    batch = pad_collate([ex([1, 2, 3], 1), ex([4, 5])], PAD)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, 5, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())

    batch = pad_collate([ex([1, 2, 3])], PAD, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, PAD]] and batch["labels"][0, 3] == -100
    with pytest.raises(ValueError):
        pad_collate([], PAD)


def test_packed_collate_by_hand():
    rows = [[ex([1, 2, 3], 1), ex([4, 5])], [ex([6, 7, 8, 9])]]
    batch = packed_collate(rows, PAD, row_length=6)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, PAD], [6, 7, 8, 9, PAD, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    # First label of every document is -100; padding is -100.
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100], [-100, 7, 8, 9, -100, -100]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 6, 10, 12]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["num_docs"].tolist() == [2, 1]
    with pytest.raises(ValueError, match="more than row_length"):
        packed_collate([[ex([1, 2, 3]), ex([4, 5])]], PAD, row_length=4)


def test_packed_positions_match_transformers_document_detection():
    from transformers.masking_utils import find_packed_sequence_indices

    batch = packed_collate([[ex([1, 2, 3]), ex([4]), ex([5, 6])], [ex([7, 8])]], PAD, row_length=8)
    seq = find_packed_sequence_indices(batch["position_ids"])
    assert seq.tolist() == [[0, 0, 0, 1, 2, 2, 3, 3], [0, 0, 1, 1, 1, 1, 1, 1]]


@st.composite
def packed_rows(draw):
    row_length = draw(st.integers(1, 24))
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        docs, room = [], row_length
        while room > 0 and (not docs or draw(st.booleans())):
            n = draw(st.integers(1, room))
            ids = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
            labels = [t if draw(st.booleans()) else IGNORE_INDEX for t in ids]
            docs.append(EncodedExample(ids, labels))
            room -= n
        rows.append(docs)
    return rows, row_length


@settings(max_examples=120, deadline=None)
@given(case=packed_rows())
def test_packed_collate_properties(case):
    rows, row_length = case
    batch = packed_collate(rows, PAD, row_length=row_length)
    B = len(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (B, row_length)
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == B * row_length and all(a < b for a, b in zip(cu, cu[1:]))
    for b, docs in enumerate(rows):
        ids = batch["input_ids"][b].tolist()
        labels = batch["labels"][b].tolist()
        pos = batch["position_ids"][b].tolist()
        starts, p = [], 0
        for doc in docs:
            n = len(doc.input_ids)
            assert ids[p : p + n] == doc.input_ids  # every document, in order
            assert labels[p] == IGNORE_INDEX  # no label crosses a boundary
            assert labels[p + 1 : p + n] == doc.labels[1:]
            starts.append(p)
            p += n
        assert ids[p:] == [PAD] * (row_length - p) and labels[p:] == [IGNORE_INDEX] * (row_length - p)
        if p < row_length:
            starts.append(p)
        # Positions restart exactly at document starts (padding is its own pseudo-document).
        assert [j for j in range(row_length) if pos[j] == 0] == starts
        assert all(pos[j] == pos[j - 1] + 1 for j in range(1, row_length) if j not in starts)
        assert [c - b * row_length for c in cu if b * row_length <= c < (b + 1) * row_length] == starts
        assert batch["num_docs"][b] == len(docs)
