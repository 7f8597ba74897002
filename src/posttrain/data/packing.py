"""Packing examples into fixed-length rows.

Padding every example of a batch to the batch's longest wastes compute on pad tokens when
lengths vary. Packing concatenates several examples ("documents") into one row of
``capacity`` tokens; :func:`posttrain.data.collate.packed_collate` then keeps the documents
independent (position ids restart per document, which Hugging Face models turn into a
block-diagonal causal mask, and no label crosses a boundary).

:func:`best_fit_decreasing` decides which examples share a row; :func:`padding_stats`
measures how much either strategy pads.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass


class _Fenwick:
    """Counts per value 0..size-1, with "smallest value >= x that has a nonzero count"."""

    def __init__(self, size: int):
        self.size = size
        self.tree = [0] * (size + 1)
        self.total = 0
        self.top = 1 << size.bit_length()

    def add(self, value: int, delta: int) -> None:
        self.total += delta
        i = value + 1
        while i <= self.size:
            self.tree[i] += delta
            i += i & -i

    def prefix(self, value: int) -> int:
        """Sum of counts for values 0..value (inclusive); 0 for value < 0."""
        i, s = value + 1, 0
        while i > 0:
            s += self.tree[i]
            i -= i & -i
        return s

    def first_at_least(self, value: int) -> int | None:
        before = self.prefix(value - 1)
        if before == self.total:
            return None
        # Descend to the largest position whose prefix sum is <= before; the answer follows it.
        pos, remaining, step = 0, before, self.top
        while step:
            nxt = pos + step
            if nxt <= self.size and self.tree[nxt] <= remaining:
                pos = nxt
                remaining -= self.tree[nxt]
            step >>= 1
        return pos  # 0-based value = (1-based position pos + 1) - 1


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins whose total length is at most ``capacity``.

    Examples are placed longest first (ties in index order); each goes into the fullest open
    bin that still has room for it (ties: the bin opened first), or into a new bin. Runs in
    ``O(n log n + n log capacity)``: open bins are counted per remaining capacity in a
    Fenwick tree, which finds the smallest sufficient remaining capacity in ``O(log capacity)``.

    Returns bins in the order they were opened, each listing its example indices in the
    order they were placed. Every index appears exactly once.

    Raises:
        ValueError: ``capacity < 1``, or a length that is negative or exceeds ``capacity``
            (apply the over-long policy before packing).
    """
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
    for i, n in enumerate(lengths):
        if n < 0 or n > capacity:
            raise ValueError(
                f"example {i} has length {n}, outside [0, capacity={capacity}]; truncate or drop "
                "over-long examples before packing"
            )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    remaining: list[int] = []
    by_room: dict[int, list[int]] = {}  # remaining capacity -> heap of bin ids
    tree = _Fenwick(capacity + 1)
    for i in order:
        n = lengths[i]
        room = tree.first_at_least(n)
        if room is None:
            b = len(bins)
            bins.append([])
            remaining.append(capacity)
        else:
            b = heapq.heappop(by_room[room])
            tree.add(room, -1)
        bins[b].append(i)
        remaining[b] -= n
        heapq.heappush(by_room.setdefault(remaining[b], []), b)
        tree.add(remaining[b], 1)
    return bins


@dataclass(frozen=True)
class PaddingStats:
    """Pad-token ratios of padded batches versus packed rows for the same lengths.

    ``*_ratio`` = pad tokens / all tokens (real + pad) under that strategy.
    """

    real_tokens: int
    padded_ratio: float
    padded_rows: int
    padded_tokens: int
    packed_ratio: float
    packed_rows: int
    packed_tokens: int

    def summary(self) -> str:
        return (
            f"{self.real_tokens} real tokens: padded batches {self.padded_ratio:.1%} padding over "
            f"{self.padded_rows} rows; packed {self.packed_ratio:.1%} padding over {self.packed_rows} rows"
        )


def padding_stats(lengths: Sequence[int], capacity: int, batch_size: int) -> PaddingStats:
    """Compare padding (a) consecutive batches of ``batch_size``, each padded to its longest
    example, with (b) :func:`best_fit_decreasing` rows of exactly ``capacity`` tokens."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    lengths = list(lengths)
    real = sum(lengths)
    padded_total = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        padded_total += max(batch) * len(batch)
    rows = len(best_fit_decreasing(lengths, capacity))
    packed_total = rows * capacity

    def ratio(total: int) -> float:
        return (total - real) / total if total else 0.0

    return PaddingStats(
        real_tokens=real,
        padded_ratio=ratio(padded_total),
        padded_rows=math.ceil(len(lengths) / batch_size),
        padded_tokens=padded_total,
        packed_ratio=ratio(packed_total),
        packed_rows=rows,
        packed_tokens=packed_total,
    )
