"""SFT loss: note 003's masked-loss example, normalizations, accumulation, causal shift."""

import pytest
import torch
import torch.nn.functional as F

from posttrain.ops import sft_loss, token_log_probs

# Reference note 003: eight positions, only the assistant turn (last three) is learned.
CE = torch.tensor([[0.10, 2.80, 1.40, 0.20, 0.10, 1.20, 0.90, 0.40]])
MASK = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.float32)


def test_note_003_masked_example():
    loss, metrics = sft_loss(-CE, MASK)
    assert loss.item() == pytest.approx(2.50 / 3, abs=1e-6)  # 0.8333...
    assert metrics["nll_sum"].item() == pytest.approx(2.50, abs=1e-6)
    assert metrics["num_tokens"].item() == 3
    assert all(not m.requires_grad for m in metrics.values())


def test_note_003_unmasked_example():
    loss, _ = sft_loss(-CE, torch.ones_like(MASK))
    assert loss.item() == pytest.approx(7.10 / 8, abs=1e-6)  # 0.8875


def test_sum_and_constant_normalizations():
    assert sft_loss(-CE, MASK, normalization="sum")[0].item() == pytest.approx(2.50, abs=1e-6)
    loss, _ = sft_loss(-CE, MASK, normalization="constant", normalize_constant=10)
    assert loss.item() == pytest.approx(0.25, abs=1e-6)


def test_gradient_is_minus_mask_over_kept_tokens():
    lp = (-CE).clone().requires_grad_(True)
    sft_loss(lp, MASK)[0].backward()
    torch.testing.assert_close(lp.grad, -MASK / 3)


def test_metrics_are_detached_even_with_grad():
    lp = (-CE).clone().requires_grad_(True)
    loss, metrics = sft_loss(lp, MASK)
    assert loss.requires_grad
    assert not metrics["nll_sum"].requires_grad


def test_global_num_tokens_makes_accumulation_exact():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 6, generator=g)
    mask = (torch.arange(6)[None] < torch.tensor([1, 6, 2, 5])[:, None]).float()
    leaf = lp.clone().requires_grad_(True)
    full, _ = sft_loss(leaf, mask)
    (full_grad,) = torch.autograd.grad(full, leaf)

    total = 0.0
    for rows in (torch.tensor([0]), torch.tensor([1, 2]), torch.tensor([3])):  # uneven split
        part, _ = sft_loss(leaf[rows], mask[rows], num_tokens=mask.sum())
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(leaf.grad, full_grad)


def test_empty_mask_gives_zero():
    loss, metrics = sft_loss(-CE, torch.zeros_like(MASK))
    assert loss.item() == 0.0
    assert metrics["num_tokens"].item() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="tokens"):
        sft_loss(-CE, MASK, normalization="mean")
    with pytest.raises(ValueError, match="normalize_constant"):
        sft_loss(-CE, MASK, normalization="constant")


def test_matches_cross_entropy_with_causal_shift():
    """logits[:, :-1] predict labels[:, 1:]; -100 labels are dropped from numerator and count."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=g)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, 5:] = -100  # padding
    shift_labels = labels[:, 1:]
    lp = token_log_probs(logits[:, :-1], shift_labels, chunk_size=3)
    loss, metrics = sft_loss(lp, (shift_labels != -100).float())
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), shift_labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert metrics["num_tokens"].item() == 8
