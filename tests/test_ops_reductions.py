"""Masked reductions and loss aggregation: hand-computed values, GA equivalence, Dr. GRPO."""

import math

import pytest
import torch

from posttrain.ops import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    masked_mean,
    masked_normalize,
    masked_sum,
    masked_whiten,
)

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])


# ---- masked_sum / masked_mean / masked_normalize ------------------------------------------


def test_masked_sum_by_hand():
    assert masked_sum(X, M).item() == 4.0
    torch.testing.assert_close(masked_sum(X, M, dim=1), torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(masked_sum(X, M, dim=0), torch.tensor([1.0, 0.0, 3.0]))


def test_masked_mean_by_hand_and_empty_is_zero():
    assert masked_mean(X, M).item() == 2.0  # (1 + 3) / 2
    # row 1 and column 1 have no kept element: 0, not NaN
    torch.testing.assert_close(masked_mean(X, M, dim=1), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(masked_mean(X, M, dim=0), torch.tensor([1.0, 0.0, 3.0]))


def test_masked_normalize_by_hand():
    assert masked_normalize(X, M, 8.0).item() == 0.5
    torch.testing.assert_close(masked_normalize(X, M, 2.0, dim=1), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(masked_normalize(X, M, 4.0, dim=0), torch.tensor([0.25, 0.0, 0.75]))


def test_all_zero_mask_gives_zero_value_and_gradient():
    x = X.clone().requires_grad_(True)
    zero = torch.zeros_like(M)
    out = masked_mean(x, zero) + masked_mean(x, zero, dim=0).sum() + masked_sum(x, zero)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(X))


def test_inf_and_nan_at_masked_positions_do_not_leak():
    x = X.clone()
    x[0, 1], x[1, 0] = float("inf"), float("nan")
    x.requires_grad_(True)
    out = masked_mean(x, M)
    assert out.item() == 2.0
    out.backward()
    torch.testing.assert_close(x.grad, M / 2)


def test_masked_mean_accepts_bool_mask():
    assert masked_mean(X, M.bool()).item() == 2.0


# ---- masked_whiten -------------------------------------------------------------------------


def test_masked_whiten_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, population variance 2/3 -> (x - 2) / sqrt(2/3)
    s = math.sqrt(1.5)
    torch.testing.assert_close(masked_whiten(values, mask), torch.tensor([[-s, 0.0, s, 0.0]]))
    torch.testing.assert_close(
        masked_whiten(values, mask, shift_mean=False), torch.tensor([[2.0 - s, 2.0, 2.0 + s, 0.0]])
    )


def test_masked_whiten_zero_mean_unit_variance():
    g = torch.Generator().manual_seed(0)
    values = 3.0 + 5.0 * torch.randn(4, 9, generator=g)
    mask = (torch.rand(4, 9, generator=g) > 0.3).float()
    w = masked_whiten(values, mask)
    assert abs(masked_mean(w, mask).item()) < 1e-5
    assert abs(masked_mean(w * w, mask).item() - 1.0) < 1e-4
    assert torch.equal(w[mask == 0], torch.zeros(int((mask == 0).sum())))


def test_masked_whiten_constant_and_empty_are_finite():
    assert torch.equal(masked_whiten(torch.full((2, 3), 7.0), torch.ones(2, 3)), torch.zeros(2, 3))
    assert torch.equal(masked_whiten(torch.randn(2, 3), torch.zeros(2, 3)), torch.zeros(2, 3))


# ---- aggregate_loss: hand values -----------------------------------------------------------

LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
# kept: row0 {1, 2} (sum 3, n 2), row1 {5, 6, 7} (sum 18, n 3), row2 empty -> N_tok 5, N_seq 2


@pytest.mark.parametrize(
    "mode, kwargs, expected",
    [
        ("token_mean", {}, 21 / 5),
        ("seq_mean_token_mean", {}, (3 / 2 + 18 / 3) / 2),
        ("seq_mean_token_sum", {}, 21 / 2),
        ("seq_mean_token_sum_norm", {"normalize_constant": 4}, 21 / (4 * 2)),
        # explicit global counts replace the local ones
        ("token_mean", {"num_tokens": 10}, 21 / 10),
        ("seq_mean_token_mean", {"num_sequences": torch.tensor(5)}, (3 / 2 + 18 / 3) / 5),
        ("seq_mean_token_sum", {"num_sequences": 3}, 21 / 3),
        ("seq_mean_token_sum_norm", {"normalize_constant": 4, "num_sequences": 3}, 21 / 12),
    ],
)
def test_aggregate_loss_by_hand(mode, kwargs, expected):
    out = aggregate_loss(LOSS, MASK, mode, **kwargs)
    assert out.shape == ()
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_aggregate_loss_default_mode_is_token_mean():
    assert aggregate_loss(LOSS, MASK).item() == pytest.approx(21 / 5)


def test_aggregate_loss_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError, match="seq_mean_token_sum_norm"):
        aggregate_loss(LOSS, MASK, "mean")


def test_dr_grpo_mode_requires_constant():
    with pytest.raises(ValueError, match="normalize_constant"):
        aggregate_loss(LOSS, MASK, "seq_mean_token_sum_norm")


@pytest.mark.parametrize("mode", sorted(LOSS_AGGREGATIONS))
def test_zero_counts_give_zero_not_nan(mode):
    loss = LOSS.clone().requires_grad_(True)
    zero = torch.zeros_like(MASK)
    for kwargs in ({}, {"num_tokens": 0, "num_sequences": 0}):
        out = aggregate_loss(loss, zero, mode, normalize_constant=4, **kwargs)
        assert out.item() == 0.0
        (g,) = torch.autograd.grad(out, loss)
        assert torch.equal(g, torch.zeros_like(LOSS))


# ---- aggregate_loss: gradient accumulation equivalence -------------------------------------

LENGTHS = [1, 7, 3, 8, 2, 5, 0, 6]  # uneven token counts per row, one empty row
T = 8


def _ga_batch():
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).float()
    features = torch.randn(len(LENGTHS), T, 3, generator=g)
    targets = torch.randn(len(LENGTHS), T, generator=g)
    return features, targets, mask


