"""Distillation divergences: hand values, torch.distributions, chunked == unchunked with gradients,
zero gradient at student == teacher, and mode seeking vs mode covering on a bimodal teacher."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from posttrain.ops import token_divergence


def test_hand_values_on_two_tokens():
    s = torch.tensor([[0.0, 0.0]])                  # p_S = (1/2, 1/2)
    t = torch.tensor([[math.log(3.0), 0.0]])        # p_T = (3/4, 1/4)
    fwd = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    m = (0.625, 0.375)
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + \
        0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert float(token_divergence(s, t, divergence="forward_kl")[0]) == pytest.approx(fwd, abs=1e-6)
    assert float(token_divergence(s, t, divergence="reverse_kl")[0]) == pytest.approx(rev, abs=1e-6)
    assert float(token_divergence(s, t, divergence="jsd", beta=0.5)[0]) == pytest.approx(jsd, abs=1e-6)
    # beta weights the two halves: m = 0.2 p_T + 0.8 p_S
    m2 = (0.2 * 0.75 + 0.8 * 0.5, 0.2 * 0.25 + 0.8 * 0.5)
    jsd2 = 0.2 * (0.75 * math.log(0.75 / m2[0]) + 0.25 * math.log(0.25 / m2[1])) + \
        0.8 * (0.5 * math.log(0.5 / m2[0]) + 0.5 * math.log(0.5 / m2[1]))
    assert float(token_divergence(s, t, divergence="jsd", beta=0.2)[0]) == pytest.approx(jsd2, abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_kl_matches_torch_distributions_with_temperature(tau):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 7, generator=g) * 3, torch.randn(3, 4, 7, generator=g) * 3
    fwd = kl_divergence(Categorical(logits=t / tau), Categorical(logits=s / tau)) * tau**2
    rev = kl_divergence(Categorical(logits=s / tau), Categorical(logits=t / tau)) * tau**2
    assert torch.allclose(token_divergence(s, t, divergence="forward_kl", temperature=tau), fwd, atol=1e-5)
    assert torch.allclose(token_divergence(s, t, divergence="reverse_kl", temperature=tau), rev, atol=1e-5)
    # JSD against its definition through torch.distributions
    p_t, p_s = torch.softmax(t / tau, -1), torch.softmax(s / tau, -1)
    m = Categorical(probs=0.3 * p_t + 0.7 * p_s)
    jsd = (0.3 * kl_divergence(Categorical(probs=p_t), m) + 0.7 * kl_divergence(Categorical(probs=p_s), m)) * tau**2
    assert torch.allclose(token_divergence(s, t, divergence="jsd", beta=0.3, temperature=tau), jsd, atol=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_unchunked_with_gradients(divergence):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(4, 5, 11, generator=g)
    mask = (torch.rand(4, 5, generator=g) > 0.3).float()
    grads, values = [], []
    for chunk in (3, None):
        s = torch.randn(4, 5, 11, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        out = token_divergence(s, t, mask, divergence=divergence, temperature=1.5, chunk_size=chunk)
        (out * torch.arange(20.0).view(4, 5)).sum().backward()
        values.append(out.detach())
        grads.append(s.grad)
    assert torch.allclose(values[0], values[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert torch.all(values[0][mask == 0] == 0)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_zero_with_zero_gradient_when_the_student_equals_the_teacher(divergence):
    t = torch.randn(6, 9, generator=torch.Generator().manual_seed(3))
    s = t.clone().requires_grad_(True)
    out = token_divergence(s, t, divergence=divergence)
    out.sum().backward()
    assert torch.allclose(out.detach(), torch.zeros(6), atol=1e-6)
    assert torch.allclose(s.grad, torch.zeros_like(s), atol=1e-6)


def test_reverse_kl_seeks_a_mode_and_forward_kl_covers_both():
    """A discretized Gaussian student (two parameters: mean, log std) fitted to a bimodal teacher
    (an equal mixture of Gaussians at 12 and 28, std 2, on a grid of 41 tokens), from the same start
    nearer the left mode (from the exact middle, reverse KL has a symmetric stationary point):
    forward KL puts the mean between the modes with a wide spread; reverse KL settles on the
    nearer mode with the teacher component's own std, where its value is log 2 (note 001 section 14.3)."""
    x = torch.arange(41.0)

    def gauss_logits(mu, log_sigma):
        return -((x - mu) ** 2) / (2 * torch.exp(log_sigma) ** 2)

    teacher_p = torch.exp(gauss_logits(torch.tensor(12.0), torch.tensor(math.log(2.0)))) + \
        torch.exp(gauss_logits(torch.tensor(28.0), torch.tensor(math.log(2.0))))
    teacher_logits = torch.log(teacher_p / teacher_p.sum())[None]
    fitted = {}
    for divergence in ("forward_kl", "reverse_kl"):
        mu = torch.tensor(15.0, requires_grad=True)
        log_sigma = torch.tensor(math.log(2.5), requires_grad=True)
        opt = torch.optim.Adam([mu, log_sigma], lr=0.05)
        for _ in range(1500):
            opt.zero_grad()
            token_divergence(gauss_logits(mu, log_sigma)[None], teacher_logits, divergence=divergence).sum().backward()
            opt.step()
        with torch.no_grad():
            value = float(token_divergence(gauss_logits(mu, log_sigma)[None], teacher_logits, divergence=divergence))
        fitted[divergence] = (float(mu.detach()), float(torch.exp(log_sigma.detach())), value)
    mu_f, sigma_f, _ = fitted["forward_kl"]
    mu_r, sigma_r, value_r = fitted["reverse_kl"]
    assert abs(mu_f - 20.0) < 0.3 and sigma_f > 6.0                 # covers both modes
    assert abs(mu_r - 12.0) < 0.3 and abs(sigma_r - 2.0) < 0.2      # one mode, its own width
    assert value_r == pytest.approx(math.log(2.0), abs=2e-3)


