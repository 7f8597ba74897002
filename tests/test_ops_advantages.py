"""Advantage estimators, KL in the reward and the KL controllers: hand values, degenerate
groups, and readable-vs-vectorized equivalence."""

import inspect
import json
import math
import random
import statistics

import pytest
import torch

from posttrain.ops import (
    ADVANTAGE_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    gae_advantages,
    get_advantage_estimator,
    group_normalized_advantages,
    kl_penalized_token_rewards,
    masked_mean,
    raw_advantages,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
)

NAN = float("nan")
OUTCOME = ["grpo", "rloo", "remax", "reinforce_pp", "none"]


def t(*xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def b(*xs):
    return torch.tensor(xs, dtype=torch.bool)


# Two groups of G = 4. Group 0: rewards 1, 0, 0, 0. Group 1: 2, 4, (invalid: NaN), 6.
REWARDS = t(1.0, 0.0, 0.0, 0.0, 2.0, 4.0, NAN, 6.0)
VALID = b(True, True, True, True, True, True, False, True)


# ---- hand-derived values ---------------------------------------------------------------------


def test_grpo_by_hand():
    # group 0: mean 0.25; unbiased var = (0.75² + 3·0.25²)/3 = 0.75/3 = 0.25, std 0.5
    #          A = (0.75, −0.25, −0.25, −0.25) / 0.5 = (1.5, −0.5, −0.5, −0.5)
    # group 1: valid 2, 4, 6: mean 4; unbiased var = (4 + 0 + 4)/2 = 4, std 2
    #          A = (−2, 0, ·, 2) / 2 = (−1, 0, 0, 1); the invalid row gets 0
    adv, metrics = group_normalized_advantages(REWARDS, VALID, group_size=4, eps=0.0)
    torch.testing.assert_close(adv, t(1.5, -0.5, -0.5, -0.5, -1.0, 0.0, 0.0, 1.0))
    # eps is added to the std: group 0 divides by 0.5 + 0.1
    adv, _ = group_normalized_advantages(REWARDS, VALID, group_size=4, eps=0.1)
    torch.testing.assert_close(adv[:4], t(0.75, -0.25, -0.25, -0.25) / 0.6)
    assert metrics["zero_variance_groups"].item() == 0 and metrics["small_groups"].item() == 0


def test_dr_grpo_subtracts_the_mean_only():
    adv, _ = group_normalized_advantages(REWARDS, VALID, group_size=4, normalize_by_std=False)
    torch.testing.assert_close(adv, t(0.75, -0.25, -0.25, -0.25, -2.0, 0.0, 0.0, 2.0))


def test_grpo_std_is_unbiased():
    # G = 2, rewards 0 and 1: population std 0.5 would give ±1; the unbiased std is
    # sqrt(0.5) = 0.7071, giving ±0.5/0.7071 = ±0.7071 (TRL's and verl's torch.std)
    adv, _ = group_normalized_advantages(t(0.0, 1.0), None, group_size=2, eps=0.0)
    torch.testing.assert_close(adv, t(-math.sqrt(0.5), math.sqrt(0.5)))


def test_rloo_by_hand():
    # group 0: 1 − mean(0, 0, 0) = 1;  0 − mean(1, 0, 0) = −1/3
    # group 1 (valid 2, 4, 6): 2 − (4+6)/2 = −3;  4 − (2+6)/2 = 0;  6 − (2+4)/2 = 3
    adv, _ = rloo_advantages(REWARDS, VALID, group_size=4)
    torch.testing.assert_close(adv, t(1.0, -1 / 3, -1 / 3, -1 / 3, -3.0, 0.0, 0.0, 3.0))
    # identity: A_rloo = n/(n−1) · (r − mean)
    dr, _ = group_normalized_advantages(REWARDS, VALID, group_size=4, normalize_by_std=False)
    torch.testing.assert_close(adv[:4], dr[:4] * 4 / 3)
    torch.testing.assert_close(adv[4:], dr[4:] * 3 / 2)


def test_remax_by_hand():
    # per-row baseline (B,) and per-prompt baseline (N,) agree; a NaN baseline voids its rows
    per_prompt = t(0.5, NAN)
    adv, metrics = remax_advantages(REWARDS, VALID, group_size=4, baseline=per_prompt)
    torch.testing.assert_close(adv, t(0.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0))
    per_row = per_prompt.repeat_interleave(4)
    adv2, _ = remax_advantages(REWARDS, VALID, group_size=4, baseline=per_row)
    torch.testing.assert_close(adv2, adv)
    assert metrics["small_groups"].item() == 1  # group 1 lost all its rows
    # G = 1 (one sample and one greedy rollout per prompt)
    adv, _ = remax_advantages(t(1.0, 0.0, 0.7), None, group_size=1, baseline=t(0.0, 0.0, 1.0))
    torch.testing.assert_close(adv, t(1.0, 0.0, -0.3))
    with pytest.raises(ValueError, match="baseline"):
        remax_advantages(REWARDS, VALID, group_size=4, baseline=None)
    with pytest.raises(ValueError, match="baseline must have shape"):
        remax_advantages(REWARDS, VALID, group_size=4, baseline=t(1.0, 2.0, 3.0))


def test_reinforce_pp_by_hand():
    # rewards 1, 3, 5, 7: batch mean 4, population variance (9 + 1 + 1 + 9)/4 = 5
    adv, _ = reinforce_pp_advantages(t(1.0, 3.0, 5.0, 7.0), None, group_size=2, eps=0.0)
    torch.testing.assert_close(adv, t(-3.0, -1.0, 1.0, 3.0) / math.sqrt(5.0))
    # baseline variant: minus group means (2, 6) -> −1, 1, −1, 1: mean 0, variance 1
    adv, _ = reinforce_pp_advantages(
        t(1.0, 3.0, 5.0, 7.0), None, group_size=2, subtract_group_mean=True, eps=0.0
    )
    torch.testing.assert_close(adv, t(-1.0, 1.0, -1.0, 1.0))
    # invalid rows are excluded from the batch statistics: same result with a NaN row added
    adv, _ = reinforce_pp_advantages(
        t(1.0, 3.0, 5.0, 7.0, NAN, 9.0), b(True, True, True, True, False, False), group_size=2, eps=0.0
    )
    torch.testing.assert_close(adv, t(-3.0, -1.0, 1.0, 3.0, 0.0, 0.0) / math.sqrt(5.0))


def test_raw_advantages_are_the_rewards():
    adv, _ = raw_advantages(REWARDS, VALID, group_size=4)
    torch.testing.assert_close(adv, t(1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 0.0, 6.0))


# ---- degenerate groups: 0, never NaN ------------------------------------------------------------


@pytest.mark.parametrize("name", OUTCOME)
def test_degenerate_inputs_never_give_nan(name):
    fn = ADVANTAGE_ESTIMATORS[name].fn
    # group 0: all equal (0.1 three times: the float mean is not exactly 0.1);
    # group 1: one valid reward; group 2: none valid (NaN and inf rewards); group 3: normal
    rewards = t(0.1, 0.1, 0.1, 5.0, NAN, NAN, NAN, float("inf"), -float("inf"), 1.0, 2.0, 4.0)
    valid = b(True, True, True, True, False, False, False, True, True, True, True, True)
    kwargs = {"baseline": torch.zeros(4)} if name == "remax" else {}
    adv, metrics = fn(rewards, valid, group_size=3, **kwargs)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[4:9], torch.zeros(5)), "invalid / non-finite rows must get exactly 0"
    for value in metrics.values():
        assert not value.requires_grad and torch.isfinite(value).all()
    if name in ("grpo", "rloo"):
        assert torch.equal(adv[:9], torch.zeros(9))  # flat, single-valid and empty groups: 0
        assert adv[9:].abs().sum() > 0
    assert metrics["zero_variance_groups"].item() == 1
    assert metrics["small_groups"].item() == 2