def _per_token_loss(weight, features, targets):
    return (features @ weight - targets) ** 2


def _global_counts(mask):
    return {"num_tokens": mask.sum(), "num_sequences": (mask.sum(-1) > 0).sum()}


@pytest.mark.parametrize("mode", sorted(LOSS_AGGREGATIONS))
@pytest.mark.parametrize("num_micro", [1, 2, 4])
def test_accumulated_micro_batches_match_one_batch(mode, num_micro):
    features, targets, mask = _ga_batch()
    weight = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    counts = _global_counts(mask)

    full = aggregate_loss(_per_token_loss(weight, features, targets), mask, mode, normalize_constant=T)
    (full_grad,) = torch.autograd.grad(full, weight)

    # also w.r.t. a leaf per-token loss tensor
    leaf = _per_token_loss(weight, features, targets).detach().requires_grad_(True)
    (full_leaf_grad,) = torch.autograd.grad(
        aggregate_loss(leaf, mask, mode, normalize_constant=T), leaf
    )

    total = torch.zeros(())
    weight.grad = None
    leaf.grad = None
    for rows in torch.arange(len(LENGTHS)).chunk(num_micro):
        part = aggregate_loss(
            _per_token_loss(weight, features[rows], targets[rows]),
            mask[rows],
            mode,
            normalize_constant=T,
            **counts,
        )
        part.backward()
        aggregate_loss(leaf[rows], mask[rows], mode, normalize_constant=T, **counts).backward()
        total = total + part.detach()

    torch.testing.assert_close(total, full.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(weight.grad, full_grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(leaf.grad, full_leaf_grad, atol=1e-6, rtol=1e-6)


def test_local_counts_break_accumulation():
    """The reason for global counts: per-micro-batch token means over-weight short batches."""
    features, targets, mask = _ga_batch()
    loss = _per_token_loss(torch.tensor([0.3, -0.2, 0.5]), features, targets)
    full = aggregate_loss(loss, mask, "token_mean")
    parts = [aggregate_loss(loss[r], mask[r], "token_mean") for r in torch.arange(8).chunk(2)]
    naive = sum(parts) / 2  # average of micro-batch means, as trainers did before the fix
    assert abs(naive.item() - full.item()) > 1e-3


# ---- aggregate_loss: per-token gradient weights ----------------------------------------------


def test_dr_grpo_token_gradient_is_length_independent():
    _, _, mask = _ga_batch()
    loss = torch.rand(mask.shape, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    n_seq = 7  # rows with at least one token
    C = 16.0

    (g_norm,) = torch.autograd.grad(
        aggregate_loss(loss, mask, "seq_mean_token_sum_norm", normalize_constant=C), loss
    )
    torch.testing.assert_close(g_norm, mask / (C * n_seq))  # same for every kept token

    (g_mean,) = torch.autograd.grad(aggregate_loss(loss, mask, "seq_mean_token_mean"), loss)
    n_i = mask.sum(-1, keepdim=True)
    expected = torch.where(n_i > 0, mask / (n_i.clamp(min=1) * n_seq), torch.zeros_like(mask))
    torch.testing.assert_close(g_mean, expected)
    # GRPO's per-sequence mean gives a 1-token row 8x the per-token weight of an 8-token row
    assert g_mean[0, 0].item() == pytest.approx(8 * g_mean[3, 0].item())


# ---- layering --------------------------------------------------------------------------------


def test_ops_package_imports_torch_only():
    """posttrain.ops is pure tensor math: no transformers, numpy, I/O or config imports."""
    import ast
    import pathlib

    import posttrain.ops

    allowed = {"torch", "__future__", "collections", "math", "typing"}
    for path in pathlib.Path(posttrain.ops.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
