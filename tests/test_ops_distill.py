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