def test_all_equal_group_is_exactly_zero_for_every_eps():
    rewards = torch.full((8,), 0.1)
    for eps in (0.0, 1e-6):
        adv, metrics = group_normalized_advantages(rewards, None, group_size=4, eps=eps)
        assert torch.equal(adv, torch.zeros(8))
        assert metrics["zero_variance_groups"].item() == 2
    adv, _ = reinforce_pp_advantages(rewards, None, group_size=4)
    assert torch.equal(adv, torch.zeros(8))
    adv, _ = rloo_advantages(rewards, None, group_size=4)
    assert torch.equal(adv, torch.zeros(8))


def test_valid_is_combined_with_finiteness_and_none_means_finite():
    rewards = t(1.0, NAN, 3.0, 5.0)
    a1, _ = group_normalized_advantages(rewards, None, group_size=2)
    a2, _ = group_normalized_advantages(rewards, torch.ones(4, dtype=torch.bool), group_size=2)
    torch.testing.assert_close(a1, a2)
    assert torch.equal(a1[:2], torch.zeros(2))  # one valid member left in group 0


def test_gradients_do_not_flow_into_rewards():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0], requires_grad=True)
    for name in OUTCOME:
        kwargs = {"baseline": torch.zeros(4)} if name == "remax" else {}
        adv, _ = ADVANTAGE_ESTIMATORS[name].fn(rewards, None, group_size=2, **kwargs)
        assert not adv.requires_grad


