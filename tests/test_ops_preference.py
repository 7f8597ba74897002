"""Preference losses: hand-computed values, step-0 identities, gradients, capability table.

Notation as in ``posttrain.ops.preference``: c / r are the chosen / rejected sequence
log-probs, ``sp(x) = softplus(x) = log(1 + eˣ) = −log σ(−x)``.
"""

import inspect
import math

import pytest
import torch

from posttrain.ops import (
    PREFERENCE_LOSSES,
    PreferenceLoss,
    dpo_loss,
    dpop_loss,
    get_preference_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
    slic_hinge_loss,
    tilt_loss,
)


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# Three pairs used by the reference-based losses (float64 so hand values compare tightly).
#   pair 0: c=-3, r=-5, c_ref=-4, r_ref=-4  -> chosen ratio +1, rejected ratio -1
#   pair 1: c=-6, r=-2, c_ref=-5, r_ref=-4  -> chosen ratio -1, rejected ratio +2
#   pair 2: all four equal                 -> both ratios 0
C, R = t(-3.0, -6.0, -7.0), t(-5.0, -2.0, -7.0)
C_REF, R_REF = t(-4.0, -5.0, -7.0), t(-4.0, -4.0, -7.0)
LEN_C, LEN_R = t(2.0, 2.0, 2.0), torch.tensor([4, 4, 4])  # lengths may be float or long
BETA = 0.5
# DPO margins h = β[(c − c_ref) − (r − r_ref)] = 0.5·[1 − (−1)], 0.5·[−1 − 2], 0 = 1, −1.5, 0
H = [1.0, -1.5, 0.0]


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **kw)


# ---- DPO ------------------------------------------------------------------------------------


def test_dpo_by_hand():
    losses, m = dpo_loss(C, R, C_REF, R_REF, LEN_C, LEN_R, beta=BETA)
    # −log σ(h) = sp(−h): sp(−1) = 0.313262, sp(1.5) = 1.701413, sp(0) = ln 2 = 0.693147
    close(losses, [0.31326168751822286, 1.7014132779827524, math.log(2)])
    close(m["chosen_rewards"], [0.5, -0.5, 0.0])  # β·(c − c_ref)
    close(m["rejected_rewards"], [-0.5, 1.0, 0.0])  # β·(r − r_ref)
    close(m["margins"], H)
    close(m["accuracy"], [1.0, 0.0, 0.0])  # a margin of exactly 0 is not a win


def test_dpo_label_smoothing_by_hand():
    # (1−ε) sp(−h) + ε sp(h), and sp(h) = sp(−h) + h, so the loss is sp(−h) + ε·h
    losses, _ = dpo_loss(C, R, C_REF, R_REF, LEN_C, LEN_R, beta=BETA, label_smoothing=0.1)
    close(losses, [0.31326168751822286 + 0.1, 1.7014132779827524 - 0.15, math.log(2)])


def test_dpo_robust_by_hand():
    # [(1−ε) sp(−h) − ε sp(h)] / (1−2ε) = [0.8 sp(−h) − 0.1 h] / 0.8 = sp(−h) − h/8   (ε = 0.1)
    losses, _ = dpo_loss(C, R, C_REF, R_REF, LEN_C, LEN_R, beta=BETA, label_smoothing=0.1, robust=True)
    close(losses, [0.31326168751822286 - 0.125, 1.7014132779827524 + 0.1875, math.log(2)])


def test_dpo_robust_is_unbiased_under_label_flips():
    """E over a flip with probability ε of the robust loss equals the clean DPO loss."""
    eps = 0.2
    g = torch.Generator().manual_seed(0)
    c, r = -5 * torch.rand(8, generator=g, dtype=torch.float64), -5 * torch.rand(8, generator=g, dtype=torch.float64)
    cr, rr = -5 * torch.rand(8, generator=g, dtype=torch.float64), -5 * torch.rand(8, generator=g, dtype=torch.float64)
    kw = {"beta": 0.7, "label_smoothing": eps, "robust": True}
    kept, _ = dpo_loss(c, r, cr, rr, None, None, **kw)
    flipped, _ = dpo_loss(r, c, rr, cr, None, None, **kw)
    clean, _ = dpo_loss(c, r, cr, rr, None, None, beta=0.7)
    torch.testing.assert_close((1 - eps) * kept + eps * flipped, clean)


