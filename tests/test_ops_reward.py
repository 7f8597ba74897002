"""Reward-model losses: BT (with margin), hinge, MSE, centering, listwise and its targets."""

import math

import pytest
import torch

from posttrain.ops import (
    REWARD_LOSSES,
    bradley_terry_loss,
    get_reward_loss,
    listwise_loss,
    reward_centering,
    reward_hinge_loss,
    reward_mse_loss,
    softmax_targets,
    top1_targets,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **kw)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# three pairs: gaps d = r_w − r_l = 1, 0, −2
RW, RL = t(2.0, 0.0, 1.0), t(1.0, 0.0, 3.0)


def test_bt_by_hand():
    # −log σ(d) = log(1 + e^−d): log(1 + e^−1) = 0.313262, ln 2, log(1 + e^2) = 2.126928
    losses, m = bradley_terry_loss(RW, RL)
    close(losses, [0.31326168751822286, math.log(2), 2.1269280110429727])
    close(m["margin"], [1.0, 0.0, -2.0])
    close(m["accuracy"], [1.0, 0.0, 0.0])
    close(m["chosen_rewards"], RW)
    close(m["rejected_rewards"], RL)
    assert all(not v.requires_grad for v in m.values())


def test_bt_with_margin_by_hand_and_gradient():
    # m = [0.5, −1, 0]: d − m = 0.5, 1, −2 -> log(1 + e^−0.5) = 0.474077, 0.313262, 2.126928
    rw = RW.clone().requires_grad_(True)
    rl = RL.clone().requires_grad_(True)
    margin = t(0.5, -1.0, 0.0)
    losses, m = bradley_terry_loss(rw, rl, margin=margin)
    close(losses, [0.47407698418010663, 0.31326168751822286, 2.1269280110429727])
    close(m["margin"], [1.0, 0.0, -2.0])  # the reported margin is the raw gap r_w − r_l
    gw, gl = torch.autograd.grad(losses.sum(), (rw, rl))
    expected = [-sigmoid(-0.5), -sigmoid(-1.0), -sigmoid(2.0)]  # −σ(m − d)
    close(gw, expected)
    close(gl, [-x for x in expected])


def test_hinge_by_hand():
    # max(0, μ − d): μ = 1 -> 0, 1, 3;  μ = 2 -> 1, 2, 4
    close(reward_hinge_loss(RW, RL)[0], [0.0, 1.0, 3.0])
    close(reward_hinge_loss(RW, RL, hinge_margin=2.0)[0], [1.0, 2.0, 4.0])
    rw = RW.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(reward_hinge_loss(rw, RL)[0].sum(), rw)
    close(g, [0.0, -1.0, -1.0])  # the satisfied pair gets no gradient


def test_mse_by_hand():
    # (d − t)²: t = 1 -> 0, 1, 9;  t = 0.5 -> 0.25, 0.25, 6.25
    close(reward_mse_loss(RW, RL)[0], [0.0, 1.0, 9.0])
    close(reward_mse_loss(RW, RL, target_gap=0.5)[0], [0.25, 0.25, 6.25])


def test_centering_by_hand():
    # coef (r_w + r_l)² = 0.01 · [9, 0, 16]
    close(reward_centering(RW, RL, 0.01), [0.09, 0.0, 0.16])
    rw = RW.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(reward_centering(rw, RL, 0.01).sum(), rw)
    close(g, [0.06, 0.0, 0.08])  # 2·coef·(r_w + r_l)


def test_pairwise_losses_ignore_a_common_offset():
    for fn in REWARD_LOSSES.values():
        torch.testing.assert_close(fn(RW, RL)[0], fn(RW + 7.0, RL + 7.0)[0])