def test_input_checks():
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_normalized_advantages(t(1.0, 2.0), None, group_size=1)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(t(1.0, 2.0), None, group_size=1)
    with pytest.raises(ValueError, match="group_size >= 2"):
        reinforce_pp_advantages(t(1.0, 2.0), None, group_size=1, subtract_group_mean=True)
    with pytest.raises(ValueError, match="whole number of groups"):
        group_normalized_advantages(t(1.0, 2.0, 3.0), None, group_size=2)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        raw_advantages(torch.zeros(2, 2), None, group_size=2)
    with pytest.raises(ValueError, match="valid must have shape"):
        raw_advantages(t(1.0, 2.0), b(True), group_size=2)
    # group_size 1 is fine where groups are not needed
    adv, _ = reinforce_pp_advantages(t(1.0, 3.0), None, group_size=1, eps=0.0)
    torch.testing.assert_close(adv, t(-1.0, 1.0))


# ---- readable vs vectorized ----------------------------------------------------------------------


def _random_batch(seed, num_groups, group_size):
    rng = random.Random(seed)
    rewards, valid = [], []
    for _ in range(num_groups):
        kind = rng.random()
        for _ in range(group_size):
            if kind < 0.2:
                r = 1.0  # an all-equal group
            elif kind < 0.5:
                r = float(rng.randint(0, 1))  # binary (verifiable) rewards
            else:
                r = rng.gauss(0.0, 2.0)
            ok = rng.random() > 0.2
            rewards.append(r if ok else NAN)
            valid.append(ok)
    return rewards, valid


