"""Best-fit-decreasing packing and padding statistics."""

from __future__ import annotations

import math
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.data.packing import best_fit_decreasing, padding_stats


def reference_bfd(lengths, capacity):
    """Quadratic textbook version with the same tie-breaking (longest first, index order;
    fullest fitting bin, earliest opened)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, room = [], []
    for i in order:
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
        else:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def test_small_example_by_hand():
    # Sorted: 6(i1), 5(i3), 4(i0), 3(i2), 2(i4). Capacity 8.
    # 6 -> new bin A (room 2); 5 -> new bin B (room 3); 4 -> new bin C (room 4);
    # 3 -> fullest bin that fits is B (room 3 -> 0); 2 -> A (room 2 -> 0).
    assert best_fit_decreasing([4, 6, 3, 5, 2], 8) == [[1, 4], [3, 2], [0]]


def test_errors_and_edge_cases():
    assert best_fit_decreasing([], 8) == []
    assert best_fit_decreasing([8, 8], 8) == [[0], [1]]
    assert best_fit_decreasing([0, 3], 3) == [[1, 0]]
    with pytest.raises(ValueError, match="example 1 has length 9"):
        best_fit_decreasing([3, 9], 8)
    with pytest.raises(ValueError):
        best_fit_decreasing([1], 0)


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 64),
    data=st.data(),
)
def test_bfd_properties_and_reference(capacity, data):
    lengths = data.draw(st.lists(st.integers(1, capacity), max_size=40))
    bins = best_fit_decreasing(lengths, capacity)
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert len(bins) >= math.ceil(sum(lengths) / capacity)
    assert all(b for b in bins)
    assert bins == reference_bfd(lengths, capacity)


def test_bfd_scales_n_log_n():
    rng = random.Random(0)
    lengths = [rng.randint(1, 4096) for _ in range(100_000)]
    start = time.perf_counter()
    bins = best_fit_decreasing(lengths, 4096)
    elapsed = time.perf_counter() - start
    assert sum(len(b) for b in bins) == len(lengths)
    # Near-optimal on a uniform distribution, and fast (a quadratic scan would take minutes).
    assert len(bins) <= 1.02 * math.ceil(sum(lengths) / 4096) + 2
    assert elapsed < 10


def test_padding_stats_by_hand():
    # Padded, batch_size 2: [2, 6] -> 12 tokens; [4, 4] -> 8; [1] -> 1. Total 21, real 17.
    # Packed at capacity 8: BFD bins {6, 2}, {4, 4}, {1} -> 3 rows, 24 tokens.
    stats = padding_stats([2, 6, 4, 4, 1], capacity=8, batch_size=2)
    assert stats.real_tokens == 17
    assert stats.padded_rows == 3 and stats.padded_tokens == 21
    assert stats.padded_ratio == pytest.approx(4 / 21)
    assert stats.packed_rows == 3 and stats.packed_tokens == 24
    assert stats.packed_ratio == pytest.approx(7 / 24)
    assert "padding" in stats.summary()
    empty = padding_stats([], capacity=8, batch_size=2)
    assert empty.padded_ratio == empty.packed_ratio == 0.0
