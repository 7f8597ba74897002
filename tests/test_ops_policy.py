"""Policy losses, the value loss and truncated importance weights: hand-derived values and
gradients, the shared on-policy gradient −A, masking, and the registry."""

import inspect
import math

import pytest
import torch

from posttrain.ops import (
    POLICY_LOSSES,
    aggregate_loss,
    cispo_loss,
    get_policy_loss,
    gspo_loss,
    policy_gradient_loss,
    ppo_clip_loss,
    raw_advantages,
    truncated_importance_weights,
    value_loss,
)

NAN = float("nan")


def tokens(ratios, old=-1.0):
    """(1, T) log-probs with the given ratios π_θ/π_old against old log-probs ``old``."""
    old_lp = torch.full((1, len(ratios)), old)
    lp = (old_lp + torch.tensor(ratios).log()).requires_grad_()
    return lp, old_lp


def loss_and_grad(fn, lp, old, adv, mask=None, **kw):
    mask = torch.ones_like(lp.detach()) if mask is None else mask
    loss, metrics = fn(lp, old, adv, mask, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    return loss.detach(), grad, metrics


# ---- PPO clip ------------------------------------------------------------------------------------


def test_ppo_clip_by_hand():
    # ε = 0.2, band [0.8, 1.2]; per token (ratio, A):
    #   (1.5, +1): max(−1.5, −1.2) = −1.2    clip acts (high)  grad 0
    #   (0.5, +1): max(−0.5, −0.8) = −0.5    no clip           grad −A·ρ = −0.5
    #   (0.5, −1): max( 0.5,  0.8) =  0.8    clip acts (low)   grad 0
    #   (1.5, −1): max( 1.5,  1.2) =  1.5    no clip           grad −A·ρ = +1.5
    #   (1.1, +2): −2.2                      inside the band   grad −2.2
    lp, old = tokens([1.5, 0.5, 0.5, 1.5, 1.1])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]])
    loss, grad, m = loss_and_grad(ppo_clip_loss, lp, old, adv, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.5, 0.8, 1.5, -2.2]]))
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.5, 0.0, 1.5, -2.2]]))
    torch.testing.assert_close(m["clipped_high"], torch.tensor([[1.0, 0, 0, 0, 0]]))
    torch.testing.assert_close(m["clipped_low"], torch.tensor([[0, 0, 1.0, 0, 0]]))
    torch.testing.assert_close(m["ratio"], torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1]]))
    assert torch.equal(m["dual_clipped"], torch.zeros(1, 5))
    # approx_kl is k3 = (ρ − 1) − log ρ
    k3 = torch.tensor([0.5 - math.log(1.5), -0.5 - math.log(0.5)])
    torch.testing.assert_close(m["approx_kl"][0, :2], k3)