def _explicit(rewards, valid, group_size, per_group):
    out = []
    for g in range(0, len(rewards), group_size):
        rs = [r for r, ok in zip(rewards[g : g + group_size], valid[g : g + group_size]) if ok]
        for r, ok in zip(rewards[g : g + group_size], valid[g : g + group_size]):
            out.append(per_group(r, rs) if ok and len(rs) >= 2 and len(set(rs)) > 1 else 0.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("group_size", range(2, 9))
def test_group_statistics_match_a_python_loop(group_size):
    for seed in range(5):
        rewards, valid = _random_batch(seed * 10 + group_size, num_groups=6, group_size=group_size)
        r = torch.tensor(rewards, dtype=torch.float64)
        v = torch.tensor(valid)
        eps = 1e-6
        grpo = _explicit(
            rewards, valid, group_size, lambda x, rs: (x - statistics.mean(rs)) / (statistics.stdev(rs) + eps)
        )
        dr = _explicit(rewards, valid, group_size, lambda x, rs: x - statistics.mean(rs))
        rloo = _explicit(rewards, valid, group_size, lambda x, rs: x - (sum(rs) - x) / (len(rs) - 1))
        got, _ = group_normalized_advantages(r, v, group_size=group_size, eps=eps)
        torch.testing.assert_close(got, grpo, rtol=1e-10, atol=1e-10)
        got, _ = group_normalized_advantages(r, v, group_size=group_size, normalize_by_std=False)
        torch.testing.assert_close(got, dr, rtol=1e-10, atol=1e-10)
        got, _ = rloo_advantages(r, v, group_size=group_size)
        torch.testing.assert_close(got, rloo, rtol=1e-10, atol=1e-10)
        # reinforce++ (both variants): population statistics over the batch's valid rows
        for subtract in (False, True):
            xs = {}
            for g in range(0, len(rewards), group_size):
                rs = [x for x, ok in zip(rewards[g : g + group_size], valid[g : g + group_size]) if ok]
                for i in range(g, g + group_size):
                    if valid[i]:
                        xs[i] = rewards[i] - (statistics.mean(rs) if subtract else 0.0)
            mu, var = statistics.mean(xs.values()), statistics.pvariance(xs.values())
            want = torch.tensor(
                [(xs[i] - mu) / math.sqrt(var + 1e-8) if i in xs else 0.0 for i in range(len(rewards))],
                dtype=torch.float64,
            )
            got, _ = reinforce_pp_advantages(r, v, group_size=group_size, subtract_group_mean=subtract)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_zero_variance_metric_matches_a_python_count():
    for seed in range(10):
        rewards, valid = _random_batch(seed, num_groups=8, group_size=4)
        zero = small = 0
        for g in range(0, 32, 4):
            rs = [r for r, ok in zip(rewards[g : g + 4], valid[g : g + 4]) if ok]
            small += len(rs) < 2
            zero += len(rs) >= 2 and len(set(rs)) == 1
        _, m = group_normalized_advantages(torch.tensor(rewards), torch.tensor(valid), group_size=4)
        assert m["zero_variance_groups"].item() == zero and m["small_groups"].item() == small


# ---- GAE ---------------------------------------------------------------------------------------


def test_gae_by_hand():
    # γ = 1, λ = 0.95, rewards (0, 0, 1), values (0.5, 0.6, 0.7):
    #   δ2 = 1 + 0 − 0.7 = 0.3                     A2 = 0.3
    #   δ1 = 0 + 0.7 − 0.6 = 0.1                   A1 = 0.1 + 0.95·0.3 = 0.385
    #   δ0 = 0 + 0.6 − 0.5 = 0.1                   A0 = 0.1 + 0.95·0.385 = 0.46575
    #   returns = A + V = (0.96575, 0.985, 1.0)
    adv, ret = gae_advantages(t(0.0, 0.0, 1.0)[None], t(0.5, 0.6, 0.7)[None], torch.ones(1, 3))
    torch.testing.assert_close(adv, t(0.46575, 0.385, 0.3)[None])
    torch.testing.assert_close(ret, t(0.96575, 0.985, 1.0)[None])
    # γ = 0.9, λ = 0.5, right padding (the padded value is NaN, the padded reward 5 is ignored):
    #   δ1 = 2 + 0.9·0 − 0.4 = 1.6                 A1 = 1.6
    #   δ0 = 0 + 0.9·0.4 − 0.2 = 0.16              A0 = 0.16 + 0.45·1.6 = 0.88
    adv, ret = gae_advantages(
        t(0.0, 2.0, 5.0)[None], t(0.2, 0.4, NAN)[None], t(1.0, 1.0, 0.0)[None], gamma=0.9, lam=0.5
    )
    torch.testing.assert_close(adv, t(0.88, 1.6, 0.0)[None])
    torch.testing.assert_close(ret, t(1.08, 2.0, 0.0)[None])


def test_gae_closed_forms():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    mask = torch.ones(3, 7)
    # λ = 1, γ = 1: A_t = Σ_{s≥t} r_s − V_t, so returns are the reward-to-go
    adv, ret = gae_advantages(r, v, mask, gamma=1.0, lam=1.0)
    to_go = r.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(ret, to_go)
    torch.testing.assert_close(adv, to_go - v)
    # λ = 0: the one-step TD error
    adv, _ = gae_advantages(r, v, mask, gamma=0.9, lam=0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros(3, 1)], -1)
    torch.testing.assert_close(adv, r + 0.9 * next_v - v)