def test_conservative_dpo_minimum_is_at_logit_one_minus_eps():
    """d/dh[(1−ε) sp(−h) + ε sp(h)] = −(1−ε)σ(−h) + εσ(h) = 0  at  h* = log((1−ε)/ε)."""
    eps = 0.1
    h_star = math.log((1 - eps) / eps)
    c = torch.tensor([h_star], dtype=torch.float64, requires_grad=True)  # β = 1, refs 0, r = 0
    loss, _ = dpo_loss(c, t(0.0), t(0.0), t(0.0), None, None, beta=1.0, label_smoothing=eps)
    (grad,) = torch.autograd.grad(loss.sum(), c)
    assert abs(grad.item()) < 1e-12


def test_step0_policy_equals_reference():
    g = torch.Generator().manual_seed(1)
    c = -10 * torch.rand(16, generator=g)
    r = -10 * torch.rand(16, generator=g)
    n = torch.randint(1, 9, (16,), generator=g)
    losses, m = dpo_loss(c, r, c.clone(), r.clone(), n, n, beta=0.1)
    assert torch.equal(losses, torch.full((16,), math.log(2)))  # exactly ln 2 in float32
    assert torch.equal(m["margins"], torch.zeros(16))
    losses, _ = dpo_loss(c, r, c.clone(), r.clone(), n, n, beta=0.1, label_smoothing=0.2)
    close(losses, torch.full((16,), math.log(2)))  # (1−ε) ln 2 + ε ln 2
    losses, m = slic_hinge_loss(c, r, c.clone(), r.clone(), n, n, beta=0.1)
    assert torch.equal(losses, torch.ones(16)) and torch.equal(m["margins"], torch.zeros(16))
    for tau in (0.1, 0.5):
        losses, m = ipo_loss(c, r, c.clone(), r.clone(), n, n + 3, beta=tau)
        close(losses, torch.full((16,), 1 / (2 * tau) ** 2))  # (0 − 1/(2τ))²
        assert torch.equal(m["margins"], torch.zeros(16))
    losses, _ = dpop_loss(c, r, c.clone(), r.clone(), n, n, beta=0.1, dpop_lambda=5.0)
    assert torch.equal(losses, torch.full((16,), math.log(2)))  # penalty max(0, 0) = 0


