"""Per-token -> per-sequence reductions: padded (right/left) and packed rows, pooling modes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.ops import pool_sequences, sequence_counts, sequence_sums

NAN, INF = float("nan"), float("inf")

# Two sequences, A = [1, 2, 3] and B = [4, 5], in three layouts. Padding holds junk (inf/NaN)
# that must never leak.
RIGHT = (
    torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, 5.0, INF, NAN]]),
    torch.tensor([[0, 0, 0, -1], [1, 1, -1, -1]]),
)
LEFT = (
    torch.tensor([[NAN, 1.0, 2.0, 3.0], [INF, NAN, 4.0, 5.0]]),
    torch.tensor([[-1, 0, 0, 0], [-1, -1, 1, 1]]),
)
PACKED = (
    torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, NAN]]),
    torch.tensor([[0, 0, 0, 1, 1, -1]]),
)
LAYOUTS = {"right": RIGHT, "left": LEFT, "packed": PACKED}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sequence_sums_by_hand(layout):
    values, ids = LAYOUTS[layout]
    torch.testing.assert_close(sequence_sums(values, ids, 2), torch.tensor([6.0, 9.0]))  # 1+2+3, 4+5


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sequence_sums_gradient_is_membership(layout):
    values, ids = LAYOUTS[layout]
    leaf = values.clone().requires_grad_(True)
    out = sequence_sums(leaf, ids, 2)
    (out * torch.tensor([10.0, 100.0])).sum().backward()
    expected = torch.where(ids == 0, 10.0, torch.where(ids == 1, 100.0, 0.0))
    assert torch.equal(leaf.grad, expected)  # padding: exactly 0, not NaN


def test_packed_row_with_several_sequences_and_two_rows():
    # row 0 packs sequences 0, 1, 2; row 1 packs 3 and 4 (ids need not follow row order)
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0], [7.0, 8.0, 9.0, 10.0, 0.0, 0.0, 0.0]])
    ids = torch.tensor([[0, 0, 2, 2, 2, 1, -1], [4, 4, 4, 3, -1, -1, -1]])
    torch.testing.assert_close(
        sequence_sums(values, ids, 5), torch.tensor([3.0, 6.0, 12.0, 10.0, 24.0])
    )  # 1+2, 6, 3+4+5, 10, 7+8+9
    torch.testing.assert_close(
        pool_sequences(values, ids, 5, mode="last"), torch.tensor([2.0, 6.0, 5.0, 10.0, 9.0])
    )
    assert sequence_counts(torch.ones_like(values), ids, 5).tolist() == [2, 1, 3, 1, 3]


def test_sequence_with_no_position_sums_to_zero():
    values, ids = RIGHT
    torch.testing.assert_close(sequence_sums(values, ids, 3), torch.tensor([6.0, 9.0, 0.0]))


def test_sequence_sums_keeps_float64_and_upcasts_bf16():
    values, ids = RIGHT
    assert sequence_sums(values.double(), ids, 2).dtype == torch.float64
    assert sequence_sums(torch.nan_to_num(values).bfloat16(), ids, 2).dtype == torch.float32


def test_sequence_counts_by_hand():
    # response mask: the last two tokens of A, both tokens of B; padding never counts
    _, ids = RIGHT
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    counts = sequence_counts(mask, ids, 2)
    assert counts.dtype == torch.long and counts.tolist() == [2, 2]


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        sequence_sums(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="integer"):
        sequence_sums(torch.zeros(2, 3), torch.zeros(2, 3), 1)


# ---- pooling ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_pool_last_is_the_final_token_in_every_layout(layout):
    values, ids = LAYOUTS[layout]
    torch.testing.assert_close(pool_sequences(values, ids, 2, mode="last"), torch.tensor([3.0, 5.0]))


def test_pool_mean_over_response_tokens():
    values, ids = LEFT
    # A's response is its last two tokens (2, 3); B's response is both (4, 5)
    token_mask = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 1]])  # the 1 at [1, 0] is padding (id -1)
    out = pool_sequences(values, ids, 2, mode="mean", token_mask=token_mask)
    torch.testing.assert_close(out, torch.tensor([2.5, 4.5]))


def test_pool_eos_takes_the_last_eos_inside_the_sequence():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    # sequence 0 has EOS at positions 1 and 3 (multi-turn) -> 4; sequence 1 at 5 -> 6
    eos = torch.tensor([[0, 1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    torch.testing.assert_close(
        pool_sequences(values, ids, 2, mode="eos", eos_mask=eos), torch.tensor([4.0, 6.0])
    )


def test_pool_gradient_reaches_only_the_pooled_positions():
    values, ids = PACKED
    leaf = torch.nan_to_num(values).requires_grad_(True)
    pool_sequences(leaf, ids, 2, mode="last").sum().backward()
    assert leaf.grad.tolist() == [[0.0, 0.0, 1.0, 0.0, 1.0, 0.0]]
    leaf.grad = None
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    pool_sequences(leaf, ids, 2, mode="mean", token_mask=mask).sum().backward()
    torch.testing.assert_close(leaf.grad, torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.5, 0.0]]))


def test_pool_sequence_without_eligible_position_names_it():
    values, ids = RIGHT
    with pytest.raises(ValueError, match="sequence 2"):
        pool_sequences(values, ids, 3, mode="last")  # sequence 2 has no token at all
    with pytest.raises(ValueError, match="sequence 1 .*'mean'"):
        pool_sequences(values, ids, 2, mode="mean", token_mask=torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="sequence 0 .*'eos'"):
        pool_sequences(values, ids, 2, mode="eos", eos_mask=torch.tensor([[0, 0, 0, 1], [0, 1, 0, 0]]))


def test_pool_bad_arguments():
    values, ids = RIGHT
    with pytest.raises(ValueError, match="'last', 'mean', 'eos'"):
        pool_sequences(values, ids, 2, mode="max")
    with pytest.raises(ValueError, match="token_mask"):
        pool_sequences(values, ids, 2, mode="mean")
    with pytest.raises(ValueError, match="eos_mask"):
        pool_sequences(values, ids, 2, mode="eos")


# ---- property: vectorized == Python loop --------------------------------------------------


@st.composite
def _layouts(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 7))
    S = draw(st.integers(1, 6))
    ids = draw(st.lists(st.integers(-1, S - 1), min_size=B * T, max_size=B * T))
    vals = draw(st.lists(st.floats(-100, 100, width=32), min_size=B * T, max_size=B * T))
    mask = draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))
    return (
        torch.tensor(vals, dtype=torch.float64).view(B, T),
        torch.tensor(ids).view(B, T),
        torch.tensor(mask).view(B, T),
        S,
    )


@settings(max_examples=200, deadline=None)
@given(_layouts())
def test_sums_counts_and_last_match_a_python_loop(layout):
    values, ids, mask, S = layout
    sums, counts, last = [0.0] * S, [0] * S, [None] * S
    B, T = ids.shape
    for b in range(B):
        for t in range(T):
            s = int(ids[b, t])
            if s < 0:
                continue
            sums[s] += float(values[b, t])
            counts[s] += int(mask[b, t])
            last[s] = float(values[b, t])  # row-major order: the final visit is the last position
    torch.testing.assert_close(sequence_sums(values, ids, S), torch.tensor(sums, dtype=torch.float64))
    assert sequence_counts(mask, ids, S).tolist() == counts
    if all(v is not None for v in last):
        torch.testing.assert_close(
            pool_sequences(values, ids, S, mode="last"), torch.tensor(last, dtype=torch.float64)
        )
    else:
        with pytest.raises(ValueError, match="no position eligible"):
            pool_sequences(values, ids, S, mode="last")