def test_bad_arguments_are_named():
    s = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="share the vocabulary"):
        token_divergence(s, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence(s, s, divergence="tvd")
    with pytest.raises(ValueError, match="0 < beta < 1"):
        token_divergence(s, s, divergence="jsd", beta=0.0)
    with pytest.raises(ValueError, match="temperature"):
        token_divergence(s, s, temperature=0.0)


# ---- extreme and masked logits: finite where the divergence is, equal to a float64 reference ----------------


def _reference(s: torch.Tensor, t: torch.Tensor, divergence: str, beta: float, tau: float) -> torch.Tensor:
    """The definitions in float64 with 0·log 0 = 0. A -inf logit is replaced by -1e200 first: its
    probability is then exactly 0 in float64 too, and float64's own autograd stays free of 0·inf."""
    t = t.double()
    s = torch.where(torch.isinf(s), torch.full_like(s, -1e200), s) / tau
    t = torch.where(torch.isinf(t), torch.full_like(t, -1e200), t) / tau
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)

    def kl(lp, lq):
        p = lp.exp()
        return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)

    if divergence == "forward_kl":
        out = kl(lt, ls)
    elif divergence == "reverse_kl":
        out = kl(ls, lt)
    else:
        lm = torch.logaddexp(math.log(beta) + lt, math.log(1 - beta) + ls)
        out = beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)
    return out * tau**2


def _extreme_cases():
    g = torch.Generator().manual_seed(7)
    gap = torch.zeros(3, 5)
    gap[0, 0], gap[1, 0], gap[2, 0] = 90.0, 200.0, 1e4   # student far above the teacher on one entry
    flat = torch.zeros(3, 5)
    masked_t = torch.randn(3, 7, generator=g)
    masked_t[:, 2] = -math.inf
    masked_t[0, 3] = -1e9                                 # "very negative" masking
    masked_s = torch.randn(3, 7, generator=g)
    masked_s[:, 4] = -math.inf
    return [
        ("gap", gap, flat, 1.0),
        ("gap_reversed", flat, gap, 1.0),
        # random logits with spread ~12 over 1,000 tokens at temperature 0.5: gaps beyond 88 in the scaled logits
        ("wide_tau", torch.randn(4, 1000, generator=g) * 12, torch.randn(4, 1000, generator=g) * 12, 0.5),
        ("teacher_masked", torch.randn(3, 7, generator=g), masked_t, 1.0),
        ("student_masked", masked_s, torch.randn(3, 7, generator=g), 1.0),
    ]


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                             ("jsd", 0.9)])
@pytest.mark.parametrize("case", _extreme_cases(), ids=lambda c: c[0])
def test_extreme_and_masked_logits_match_a_float64_reference(case, divergence, beta):
    _, s, t, tau = case
    ref_in = s.double().clone().requires_grad_(True)
    ref = _reference(ref_in, t, divergence, beta, tau)
    x = s.clone().requires_grad_(True)
    out = token_divergence(x, t, divergence=divergence, beta=beta, temperature=tau)
    infinite = ref > 1e100   # the float64 reference's stand-in for +inf (a -1e200 logit on the wrong side)
    # +inf only where the KL truly is infinite: forward KL with p_S = 0 < p_T, reverse KL with p_T = 0 < p_S
    assert torch.equal(torch.isinf(out), infinite)
    assert not torch.isnan(out).any()
    if divergence == "jsd":
        assert not infinite.any()   # bounded by the binary entropy of beta
    finite_rows = ~infinite
    if not finite_rows.any():
        return
    # Error bound: d = log p_S - log p_T is formed from the scaled logits z/tau and their log-sum-exps,
    # about 4 roundings of numbers as large as scale = max |z / tau| (<= 2 eps32 scale each); a weighted
    # mean of such d (weights summing to 1) and the product add a few more: 32 eps32 scale absolute. It
    # is the input's own resolution: a logit of 1e4 is only known to 1e-3 in float32.
    finite_logits = torch.cat([s[torch.isfinite(s)], t[torch.isfinite(t)]]).abs()
    tol = 32 * torch.finfo(torch.float32).eps * max(1.0, float(finite_logits.max()) / tau)
    assert (out[finite_rows].double() - ref[finite_rows]).abs().max() <= tol
    weights = torch.arange(1.0, 1 + int(finite_rows.sum()))
    (out[finite_rows] * weights).sum().backward()
    (ref[finite_rows] * weights.double()).sum().backward()
    assert torch.isfinite(x.grad).all()
    # gradients are differences of probabilities (times bounded log-ratios for the JSD) whose relative
    # error is that of exp(d): the same bound, times the largest weight of the summed rows
    assert (x.grad.double() - ref_in.grad).abs().max() <= tol * float(weights.max())


def test_jsd_of_disjoint_supports_is_the_binary_entropy_of_beta():
    # teacher and student put all mass on different tokens (the rest masked): m splits beta / 1 - beta,
    # so JSD_beta = -beta log beta - (1 - beta) log(1 - beta) exactly
    s = torch.tensor([[0.0, -math.inf, -math.inf]])
    t = torch.tensor([[-math.inf, 0.0, -math.inf]])
    for beta in (0.5, 0.2):
        h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        x = s.clone().requires_grad_(True)
        out = token_divergence(x, t, divergence="jsd", beta=beta)
        assert float(out[0]) == pytest.approx(h, rel=1e-6)
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
