"""KL estimators (r = pi_ref / pi_theta, samples from pi_theta) and the exact chunked KL."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.ops import KL_ESTIMATORS, exact_kl, kl_estimate, kl_k1, kl_k2, kl_k3


def naive_exact_kl(logits, ref_logits):
    log_p = F.log_softmax(logits.float(), -1)
    log_q = F.log_softmax(ref_logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


# ---- estimators: hand values -----------------------------------------------------------------


def test_estimators_by_hand():
    lp = torch.tensor([math.log(0.5)])  # pi_theta(a) = 0.5
    ref = torch.tensor([math.log(0.25)])  # pi_ref(a) = 0.25  ->  r = 0.5
    assert kl_k1(lp, ref).item() == pytest.approx(math.log(2), abs=1e-6)  # 0.6931
    assert kl_k2(lp, ref).item() == pytest.approx(0.5 * math.log(0.5) ** 2, abs=1e-6)  # 0.2402
    assert kl_k3(lp, ref).item() == pytest.approx(-0.5 + math.log(2), abs=1e-6)  # 0.1931
    assert kl_k3(lp, ref).item() == pytest.approx(0.1931472, abs=1e-6)


def test_estimators_zero_when_policy_equals_reference():
    lp = -torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) * 10
    for name in KL_ESTIMATORS:
        assert torch.equal(kl_estimate(lp, lp.clone(), name), torch.zeros(3, 5))


def test_kl_estimate_dispatch_default_and_errors():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -0.5])
    for name, fn in KL_ESTIMATORS.items():
        torch.testing.assert_close(kl_estimate(lp, ref, name), fn(lp, ref))
    torch.testing.assert_close(kl_estimate(lp, ref), kl_k3(lp, ref))
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(lp, ref, "k4")


def test_clamp_bounds_log_ratio_and_output_is_fp32():
    lp = torch.tensor([0.0, -50.0], dtype=torch.bfloat16)
    ref = torch.tensor([-50.0, 0.0], dtype=torch.bfloat16)
    out = kl_k1(lp, ref, clamp=10.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([10.0, -10.0]))
    k3 = kl_k3(lp, ref, clamp=10.0)  # log r = ±10
    torch.testing.assert_close(k3, torch.tensor([math.expm1(-10) + 10, math.expm1(10) - 10]))


def test_k3_gradient_sign():
    """d k3 / d log pi_theta = 1 - r: pushes log pi_theta down when pi_theta > pi_ref."""
    lp = torch.tensor([math.log(0.5)], requires_grad=True)
    kl_k3(lp, torch.tensor([math.log(0.25)])).backward()
    assert lp.grad.item() == pytest.approx(0.5, abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(-60, 0, width=32, allow_nan=False),
            st.floats(-60, 0, width=32, allow_nan=False),
        ),
        min_size=1,
        max_size=16,
    )
)
def test_k3_and_k2_non_negative(pairs):
    lp = torch.tensor([a for a, _ in pairs])
    ref = torch.tensor([b for _, b in pairs])
    assert (kl_k3(lp, ref) >= 0).all()
    assert (kl_k2(lp, ref) >= 0).all()
    assert torch.isfinite(kl_k3(lp, ref)).all()


# ---- estimators: statistics under samples from pi_theta ------------------------------------


def _sample_estimates(drift, seed, num_samples=200_000, V=8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(V, generator=g, dtype=torch.float64)
    ref_logits = logits + drift * torch.randn(V, generator=g, dtype=torch.float64)
    log_p, log_q = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
    tokens = torch.multinomial(log_p.exp(), num_samples, replacement=True, generator=g)
    lp, ref = log_p[tokens], log_q[tokens]
    truth = exact_kl(logits[None], ref_logits[None]).item()
    return truth, kl_k1(lp, ref), kl_k3(lp, ref)


@pytest.mark.parametrize("drift", [0.1, 1.0])
def test_k1_and_k3_are_unbiased(drift):
    truth, k1, k3 = _sample_estimates(drift, seed=0)
    n = k1.numel()
    for est in (k1, k3):
        standard_error = est.std().item() / math.sqrt(n)
        assert abs(est.mean().item() - truth) < 4 * standard_error


def test_k3_has_lower_variance_than_k1_for_small_drift():
    truth, k1, k3 = _sample_estimates(0.1, seed=1)
    assert truth > 0
    assert k3.var().item() < 0.1 * k1.var().item()


# ---- exact_kl ----------------------------------------------------------------------------------


def test_exact_kl_three_class_closed_form():
    p, q = [0.5, 0.25, 0.25], [0.25, 0.25, 0.5]
    # KL = 0.5 ln 2 + 0.25 ln 1 + 0.25 ln 0.5 = 0.25 ln 2; shifting logits changes nothing
    logits = torch.tensor([[[math.log(x) + 3.0 for x in p]]])
    ref_logits = torch.tensor([[[math.log(x) - 1.0 for x in q]]])
    assert exact_kl(logits, ref_logits).item() == pytest.approx(0.25 * math.log(2), abs=1e-6)


def test_exact_kl_zero_for_equal_logits():
    logits = 5 * torch.randn(2, 3, 17, generator=torch.Generator().manual_seed(2))
    out = exact_kl(logits, logits.clone(), chunk_size=4)
    assert out.abs().max().item() < 1e-6


@pytest.mark.parametrize("B, T, V, chunk", [(2, 5, 7, 3), (2, 5, 7, 10), (3, 4, 11, 64)])
def test_exact_kl_equals_naive_with_gradients(B, T, V, chunk):
    g = torch.Generator().manual_seed(V + chunk)
    logits = (2 * torch.randn(B, T, V, generator=g)).requires_grad_(True)
    ref_logits = (2 * torch.randn(B, T, V, generator=g)).requires_grad_(True)
    upstream = torch.randn(B, T, generator=g)
    out = exact_kl(logits, ref_logits, chunk_size=chunk)
    ref = naive_exact_kl(logits, ref_logits)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out >= 0).all()
    grads = torch.autograd.grad((out * upstream).sum(), [logits, ref_logits])
    grads_ref = torch.autograd.grad((ref * upstream).sum(), [logits, ref_logits])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_exact_kl_gradcheck_and_frozen_reference():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ref_logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: exact_kl(a, b, chunk_size=4), (logits, ref_logits))
    frozen = ref_logits.detach().to(torch.bfloat16)
    out = exact_kl(logits.float(), frozen)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive_exact_kl(logits.detach().float(), frozen))


def test_k3_far_off_policy_token_is_finite_with_a_finite_gradient():
    # log r = log pi_ref - log pi_theta = 100 > 88.7: exp(log r) overflows float32 without the cap. Capped at
    # K3_MAX_LOG_RATIO = 20: value expm1(20) - 20, gradient 0 (the cap is flat there); below the cap exact.
    from posttrain.ops.kl import K3_MAX_LOG_RATIO

    assert K3_MAX_LOG_RATIO == 20.0
    lp = torch.tensor([-101.0, -1.0, -1.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0 + 0.5, -1.0 - 30.0])   # log r = 100, 0.5, -30
    k3 = kl_k3(lp, ref)
    k3.sum().backward()
    expected = [math.expm1(20.0) - 20.0, math.expm1(0.5) - 0.5, math.expm1(-30.0) + 30.0]
    torch.testing.assert_close(k3.detach(), torch.tensor(expected))
    # d k3 / d log pi_theta = 1 - r where uncapped; the far side (log r = -30) keeps its exact gradient ~1
    torch.testing.assert_close(lp.grad, torch.tensor([0.0, 1.0 - math.exp(0.5), 1.0 - math.exp(-30.0)]))
    # the same through the dispatcher used by the RL loss, in a beta-weighted token-mean loss
    lp2 = lp.detach().clone().requires_grad_(True)
    loss = 0.04 * kl_estimate(lp2, ref, "k3").mean()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp2.grad).all()