def test_dpo_gradient_is_the_dpo_weight():
    g = torch.Generator().manual_seed(2)
    c = (-10 * torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_(True)
    r = (-10 * torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_(True)
    cr, rr = -10 * torch.rand(6, generator=g, dtype=torch.float64), -10 * torch.rand(6, generator=g, dtype=torch.float64)
    beta = 0.3
    losses, m = dpo_loss(c, r, cr, rr, None, None, beta=beta)
    h = m["margins"]
    gc, gr = torch.autograd.grad(losses.sum(), (c, r))
    torch.testing.assert_close(gc, -beta * torch.sigmoid(-h))  # −β σ(−h)
    torch.testing.assert_close(gr, beta * torch.sigmoid(-h))  # +β σ(−h)
    assert not m["margins"].requires_grad and not m["chosen_rewards"].requires_grad


def test_reference_gets_no_gradient_and_is_not_required_to():
    c = C.clone().requires_grad_(True)
    losses, _ = dpo_loss(c, R, C_REF, R_REF, None, None, beta=BETA)
    losses.sum().backward()
    assert C_REF.grad is None and R_REF.grad is None and c.grad is not None
    # with refs that do require grad, they get exactly the opposite of the policy's gradient
    cr = C_REF.clone().requires_grad_(True)
    losses, _ = dpo_loss(C, R, cr, R_REF, None, None, beta=BETA)
    (g_ref,) = torch.autograd.grad(losses.sum(), cr)
    torch.testing.assert_close(g_ref, -c.grad)


# ---- IPO / hinge / DPOP ---------------------------------------------------------------------


def test_ipo_by_hand():
    # τ = β = 0.5, target 1/(2τ) = 1.  h = (c−c_ref)/|c| − (r−r_ref)/|r|, |c| = 2, |r| = 4
    #   pair 0: 1/2 − (−1)/4 = 0.75  -> (0.75 − 1)² = 0.0625
    #   pair 1: −1/2 − 2/4   = −1    -> (−2)²       = 4
    #   pair 2: 0                    -> 1
    losses, m = ipo_loss(C, R, C_REF, R_REF, LEN_C, LEN_R, beta=BETA)
    close(losses, [0.0625, 4.0, 1.0])
    close(m["margins"], [0.75, -1.0, 0.0])
    close(m["chosen_rewards"], [0.5, -0.5, 0.0])


def test_slic_hinge_by_hand():
    # max(0, 1 − h) with h = 1, −1.5, 0 -> 0, 2.5, 1
    c = C.clone().requires_grad_(True)
    losses, _ = slic_hinge_loss(c, R, C_REF, R_REF, LEN_C, LEN_R, beta=BETA)
    close(losses, [0.0, 2.5, 1.0])
    (g,) = torch.autograd.grad(losses.sum(), c)
    close(g, [0.0, -BETA, -BETA])  # no gradient once the margin is met


def test_dpop_penalty_inactive_and_active():
    # λ = 2 (outside β). pair 0: c − c_ref = +1 ≥ 0 -> penalty 0, loss = DPO's sp(−1)
    #                    pair 1: c − c_ref = −1      -> penalty 2·1 = 2, z = −1.5 − 2 = −3.5,
    #                                                   loss = sp(3.5) = 3.529750
    c = C.clone().requires_grad_(True)
    losses, m = dpop_loss(c, R, C_REF, R_REF, LEN_C, LEN_R, beta=BETA, dpop_lambda=2.0)
    close(losses, [0.31326168751822286, 3.5297504182726205, math.log(2)])
    close(m["dpop_penalty"], [0.0, 2.0, 0.0])
    close(m["margins"], H)  # reported margins are DPO's, without the penalty
    (g,) = torch.autograd.grad(losses.sum(), c)
    # inactive: −β σ(−h) = −0.5 σ(−1); active: −(β + λ) σ(−z) = −2.5 σ(3.5)
    close(g[:2], [-0.5 * sigmoid(-1.0), -2.5 * sigmoid(3.5)])


def test_dpop_with_zero_lambda_is_dpo():
    a, _ = dpop_loss(C, R, C_REF, R_REF, None, None, beta=BETA, dpop_lambda=0.0)
    b, _ = dpo_loss(C, R, C_REF, R_REF, None, None, beta=BETA)
    torch.testing.assert_close(a, b)


# ---- SimPO / ORPO (reference-free) ----------------------------------------------------------


def test_simpo_by_hand():
    # β = 2, γ = 0.5.  pair 0: c = −1, |c| = 2 -> c̄ = −0.5; r = −8, |r| = 4 -> r̄ = −2
    #                          h = 2(−0.5) − 2(−2) − 0.5 = 2.5 -> sp(−2.5) = 0.078890
    #                  pair 1: c = −3, |c| = 2 -> −1.5; r = −5, |r| = 4 -> −1.25
    #                          h = −3 + 2.5 − 0.5 = −1      -> sp(1) = 1.313262
    c, r = t(-1.0, -3.0), t(-8.0, -5.0)
    lc, lr = t(2.0, 2.0), t(4.0, 4.0)
    losses, m = simpo_loss(c, r, None, None, lc, lr, beta=2.0, simpo_gamma=0.5)
    close(losses, [0.07888973429254963, 1.3132616875182228])
    close(m["chosen_rewards"], [-1.0, -3.0])  # β c̄
    close(m["rejected_rewards"], [-4.0, -2.5])  # β r̄
    close(m["margins"], [3.0, -0.5])  # without γ
    # label smoothing as in DPO: sp(−h) + ε h
    smoothed, _ = simpo_loss(c, r, None, None, lc, lr, beta=2.0, simpo_gamma=0.5, label_smoothing=0.1)
    close(smoothed, [0.07888973429254963 + 0.25, 1.3132616875182228 - 0.1])
    # γ = 0 and no length difference: plain BT on β·(mean log-probs)
    plain, _ = simpo_loss(c, r, None, None, lc, lr, beta=2.0, simpo_gamma=0.0)
    close(plain, [sp(-3.0), sp(0.5)])


def test_orpo_by_hand():
    # λ = 0.5.  pair 0: c̄ = −1/2 = −0.5, r̄ = −4/2 = −2
    #   log odds(c̄) = −0.5 − log(1 − e^−0.5) = 0.432752;  log odds(r̄) = −2 − log(1 − e^−2) = −1.854587
    #   log odds ratio = 2.287339;  −log σ(2.287339) = 0.096706;  NLL = 0.5
    #   loss = 0.5 + 0.5·0.096706 = 0.548353
    # pair 1: c̄ = −3/1 = −3 (log odds −2.948931), r̄ = −1/2 = −0.5 (0.432752)
    #   ratio = −3.381683; −log σ = 3.415108; loss = 3 + 0.5·3.415108 = 4.707554
    c, r = t(-1.0, -3.0), t(-4.0, -1.0)
    lc, lr = t(2.0, 1.0), t(2.0, 2.0)
    losses, m = orpo_loss(c, r, None, None, lc, lr, orpo_lambda=0.5)
    close(losses, [0.5483529318246998, 4.7075541248121375])
    close(m["chosen_rewards"], [0.43275212956718856, -2.9489308190572983])
    close(m["rejected_rewards"], [-1.854586542131141, 0.43275212956718856])
    close(m["margins"], [2.2873386716983295, -3.381682948624487])
    close(m["nll"], [0.5, 3.0])
    close(m["odds_ratio_loss"], [0.09670586364939958, 3.415108249624275])


def test_orpo_log_odds_stable_at_the_extremes():
    # mean log-probs 0 (p = 1), −1e-30, −1e-6, −0.7 (around the log(2) switch), −50, −200
    means = torch.tensor([0.0, -1e-30, -1e-6, -0.69, -0.70, -50.0, -200.0], requires_grad=True)
    ones = torch.ones(7)
    losses, m = orpo_loss(means, torch.full((7,), -3.0), None, None, ones, ones, orpo_lambda=1.0)
    assert torch.isfinite(losses).all() and torch.isfinite(m["chosen_rewards"]).all()
    (g,) = torch.autograd.grad(losses.sum(), means)
    assert torch.isfinite(g).all()
    lo = m["chosen_rewards"]
    assert lo[0] > 15 and lo[0] == lo[1]  # clamped to the machine-epsilon cap, finite
    # away from the cap the stable form matches the naive formula in float64
    for x, got in zip([-1e-6, -0.69, -0.70, -50.0], lo[2:6].tolist()):
        assert got == pytest.approx(x - math.log(-math.expm1(x)), rel=1e-5, abs=1e-5)
    assert lo[6].item() == pytest.approx(-200.0)  # log(1 − e^−200) = 0 to float precision


def test_orpo_gradient_contains_the_sft_term():
    # λ = 0: the loss is the per-token NLL −c/|c|, so ∂L/∂c = −1/|c|
    c = t(-2.0, -9.0).requires_grad_(True)
    losses, _ = orpo_loss(c, t(-5.0, -5.0), None, None, t(2.0, 3.0), t(1.0, 1.0), orpo_lambda=0.0)
    (g,) = torch.autograd.grad(losses.sum(), c)
    close(g, [-0.5, -1.0 / 3.0])


# ---- KTO ------------------------------------------------------------------------------------

# ρ = logps − ref_logps = 1.6, −0.4, 0.6 for (desirable, undesirable, desirable)
KTO_LOGPS, KTO_REF = t(-2.4, -5.4, -3.4), t(-4.0, -5.0, -4.0)
KTO_DESIRABLE = torch.tensor([True, False, True])


def test_kto_by_hand_with_positive_z_ref():
    # KL batch ratios 0.4, 0.8 -> z_ref = 0.6.  β = 0.5, λ_D = 1, λ_U = 2
    #   s0 (desirable):   1 − σ(0.5·(1.6 − 0.6))      = σ(−0.5)     = 0.377541
    #   s1 (undesirable): 2·(1 − σ(0.5·(0.6 + 0.4))) = 2·σ(−0.5)   = 0.755081
    #   s2 (desirable):   1 − σ(0)                    = 0.5
    kl, kl_ref = t(-1.6, -2.2), t(-2.0, -3.0)
    losses, m = kto_loss(KTO_LOGPS, KTO_REF, KTO_DESIRABLE, kl, kl_ref, None, beta=0.5, kto_lambda_u=2.0)
    close(losses, [0.3775406687981454, 0.7550813375962908, 0.5])
    close(m["z_ref"], 0.6)
    close(m["rewards"], [0.8, -0.2, 0.3])  # β ρ
    close(m["desirable_rewards"], [0.8, 0.0, 0.3])
    close(m["undesirable_rewards"], [0.0, -0.2, 0.0])
    close(m["desirable"], [1.0, 0.0, 1.0])


def test_kto_z_ref_clamped_to_zero():
    # KL batch ratios −0.4, −0.2: mean −0.3 -> z_ref = max(0, −0.3) = 0
    #   s0: σ(−0.8) = 0.310026;  s1: 2·σ(−0.2) = 0.900332;  s2: σ(−0.3) = 0.425557
    kl, kl_ref = t(-2.4, -3.2), t(-2.0, -3.0)
    losses, m = kto_loss(KTO_LOGPS, KTO_REF, KTO_DESIRABLE, kl, kl_ref, None, beta=0.5, kto_lambda_u=2.0)
    close(losses, [0.31002551887238755, 0.9003320053750443, 0.425557483188341])
    close(m["z_ref"], 0.0)
    close(m["kl"], -0.3)


def test_kto_z_ref_carries_no_gradient():
    kl = t(-1.6, -2.2).requires_grad_(True)
    logps = KTO_LOGPS.clone().requires_grad_(True)
    losses, m = kto_loss(logps, KTO_REF, KTO_DESIRABLE, kl, t(-2.0, -3.0), None, beta=0.5)
    assert all(not v.requires_grad for v in m.values())
    losses.sum().backward()
    assert kl.grad is None  # no path from the loss to the KL batch
    # ∂L/∂logps: desirable −β σ(x)(1−σ(x)), x = β(ρ − z); undesirable +β σ(y)(1−σ(y)), y = β(z − ρ)
    x = [0.5 * (1.6 - 0.6), 0.5 * (0.6 + 0.4), 0.5 * (0.6 - 0.6)]
    d = [sigmoid(v) * (1 - sigmoid(v)) for v in x]
    close(logps.grad, [-0.5 * d[0], 0.5 * d[1], -0.5 * d[2]])


def test_kto_empty_kl_batch_gives_zero_z_ref():
    empty = torch.zeros(0, dtype=torch.float64)
    losses, m = kto_loss(KTO_LOGPS, KTO_REF, KTO_DESIRABLE, empty, empty, None, beta=0.5)
    assert m["z_ref"].item() == 0.0 and torch.isfinite(losses).all()


# ---- exponential tilt -----------------------------------------------------------------------


def test_tilt_weights_and_losses_by_hand():
    # group 0: rewards [0, ln 3], β = 1 -> ω = [1, 3] / 4 = [0.25, 0.75]
    #          logps [−2, −4] -> L = −(0.25·−2 + 0.75·−4) = 3.5
    # group 1 (K = 3, interleaved): equal rewards -> ω = 1/3 each; logps −3, −6, −9 -> L = 6
    logps = t(-2.0, -3.0, -4.0, -6.0, -9.0).requires_grad_(True)
    rewards = t(0.0, 5.0, math.log(3), 5.0, 5.0)
    groups = torch.tensor([0, 1, 0, 1, 1])
    losses, m = tilt_loss(logps, rewards, groups, None, beta=1.0)
    close(losses, [3.5, 6.0])
    close(m["weights"], [0.25, 1 / 3, 0.75, 1 / 3, 1 / 3])
    # entropy −(¼ ln ¼ + ¾ ln ¾) = 0.562335; uniform over 3 -> ln 3
    close(m["weight_entropy"], [0.5623351446188083, math.log(3)])
    close(m["max_weight"], [0.75, 1 / 3])
    (g,) = torch.autograd.grad(losses.sum(), logps)
    close(g, -m["weights"])  # ∂L/∂log π_i = −ω_i


def test_tilt_beta_scales_rewards_and_is_shift_invariant_and_stable():
    # rewards [1000, 1000 + 2 ln 3] with β = 2 -> same ω = [0.25, 0.75], no overflow
    logps = t(-2.0, -4.0)
    losses, m = tilt_loss(logps, t(1000.0, 1000.0 + 2 * math.log(3)), torch.tensor([0, 0]), None, beta=2.0)
    close(m["weights"], [0.25, 0.75])
    close(losses, [3.5])
    # β → 0: all weight on the best response (rejection-sampling fine-tuning)
    _, m = tilt_loss(logps, t(0.0, 1.0), torch.tensor([0, 0]), None, beta=1e-4)
    close(m["weights"], [0.0, 1.0])


def test_tilt_length_normalize_ragged_groups_and_num_groups():
    # lengths [2, 4] turn logps [−2, −4] into [−1, −1]: L = 1 whatever the weights;
    # group 1 has no response: loss 0; group 2 has a single response: ω = 1
    logps, lengths = t(-2.0, -4.0, -3.0), torch.tensor([2, 4, 3])
    losses, m = tilt_loss(
        logps, t(0.0, math.log(3), 7.0), torch.tensor([0, 0, 2]), lengths,
        beta=1.0, length_normalize=True, num_groups=3,
    )
    close(losses, [1.0, 0.0, 1.0])
    close(m["max_weight"], [0.75, 0.0, 1.0])
    close(m["weight_entropy"], [0.5623351446188083, 0.0, 0.0])
    with pytest.raises(ValueError, match="lengths"):
        tilt_loss(logps, t(0.0, 0.0, 0.0), torch.tensor([0, 0, 1]), None, beta=1.0, length_normalize=True)


def test_tilt_weights_carry_no_gradient():
    rewards = t(0.0, 1.0, 2.0).requires_grad_(True)
    logps = t(-1.0, -2.0, -3.0).requires_grad_(True)
    losses, m = tilt_loss(logps, rewards, torch.tensor([0, 0, 0]), None, beta=0.5)
    losses.sum().backward()
    assert rewards.grad is None and not m["weights"].requires_grad


# ---- validation and the registry --------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dpo_loss(C, R, C_REF, R_REF, None, None, beta=0.0), "beta"),
        (lambda: dpo_loss(C, R, C_REF, R_REF, None, None, beta=-1.0), "beta"),
        (lambda: dpo_loss(C, R, C_REF, R_REF, None, None, beta=0.1, label_smoothing=0.5), "label_smoothing"),
        (lambda: dpo_loss(C, R, C_REF, R_REF, None, None, beta=0.1, label_smoothing=-0.1), "label_smoothing"),
        (lambda: dpo_loss(C, R, None, R_REF, None, None, beta=0.1), "ref_chosen_logps"),
        (lambda: ipo_loss(C, R, C_REF, R_REF, LEN_C, LEN_R, beta=float("nan")), "beta"),
        (lambda: dpop_loss(C, R, C_REF, R_REF, None, None, beta=0.1, dpop_lambda=-1.0), "dpop_lambda"),
        (lambda: simpo_loss(C, R, None, None, LEN_C, LEN_R, beta=2.0, simpo_gamma=-0.1), "simpo_gamma"),
        (lambda: simpo_loss(C, R, None, None, LEN_C, LEN_R, beta=2.0, simpo_gamma=0.5, label_smoothing=0.7), "label_smoothing"),
        (lambda: orpo_loss(C, R, None, None, LEN_C, LEN_R, orpo_lambda=-0.5), "orpo_lambda"),
        (lambda: kto_loss(C, C_REF, KTO_DESIRABLE, C, C, None, beta=0.1, kto_lambda_d=-1.0), "kto_lambda_d"),
        (lambda: kto_loss(C, C_REF, KTO_DESIRABLE, C, C, None, beta=0.1, kto_lambda_u=-1.0), "kto_lambda_u"),
        (lambda: tilt_loss(C, R, torch.tensor([0, 0, 1]), None, beta=0.0), "beta"),
        (lambda: tilt_loss(C, R[:2], torch.tensor([0, 0, 1]), None, beta=1.0), "same 1-D shape"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_capability_table():
    table = {
        name: (e.data, e.needs_reference, e.sft_term, e.length_normalized)
        for name, e in PREFERENCE_LOSSES.items()
    }
    assert table == {
        "dpo": ("paired", True, False, False),
        "ipo": ("paired", True, False, True),
        "hinge": ("paired", True, False, False),
        "dpop": ("paired", True, False, False),
        "simpo": ("paired", False, False, True),
        "orpo": ("paired", False, True, True),
        "kto": ("unpaired", True, False, False),
        "tilt": ("ranked", False, False, False),
    }
    assert {n for n, e in PREFERENCE_LOSSES.items() if not e.needs_reference} == {"simpo", "orpo", "tilt"}
    assert [n for n, e in PREFERENCE_LOSSES.items() if e.sft_term] == ["orpo"]
    for name, entry in PREFERENCE_LOSSES.items():
        assert isinstance(entry, PreferenceLoss) and entry.name == name
        with pytest.raises(AttributeError):
            entry.needs_reference = not entry.needs_reference  # immutable


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_declared_hyperparameters_are_the_keyword_arguments(name):
    entry = PREFERENCE_LOSSES[name]
    params = inspect.signature(entry.fn).parameters.values()
    kwonly = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert kwonly - {"num_groups"} == set(entry.hyperparameters)
    positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    expected = {
        "paired": ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                   "chosen_lengths", "rejected_lengths"],
        "unpaired": ["logps", "ref_logps", "desirable", "kl_logps", "ref_kl_logps", "lengths"],
        "ranked": ["logps", "rewards", "group_ids", "lengths"],
    }[entry.data]
    assert positional == expected


HP = {"beta": 0.2, "label_smoothing": 0.1, "robust": False, "dpop_lambda": 1.0, "simpo_gamma": 0.3,
      "orpo_lambda": 0.5, "kto_lambda_d": 1.0, "kto_lambda_u": 1.5, "length_normalize": True}


@pytest.mark.parametrize("name", sorted(n for n, e in PREFERENCE_LOSSES.items() if e.data == "paired"))
def test_paired_losses_generic_call_through_the_registry(name):
    """The trainer's generic call: refs only when declared, hyperparameters by name."""
    entry = get_preference_loss(name)
    g = torch.Generator().manual_seed(3)
    c = (-20 * torch.rand(5, generator=g)).requires_grad_(True)
    r = -20 * torch.rand(5, generator=g)
    refs = (-20 * torch.rand(5, generator=g), -20 * torch.rand(5, generator=g)) if entry.needs_reference else (None, None)
    lengths = torch.randint(1, 30, (5,), generator=g)
    losses, metrics = entry.fn(c, r, *refs, lengths, lengths + 1, **{k: HP[k] for k in entry.hyperparameters})
    assert losses.shape == (5,) and losses.dtype == torch.float32 and torch.isfinite(losses).all()
    assert {"chosen_rewards", "rejected_rewards", "margins", "accuracy"} <= set(metrics)
    assert all(not v.requires_grad for v in metrics.values())
    torch.testing.assert_close(metrics["margins"], metrics["chosen_rewards"] - metrics["rejected_rewards"])
    (grad,) = torch.autograd.grad(losses.sum(), c)
    assert torch.isfinite(grad).all()


def test_get_preference_loss_unknown_lists_names():
    assert get_preference_loss("dpo").fn is dpo_loss
    with pytest.raises(ValueError, match="dpo.*ipo|'dpo'"):
        get_preference_loss("ppo")