def test_ppo_clip_higher():
    # ε = 0.2, ε_h = 0.28: band [0.8, 1.28]
    #   (1.25, +1): symmetric ε would clip at 1.2 (loss −1.2, grad 0); clip-higher keeps
    #               loss −1.25, grad −1.25
    #   (0.75, −1): the lower side is unchanged: max(0.75, 0.8) = 0.8, grad 0
    #   (1.3,  +1): above 1.28: −1.28, grad 0
    lp, old = tokens([1.25, 0.75, 1.3])
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    loss, grad, m = loss_and_grad(ppo_clip_loss, lp, old, adv, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, -1.2]]))
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.0]]))
    loss, grad, m = loss_and_grad(ppo_clip_loss, lp, old, adv, clip_eps=0.2, clip_eps_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.25, 0.8, -1.28]]))
    torch.testing.assert_close(grad, torch.tensor([[-1.25, 0.0, 0.0]]))
    torch.testing.assert_close(m["clipped_high"], torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(m["clipped_low"], torch.tensor([[0.0, 1.0, 0.0]]))


def test_ppo_dual_clip():
    # c = 3, A < 0: loss = min(max(−Aρ, −A clip(ρ)), −cA)
    #   (4.0, −1): max(4, 1.2) = 4 -> min(4, 3) = 3, grad 0 (dual clip acts)
    #   (2.0, −1): max(2, 1.2) = 2 < 3 -> 2, grad −A·ρ = 2
    #   (4.0, +2): A > 0 is untouched: max(−8, −2.4) = −2.4, grad 0 (ordinary clip)
    #   (4.0, −0.5): bound c|A| = 1.5 -> 1.5
    lp, old = tokens([4.0, 2.0, 4.0, 4.0])
    adv = torch.tensor([[-1.0, -1.0, 2.0, -0.5]])
    loss, grad, m = loss_and_grad(ppo_clip_loss, lp, old, adv, clip_eps=0.2, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[3.0, 2.0, -2.4, 1.5]]))
    torch.testing.assert_close(grad, torch.tensor([[0.0, 2.0, 0.0, 0.0]]))
    torch.testing.assert_close(m["dual_clipped"], torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    # without the dual clip the first token's loss is unbounded in ρ
    loss, _, _ = loss_and_grad(ppo_clip_loss, lp, old, adv, clip_eps=0.2)
    assert loss[0, 0].item() == pytest.approx(4.0)


def test_ppo_argument_checks():
    lp, old = tokens([1.0])
    adv = torch.ones(1)
    for kw in ({"clip_eps": 0.0}, {"clip_eps": float("inf")}, {"clip_eps": float("nan")}, {"clip_eps_high": -0.1},
               {"dual_clip": 1.0}):
        with pytest.raises(ValueError):
            ppo_clip_loss(lp, old, adv, torch.ones(1, 1), **kw)
    with pytest.raises(ValueError, match="advantages must have shape"):
        ppo_clip_loss(lp, old, torch.ones(2), torch.ones(1, 1))


# ---- GSPO ----------------------------------------------------------------------------------------


def test_gspo_by_hand():
    # ε = 3e-4, ε_h = 4e-4: band [0.9997, 1.0004]. Rows (token log-ratios, A):
    #   row 0: (0.1, −0.3) mean −0.1, s = e^−0.1 = 0.904837, A = +1: below the band but A > 0:
    #          loss = max(−s, −0.9997) = −s (unclipped); token grad −A·s = −0.904837
    #   row 1: same ratios, A = −1: loss = max(s, 0.9997) = 0.9997 (clipped low), grad 0
    #   row 2: (2e−4, 4e−4) mean 3e−4, s = 1.00030005, inside the band, A = 2: −2s, grad −2s
    #   row 3: (1e−3, 1e−3), s = 1.0010005 > 1.0004, A = +1: −1.0004 (clipped high), grad 0
    log_ratio = torch.tensor([[0.1, -0.3], [0.1, -0.3], [2e-4, 4e-4], [1e-3, 1e-3]], dtype=torch.float64)
    old = torch.full((4, 2), -2.0, dtype=torch.float64)
    lp = (old + log_ratio).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 2.0, 1.0], dtype=torch.float64)
    loss, grad, m = loss_and_grad(gspo_loss, lp, old, adv)
    s0, s2 = math.exp(-0.1), math.exp(3e-4)
    want = torch.tensor([[-s0] * 2, [0.9997] * 2, [-2 * s2] * 2, [-1.0004] * 2], dtype=torch.float64)
    torch.testing.assert_close(loss, want)
    want_grad = torch.tensor([[-s0] * 2, [0.0] * 2, [-2 * s2] * 2, [0.0] * 2], dtype=torch.float64)
    torch.testing.assert_close(grad, want_grad)
    torch.testing.assert_close(m["clipped_low"][:, 0], torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(m["clipped_high"][:, 0], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(m["ratio"][:, 1], torch.tensor([s0, s0, s2, math.exp(1e-3)], dtype=torch.float64))


def test_gspo_token_form_has_the_sequence_objective_gradient():
    """Averaged per response, the per-token tensor's value and gradient are the paper's
    sequence objective −min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t log ρ_it)."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * 1e-3).requires_grad_()
    mask = (torch.arange(T)[None] < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]).double()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    loss, m = gspo_loss(lp, old, adv, mask)
    assert 0 < m["clipped_low"][:, 0].sum() + m["clipped_high"][:, 0].sum() < B  # a mix of both
    ours = aggregate_loss(loss, mask, "seq_mean_token_mean")
    (g_ours,) = torch.autograd.grad(ours, lp)

    lp2 = lp.detach().clone().requires_grad_()
    s = torch.exp(((lp2 - old) * mask).sum(-1) / mask.sum(-1))
    seq = torch.maximum(-adv * s, -adv * s.clamp(1 - 3e-4, 1 + 4e-4))
    ref = seq.mean()
    (g_ref,) = torch.autograd.grad(ref, lp2)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


# ---- CISPO ---------------------------------------------------------------------------------------


def test_cispo_by_hand():
    # loss = −sg(clip(ρ, 1 − ε, 1 + ε_h)) · A · log π; log π = log(0.4·ρ) here; grad = −w·A
    #   (1.5, +1): w = min(1.5, 1.28) = 1.28  -> grad −1.28 (truncated, NOT zeroed as in PPO)
    #   (0.1, −1): no lower bound by default: w = 0.1 -> grad +0.1
    #   (1.1, +2): w = 1.1 -> grad −2.2
    lp, old = tokens([1.5, 0.1, 1.1], old=math.log(0.4))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, grad, m = loss_and_grad(cispo_loss, lp, old, adv)
    torch.testing.assert_close(grad, torch.tensor([[-1.28, 0.1, -2.2]]))
    want = -torch.tensor([1.28, 0.1, 1.1]) * adv[0] * torch.tensor([0.6, 0.04, 0.44]).log()
    torch.testing.assert_close(loss, want[None])
    torch.testing.assert_close(m["clipped_high"], torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(m["clipped_low"], torch.tensor([[0.0, 0.0, 0.0]]))
    # with a lower bound ε = 0.2 the second weight becomes 0.8
    loss, grad, m = loss_and_grad(cispo_loss, lp, old, adv, clip_eps=0.2, clip_eps_high=0.28)
    torch.testing.assert_close(grad, torch.tensor([[-1.28, 0.8, -2.2]]))
    torch.testing.assert_close(m["clipped_low"], torch.tensor([[0.0, 1.0, 0.0]]))


# ---- naive policy gradient -----------------------------------------------------------------------


def test_policy_gradient_by_hand():
    # loss = −A log π: π = 0.25, A = 2 -> 2 ln 4 = 2.7726, grad −2
    lp = torch.tensor([[math.log(0.25), math.log(0.5)]], requires_grad=True)
    loss, grad, m = loss_and_grad(policy_gradient_loss, lp, None, torch.tensor([2.0]))
    torch.testing.assert_close(loss, torch.tensor([[2 * math.log(4), 2 * math.log(2)]]))
    torch.testing.assert_close(grad, torch.tensor([[-2.0, -2.0]]))
    assert torch.equal(m["ratio"], torch.ones(1, 2)) and torch.equal(m["approx_kl"], torch.zeros(1, 2))
    # with raw rewards as advantages (estimator "none"): reward 3 and a NaN reward
    rewards = torch.tensor([3.0, NAN])
    adv, _ = raw_advantages(rewards, None, group_size=1)
    lp = torch.log(torch.tensor([[0.5], [0.5]])).requires_grad_()
    loss, grad, _ = loss_and_grad(policy_gradient_loss, lp, None, adv)
    torch.testing.assert_close(loss, torch.tensor([[3 * math.log(2)], [0.0]]))
    torch.testing.assert_close(grad, torch.tensor([[-3.0], [0.0]]))


# ---- shared properties ---------------------------------------------------------------------------


LOSS_CASES = [
    ("pg", {}),
    ("ppo_clip", {}),
    ("ppo_clip", {"clip_eps": 0.1, "clip_eps_high": 0.28, "dual_clip": 3.0}),
    ("gspo", {}),
    ("cispo", {}),
    ("cispo", {"clip_eps": 0.2, "clip_eps_high": 5.0}),
]


@pytest.mark.parametrize("name,kw", LOSS_CASES)
@pytest.mark.parametrize("adv_shape", ["B", "B1", "BT"])
def test_on_policy_gradient_is_minus_advantage(name, kw, adv_shape):
    """At ρ = 1 every loss is the policy gradient: d loss[b,t] / d log π[b,t] = −A[b,t]."""
    g = torch.Generator().manual_seed(3)
    B, T = 4, 6
    lp = (-torch.rand(B, T, generator=g) * 4).requires_grad_()
    old = lp.detach().clone()
    mask = (torch.arange(T)[None] < torch.tensor([6, 2, 4, 0])[:, None]).float()
    shape = {"B": (B,), "B1": (B, 1), "BT": (B, T)}[adv_shape]
    adv = torch.randn(*shape, generator=g)
    fn = get_policy_loss(name).fn
    loss, metrics = fn(lp, old, adv, mask, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    A = torch.broadcast_to(adv.reshape(B, -1), (B, T))
    torch.testing.assert_close(grad, -A * mask)
    assert torch.equal(metrics["clipped_low"], torch.zeros(B, T))
    assert torch.equal(metrics["clipped_high"], torch.zeros(B, T))
    torch.testing.assert_close(metrics["approx_kl"], torch.zeros(B, T))
    torch.testing.assert_close(metrics["ratio"], mask)
    for value in metrics.values():
        assert not value.requires_grad and value.shape == (B, T)


def test_gspo_on_policy_gradient_per_response_is_minus_a_over_length():
    # the paper's normalization (mean over the response's tokens): −A_i / |y_i| per token
    lp = (-torch.rand(2, 4, generator=torch.Generator().manual_seed(0))).requires_grad_()
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    adv = torch.tensor([2.0, -1.0])
    loss, _ = gspo_loss(lp, lp.detach().clone(), adv, mask)
    (grad,) = torch.autograd.grad(aggregate_loss(loss, mask, "seq_mean_token_mean") * 2, lp)
    torch.testing.assert_close(grad, torch.tensor([[-0.5] * 4, [0.5, 0.5, 0.0, 0.0]]))


@pytest.mark.parametrize("name,kw", LOSS_CASES)
def test_masked_positions_are_inert(name, kw):
    """NaN / inf at masked positions: loss and metrics 0 there, finite gradients, and the kept
    positions unchanged."""
    g = torch.Generator().manual_seed(5)
    B, T = 3, 5
    mask = (torch.arange(T)[None] < torch.tensor([5, 3, 1])[:, None]).float()
    lp0 = -torch.rand(B, T, generator=g) * 2
    old0 = lp0 + torch.randn(B, T, generator=g) * 0.3
    adv0 = torch.randn(B, T, generator=g)
    fn = get_policy_loss(name).fn
    clean_lp = lp0.clone().requires_grad_()
    clean, clean_m = fn(clean_lp, old0, adv0, mask, **kw)
    (clean_grad,) = torch.autograd.grad(aggregate_loss(clean, mask), clean_lp)

    pad = mask == 0
    lp = lp0.masked_fill(pad, -float("inf")).requires_grad_()
    loss, metrics = fn(lp, old0.masked_fill(pad, NAN), adv0.masked_fill(pad, NAN), mask, **kw)
    (grad,) = torch.autograd.grad(aggregate_loss(loss, mask), lp)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.equal(loss[pad], torch.zeros(int(pad.sum())))
    assert torch.equal(grad[pad], torch.zeros(int(pad.sum())))
    torch.testing.assert_close(loss, clean)
    torch.testing.assert_close(grad, clean_grad)
    for key, value in metrics.items():
        assert torch.equal(value[pad], torch.zeros(int(pad.sum()))), key
        torch.testing.assert_close(value, clean_m[key])


def test_extreme_log_ratio_does_not_overflow():
    lp, old = torch.tensor([[0.0, -200.0]], requires_grad=True), torch.tensor([[-200.0, 0.0]])
    for name, loss in POLICY_LOSSES.items():
        out, metrics = loss.fn(lp, old, torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2))
        (grad,) = torch.autograd.grad(out.sum(), lp)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), name
        assert all(torch.isfinite(v).all() for v in metrics.values()), name


# ---- value loss ----------------------------------------------------------------------------------


def test_value_loss_by_hand():
    # ε = 0.2; per token (V, V_old, R):
    #   (1.5, 1.0, 2.0): (V−R)² = 0.25; V_clip = 1.2, (V_clip−R)² = 0.64 -> ½·0.64 = 0.32, clipped, grad 0
    #   (1.1, 1.0, 2.0): V_clip = V: ½·0.81 = 0.405, grad V − R = −0.9
    #   (2.5, 2.0, 1.0): (V−R)² = 2.25; V_clip = 2.2, 1.44 -> ½·2.25 = 1.125, not clipped, grad 1.5
    values = torch.tensor([[1.5, 1.1, 2.5]], requires_grad=True)
    old, ret = torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([[2.0, 2.0, 1.0]])
    loss, m = value_loss(values, old, ret, torch.ones(1, 3), clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss.sum(), values)
    torch.testing.assert_close(loss.detach(), torch.tensor([[0.32, 0.405, 1.125]]))
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.9, 1.5]]))
    torch.testing.assert_close(m["value_clipped"], torch.tensor([[1.0, 0.0, 0.0]]))
    # unclipped: ½ (V − R)²; old_values may be None; masked positions give 0
    loss, m = value_loss(values, None, ret, torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(loss.detach(), torch.tensor([[0.125, 0.405, 0.0]]))
    assert torch.equal(m["value_clipped"], torch.zeros(1, 3))
    with pytest.raises(ValueError, match="old_values"):
        value_loss(values, None, ret, torch.ones(1, 3), clip_eps=0.2)


# ---- truncated importance sampling ---------------------------------------------------------------


def test_truncated_importance_weights_by_hand():
    # log π_old − log π_rollout per token: row 0 (0.1, −0.2, ln 3), row 1 (0.1, −0.3, pad)
    rollout = torch.full((2, 3), -1.0)
    diff = torch.tensor([[0.1, -0.2, math.log(3.0)], [0.1, -0.3, 7.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    old = rollout + diff
    # token level, cap 2: w = (e^0.1, e^−0.2, min(3, 2) = 2), (e^0.1, e^−0.3, 0)
    w, m = truncated_importance_weights(old, rollout, mask, cap=2.0)
    e = math.exp
    torch.testing.assert_close(w, torch.tensor([[e(0.1), e(-0.2), 2.0], [e(0.1), e(-0.3), 0.0]]))
    torch.testing.assert_close(m["is_ratio"], torch.tensor([[e(0.1), e(-0.2), 3.0], [e(0.1), e(-0.3), 0.0]]))
    torch.testing.assert_close(m["logprob_abs_diff"], torch.tensor([[0.1, 0.2, math.log(3)], [0.1, 0.3, 0.0]]))
    torch.testing.assert_close(m["is_capped"], torch.tensor([[0.0, 0, 1], [0, 0, 0]]))
    # sequence level: row 0: exp(0.1 − 0.2 + ln 3) = 3 e^−0.1 = 2.7145 -> capped at 2 on every
    # token; row 1: exp(−0.2) = 0.8187 on its two tokens (the padded 7.0 is ignored)
    w, m = truncated_importance_weights(old, rollout, mask, cap=2.0, level="sequence")
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0, 2.0], [e(-0.2), e(-0.2), 0.0]]))
    torch.testing.assert_close(m["is_ratio"][0], torch.full((3,), 3 * e(-0.1)))
    torch.testing.assert_close(m["is_capped"], torch.tensor([[1.0, 1, 1], [0, 0, 0]]))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="level"):
        truncated_importance_weights(old, rollout, mask, level="batch")
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(old, rollout, mask, cap=0.0)
    # masked IS rejects instead of truncating: the token whose ratio (3) exceeds the cap gets weight 0,
    # the others keep their ratio; at the sequence level row 0 (ratio 2.7145 > 2) is left out whole
    w, _ = truncated_importance_weights(old, rollout, mask, cap=2.0, mode="mask")
    torch.testing.assert_close(w, torch.tensor([[e(0.1), e(-0.2), 0.0], [e(0.1), e(-0.3), 0.0]]))
    w, _ = truncated_importance_weights(old, rollout, mask, cap=2.0, level="sequence", mode="mask")
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [e(-0.2), e(-0.2), 0.0]]))
    with pytest.raises(ValueError, match="mode"):
        truncated_importance_weights(old, rollout, mask, mode="clip")


def test_truncated_weights_are_detached_and_one_when_equal():
    lp = torch.randn(2, 4, requires_grad=True)
    w, _ = truncated_importance_weights(lp, lp.detach().clone(), torch.ones(2, 4))
    assert not w.requires_grad and torch.equal(w, torch.ones(2, 4))


# ---- registry ------------------------------------------------------------------------------------


def test_policy_loss_registry():
    assert set(POLICY_LOSSES) == {"pg", "ppo_clip", "gspo", "cispo"}
    assert POLICY_LOSSES["ppo_clip"].hyperparameters == ("clip_eps", "clip_eps_high", "dual_clip")
    assert POLICY_LOSSES["gspo"].hyperparameters == ("clip_eps", "clip_eps_high")
    assert POLICY_LOSSES["cispo"].hyperparameters == ("clip_eps", "clip_eps_high")
    assert POLICY_LOSSES["pg"].hyperparameters == ()
    assert {n for n, p in POLICY_LOSSES.items() if p.needs_old_log_probs} == {"ppo_clip", "gspo", "cispo"}
    assert {n for n, p in POLICY_LOSSES.items() if p.sequence_level} == {"gspo"}
    for name, loss in POLICY_LOSSES.items():
        assert loss.name == name and get_policy_loss(name) is loss
        params = inspect.signature(loss.fn).parameters
        assert list(params)[:4] == ["log_probs", "old_log_probs", "advantages", "mask"]
        keyword_only = tuple(p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY)
        assert keyword_only == loss.hyperparameters, name
    with pytest.raises(ValueError, match="valid losses"):
        get_policy_loss("grpo")


@pytest.mark.parametrize("loss_fn", [ppo_clip_loss, gspo_loss, cispo_loss])
def test_a_large_clip_range_switches_the_clip_off(loss_fn):
    # eps >= 1 puts the lower bound 1 - eps at or below 0 < ratio: no lower clip, not an error. With both
    # ranges huge every loss is the unclipped importance-weighted policy gradient: per token -A rho with
    # gradient -A rho (GSPO: -A s_i with s_i the sequence ratio; CISPO: weight rho on -A log pi).
    lp = torch.tensor([[-0.5, -2.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -0.2, -1.0]])   # log-ratios 1.0, -1.8, 0.0: far outside any usual band
    adv = torch.tensor([-1.0])
    for eps in (1.0, 10.0, 1e9):
        lp.grad = None
        loss, m = loss_fn(lp, old, adv, torch.ones(1, 3), clip_eps=eps, clip_eps_high=1e9)
        loss.sum().backward()
        if loss_fn is gspo_loss:
            s = math.exp((1.0 - 1.8 + 0.0) / 3)
            torch.testing.assert_close(loss.detach(), torch.full((1, 3), s))
            torch.testing.assert_close(lp.grad, torch.full((1, 3), s))
        else:
            rho = torch.exp(torch.tensor([[1.0, -1.8, 0.0]]))
            if loss_fn is ppo_clip_loss:
                torch.testing.assert_close(loss.detach(), rho)
            torch.testing.assert_close(lp.grad, rho)
        assert float(m["clipped_low"].sum()) == 0.0 and float(m["clipped_high"].sum()) == 0.0