def _gae_reference(rewards, values, mask, gamma, lam):
    """Plain Python: walk each row's kept positions backwards."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for i in range(B):
        kept = [t_ for t_ in range(T) if mask[i][t_]]
        next_value, next_adv = 0.0, 0.0
        for t_ in reversed(kept):
            delta = rewards[i][t_] + gamma * next_value - values[i][t_]
            a = delta + gamma * lam * next_adv
            adv[i][t_], ret[i][t_] = a, a + values[i][t_]
            next_value, next_adv = values[i][t_], a
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(6))
def test_gae_matches_a_python_loop(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 9
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(torch.float64)  # right padding
    if seed % 2:  # and holes in the middle (masked tool output)
        mask = mask * (torch.rand(B, T, generator=g) > 0.25)
    r_in, v_in = r.masked_fill(mask == 0, NAN), v.masked_fill(mask == 0, float("inf"))
    gamma, lam = [(1.0, 0.95), (0.99, 0.95), (0.9, 0.5)][seed % 3]
    want_adv, want_ret = _gae_reference(r.tolist(), v.tolist(), mask.tolist(), gamma, lam)
    adv, ret = gae_advantages(r_in, v_in, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)


def test_gae_whitening_and_checks():
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = (torch.arange(6)[None] < torch.tensor([6, 3, 1, 4])[:, None]).float()
    adv, ret = gae_advantages(r, v, mask)
    w_adv, w_ret = gae_advantages(r, v, mask, whiten=True)
    torch.testing.assert_close(w_ret, ret)  # value targets are not whitened
    assert masked_mean(w_adv, mask).abs().item() < 1e-6
    assert masked_mean(w_adv * w_adv, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(w_adv[mask == 0], torch.zeros(int((mask == 0).sum())))
    with pytest.raises(ValueError, match="gamma"):
        gae_advantages(r, v, mask, gamma=1.5)
    with pytest.raises(ValueError, match="mask must have shape"):
        gae_advantages(r, v, mask[:, :3])
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        gae_advantages(r[0], v[0], mask[0])


# ---- KL in the reward ----------------------------------------------------------------------------


def test_kl_penalized_token_rewards_by_hand():
    scores = t(1.0, 2.0, 3.0)
    kl = t(0.1, 0.2, 0.3, 0.5, -0.5, NAN, NAN, NAN, NAN).view(3, 3)
    mask = t(1, 1, 1, 1, 1, 0, 0, 0, 0).view(3, 3)
    # β = 0.5: row 0: −0.05, −0.1, −0.15 + 1 = 0.85; row 1: −0.25, 0.25 + 2 = 2.25, (pad) 0;
    # row 2 has no tokens: all 0 (the score is dropped)
    out = kl_penalized_token_rewards(scores, kl, mask, 0.5)
    torch.testing.assert_close(out, t(-0.05, -0.1, 0.85, -0.25, 2.25, 0.0, 0.0, 0.0, 0.0).view(3, 3))
    # the score goes to the LAST kept token even with a hole; β may be a tensor
    out = kl_penalized_token_rewards(t(4.0), t(1.0, 1.0, 1.0)[None], t(1, 0, 1)[None], torch.tensor(0.1))
    torch.testing.assert_close(out, t(-0.1, 0.0, 3.9)[None])


def test_kl_penalized_rewards_feed_gae():
    # λ = γ = 1 with V = 0: the return at t is score − β Σ_{s≥t} kl_s
    kl, mask = t(0.2, 0.4, 0.1, 0.0)[None], t(1, 1, 1, 0)[None]
    rewards = kl_penalized_token_rewards(t(1.0), kl, mask, 0.5)
    _, ret = gae_advantages(rewards, torch.zeros(1, 4), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, t(1 - 0.35, 1 - 0.25, 1 - 0.05, 0.0)[None])
    assert not kl_penalized_token_rewards(t(1.0), kl.requires_grad_(), mask, 0.5).requires_grad


# ---- KL controllers ------------------------------------------------------------------------------


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9 vs target 6: e = clip(9/6 − 1 = 0.5) = 0.2;  β = 0.1 · (1 + 0.2·256/10000) = 0.100512
    ctl.update(9.0, 256)
    assert ctl.value == pytest.approx(0.100512, rel=1e-12)
    # KL 5.4: e = 0.9 − 1 = −0.1;  β = 0.100512 · (1 − 0.1·512/10000) = 0.100512 · 0.99488
    ctl.update(5.4, 512)
    assert ctl.value == pytest.approx(0.099997378560, rel=1e-10)
    # at target: unchanged; far below target: e = −0.2
    ctl.update(6.0, 1000)
    assert ctl.value == pytest.approx(0.099997378560, rel=1e-10)
    ctl.update(0.0, 5000)  # β · (1 − 0.2·0.5) = β · 0.9
    assert ctl.value == pytest.approx(0.0899976407, rel=1e-9)
    # JSON round trip restores β
    state = json.loads(json.dumps(ctl.state_dict()))
    fresh = AdaptiveKLController(0.1, 6.0, 10000)
    fresh.load_state_dict(state)
    assert fresh.value == ctl.value
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 10000)
    with pytest.raises(ValueError, match="current_kl"):
        ctl.update(float("nan"), 1)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 10)
    assert ctl.value == 0.05
    other = FixedKLController(0.5)
    other.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert other.value == 0.05
    assert FixedKLController(0.0).value == 0.0  # β = 0 (no KL) is allowed


# ---- registry ------------------------------------------------------------------------------------


def test_registry_declarations():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "rloo", "remax", "reinforce_pp", "gae", "none"}
    assert {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_groups} == {"grpo", "rloo"}
    assert {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_critic} == {"gae"}
    assert {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_baseline} == {"remax"}
    assert {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.token_level} == {"gae", "reinforce_pp"}
    for name, est in ADVANTAGE_ESTIMATORS.items():
        assert est.name == name and get_advantage_estimator(name) is est
        params = inspect.signature(est.fn).parameters
        keyword_only = {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
        fixed = set() if est.needs_critic else {"group_size", "baseline"}
        if est.token_level and not est.needs_critic:
            fixed |= {"token_rewards", "mask"}
        assert keyword_only - fixed == set(est.hyperparameters), name
    with pytest.raises(ValueError, match="valid estimators"):
        get_advantage_estimator("ppo")


# ---- REINFORCE++ per token (Hu 2025): KL-to-go in the reward, whitened over the batch's tokens ----------------


def test_reinforce_pp_token_form_by_hand():
    # beta = 0.5; token rewards u = -beta * KL_t
    #   row 0: r = 1, 3 tokens, KL (0.1, 0.2, 0.3) -> u = (-0.05, -0.10, -0.15)
    #          returns-to-go G = 1 + (-0.30, -0.25, -0.15) = (0.70, 0.75, 0.85)
    #   row 1: r = 0, 2 kept tokens, KL (0.4, -0.2, [masked 9.0]) -> u = (-0.20, 0.10)
    #          G = (-0.10, 0.10)
    # batch of 5 tokens: mean 2.3 / 5 = 0.46; deviations (0.24, 0.29, 0.39, -0.56, -0.36),
    # population variance (0.0576 + 0.0841 + 0.1521 + 0.3136 + 0.1296) / 5 = 0.1474
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.2, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    adv, _ = reinforce_pp_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), None, group_size=2,
                                     token_rewards=-0.5 * kl, mask=mask, eps=0.0)
    sd = math.sqrt(0.1474)
    want = torch.tensor([[0.24, 0.29, 0.39], [-0.56, -0.36, 0.0]], dtype=torch.float64) / sd
    want[1, 2] = 0.0
    torch.testing.assert_close(adv, want, rtol=1e-12, atol=1e-12)
    # the sequence-level form (one advantage per response from r - beta * sum KL, whitened over responses)
    # differs: it would give +1 / -1 to every token of the two rows
    seq = torch.tensor([1.0 - 0.5 * 0.6, 0.0 - 0.5 * 0.2])
    assert not torch.allclose(adv[0].float(), ((seq - seq.mean()) / seq.std(unbiased=False))[0].expand(3))


def test_reinforce_pp_baseline_variant_by_hand():
    # two groups of two; beta = 0 (no KL in the reward), lengths 1, 2, 1, 3:
    #   rewards 1, 3 | 5, 9 -> minus group means (2, 7): -1, 1 | -2, 2
    #   token returns: -1 | 1, 1 | -2 | 2, 2, 2   (7 tokens): mean 5 / 7, weighted by length
    rewards = t(1.0, 3.0, 5.0, 9.0)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
    adv, _ = reinforce_pp_advantages(rewards, None, group_size=2, mask=mask, subtract_group_mean=True, eps=0.0)
    g = [-1.0, 1.0, 1.0, -2.0, 2.0, 2.0, 2.0]
    mu = sum(g) / 7
    sd = math.sqrt(sum((x - mu) ** 2 for x in g) / 7)
    want = torch.tensor([[-1.0 - mu, 0, 0], [1 - mu, 1 - mu, 0], [-2 - mu, 0, 0], [2 - mu, 2 - mu, 2 - mu]]) / sd
    torch.testing.assert_close(adv, want * mask)
    # one-token responses (no mask): the rewards whitened over the valid responses
    adv1, _ = reinforce_pp_advantages(rewards, None, group_size=2, subtract_group_mean=True, eps=0.0)
    torch.testing.assert_close(adv1, t(-1.0, 1.0, -2.0, 2.0) / math.sqrt(2.5))


def test_reinforce_pp_token_form_matches_a_python_loop():
    for seed in range(8):
        rng = random.Random(seed)
        G, N, T = 4, 3, 6
        B = G * N
        rewards = [rng.choice([0.0, 1.0, 0.5, float("nan")]) for _ in range(B)]
        valid = [rng.random() > 0.15 for _ in range(B)]
        lengths = [rng.randint(0, T) for _ in range(B)]
        kl = [[rng.uniform(-0.5, 1.0) for _ in range(T)] for _ in range(B)]
        beta = rng.choice([0.0, 0.05, 0.3])
        for subtract in (False, True):
            ok = [valid[i] and math.isfinite(rewards[i]) for i in range(B)]
            x = {}
            for g0 in range(0, B, G):
                members = [rewards[i] for i in range(g0, g0 + G) if ok[i]]
                for i in range(g0, g0 + G):
                    if ok[i]:
                        x[i] = rewards[i] - (statistics.mean(members) if subtract else 0.0)
            returns = {}
            for i in x:
                for tt in range(lengths[i]):
                    returns[i, tt] = x[i] - beta * sum(kl[i][tt:lengths[i]])
            want = torch.zeros(B, T, dtype=torch.float64)
            if returns:
                mu, var = statistics.mean(returns.values()), statistics.pvariance(returns.values())
                for (i, tt), v in returns.items():
                    want[i, tt] = (v - mu) / math.sqrt(var + 1e-8) if var > 0 else 0.0
            mask = torch.tensor([[1.0 if tt < lengths[i] else 0.0 for tt in range(T)] for i in range(B)],
                                dtype=torch.float64)
            got, _ = reinforce_pp_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(valid),
                                             group_size=G, token_rewards=-beta * torch.tensor(kl, dtype=torch.float64),
                                             mask=mask, subtract_group_mean=subtract)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_reinforce_pp_token_form_checks_shapes():
    with pytest.raises(ValueError, match="mask"):
        reinforce_pp_advantages(t(1.0, 2.0), None, group_size=1, token_rewards=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="token_rewards must have shape"):
        reinforce_pp_advantages(t(1.0, 2.0), None, group_size=1, token_rewards=torch.zeros(2, 2),
                                mask=torch.ones(2, 3))