def test_registry_and_bad_arguments():
    assert set(REWARD_LOSSES) == {"bt", "hinge", "mse"}
    assert get_reward_loss("bt") is bradley_terry_loss
    with pytest.raises(ValueError, match="'bt', 'hinge', 'mse'"):
        get_reward_loss("listwise")
    with pytest.raises(ValueError, match="margin"):
        reward_hinge_loss(RW, RL, margin=t(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="margin"):
        reward_mse_loss(RW, RL, margin=t(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="hinge_margin"):
        reward_hinge_loss(RW, RL, hinge_margin=0.0)
    with pytest.raises(ValueError, match="coef"):
        reward_centering(RW, RL, -1.0)
    with pytest.raises(ValueError, match="temperature"):
        softmax_targets(t(1.0, 2.0)[None], 0.0)


# ---- listwise --------------------------------------------------------------------------------

LN3 = math.log(3)


def test_listwise_one_hot_by_hand():
    # softmax([0, ln 3, 0]) = [1, 3, 1] / 5; one-hot on 1 -> −ln(3/5) = ln(5/3) = 0.510826
    rewards = t(0.0, LN3, 0.0)[None].requires_grad_(True)
    target = top1_targets(t(1.0, 9.0, 2.0)[None])
    close(target, [[0.0, 1.0, 0.0]])
    losses, m = listwise_loss(rewards, target)
    close(losses, [math.log(5 / 3)])
    close(m["accuracy"], [1.0])
    (g,) = torch.autograd.grad(losses.sum(), rewards)
    close(g, [[0.2, 0.6 - 1.0, 0.2]])  # softmax − target


def test_listwise_fractional_tie_targets_by_hand():
    # tie between candidates 0 and 1 -> targets [½, ½, 0]
    # loss = −½ ln(1/5) − ½ ln(3/5) = ln 5 − ½ ln 3 = 1.060132
    target = top1_targets(t(2.0, 2.0, 1.0)[None])
    close(target, [[0.5, 0.5, 0.0]])
    losses, _ = listwise_loss(t(0.0, LN3, 0.0)[None], target)
    close(losses, [math.log(5) - 0.5 * LN3])


def test_listwise_ragged_mask_by_hand():
    # row 0: K = 2 of 3 (the 100 is masked): softmax([0, ln 3]) = [¼, ¾]; target on 1 -> −ln ¾
    # row 1: all 3 valid, target on 0: softmax([0, 0, ln 2]) = [¼, ¼, ½] -> −ln ¼ = ln 4
    rewards = t(0.0, LN3, 100.0, 0.0, 0.0, math.log(2)).view(2, 3).requires_grad_(True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    target = top1_targets(t(0.0, 1.0, 5.0, 3.0, 1.0, 2.0).view(2, 3), mask)
    close(target, [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    losses, m = listwise_loss(rewards, target, mask)
    close(losses, [-math.log(0.75), math.log(4)])
    close(m["accuracy"], [1.0, 0.0])  # row 1: the model ranks candidate 2 first, target says 0
    (g,) = torch.autograd.grad(losses.sum(), rewards)
    close(g, [[0.25, -0.25, 0.0], [-0.75, 0.25, 0.5]])  # masked entry: exactly 0


def test_listwise_with_two_candidates_is_bradley_terry():
    g = torch.Generator().manual_seed(0)
    rw, rl = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    target = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(6, 2)
    losses, _ = listwise_loss(torch.stack([rw, rl], -1), target)
    torch.testing.assert_close(losses, bradley_terry_loss(rw, rl)[0])


def test_listwise_fully_masked_row_is_zero_not_nan():
    rewards = t(1.0, 2.0, 3.0, 4.0).view(2, 2).requires_grad_(True)
    mask = torch.tensor([[False, False], [True, True]])
    target = top1_targets(rewards, mask)
    close(target, [[0.0, 0.0], [0.0, 1.0]])
    losses, m = listwise_loss(rewards, target, mask)
    assert losses[0].item() == 0.0 and m["accuracy"][0].item() == 0.0
    (g,) = torch.autograd.grad(losses.sum(), rewards)
    assert torch.isfinite(g).all() and g[0].tolist() == [0.0, 0.0]


def test_softmax_targets_by_hand():
    # softmax([0, ln 3] / T): T = 1 -> [¼, ¾];  T = ½ -> [1, 9] / 10
    scores = t(0.0, LN3)[None]
    close(softmax_targets(scores, 1.0), [[0.25, 0.75]])
    close(softmax_targets(scores, 0.5), [[0.1, 0.9]])
    # masked entries get 0 and are left out of the normalization
    masked = softmax_targets(t(0.0, 50.0, LN3)[None], 1.0, torch.tensor([[True, False, True]]))
    close(masked, [[0.25, 0.0, 0.75]])
    # low temperature approaches top-1 with ties shared
    close(softmax_targets(t(2.0, 2.0, 1.0)[None], 1e-3), [[0.5, 0.5, 0.0]])


def test_targets_are_detached():
    scores = t(1.0, 2.0)[None].requires_grad_(True)
    assert not top1_targets(scores).requires_grad
    assert not softmax_targets(scores, 1.0).requires_grad
