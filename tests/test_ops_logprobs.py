"""Chunked log-probs / entropy / fused LM head against naive references and closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.ops import compute_entropy, linear_log_probs, token_log_probs

# ---- naive references (kept out of the package on purpose) --------------------------------


def naive_log_probs(logits, labels):
    log_p = F.log_softmax(logits.float(), dim=-1)
    picked = log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels >= 0, picked, torch.zeros_like(picked))


def naive_entropy(logits):
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# (B, T, V, chunk): chunk smaller than, equal to, larger than N = B*T; N not divisible by chunk
SHAPES = [(2, 5, 7, 3), (2, 5, 7, 10), (2, 5, 7, 64), (3, 7, 13, 4), (1, 1, 5, 1)]


# ---- entropy --------------------------------------------------------------------------------


def test_entropy_uniform_is_log_v():
    out = compute_entropy(torch.zeros(2, 3, 1000))
    torch.testing.assert_close(out, torch.full((2, 3), math.log(1000)))


def test_entropy_one_hot_is_zero():
    logits = torch.zeros(1, 2, 50)
    logits[..., 7] = 1e4
    assert compute_entropy(logits).abs().max().item() < 1e-6


def test_entropy_two_class_by_hand():
    # p = [0.25, 0.75]  <=>  logits [0, ln 3]
    out = compute_entropy(torch.tensor([[[0.0, math.log(3.0)]]]))
    expected = -0.25 * math.log(0.25) - 0.75 * math.log(0.75)  # 0.5623...
    assert out.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.5623351446, abs=1e-9)


@pytest.mark.parametrize("B, T, V, chunk", SHAPES)
def test_entropy_chunked_equals_naive_with_gradient(B, T, V, chunk):
    logits = (3 * torch.randn(B, T, V, generator=_gen(V + chunk))).requires_grad_(True)
    upstream = torch.randn(B, T, generator=_gen(1))
    out = compute_entropy(logits, chunk_size=chunk)
    ref = naive_entropy(logits)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad((out * upstream).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * upstream).sum(), logits)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_entropy_bf16_input():
    logits = (3 * torch.randn(2, 6, 33, generator=_gen(3))).to(torch.bfloat16).requires_grad_(True)
    out = compute_entropy(logits, chunk_size=5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive_entropy(logits.detach()), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_entropy_huge_logits_are_stable():
    logits = 1e4 * torch.randn(3, 4, 17, generator=_gen(4))
    logits[0, 0] = torch.linspace(-1e4, 1e4, 17)
    logits = logits.requires_grad_(True)
    out = compute_entropy(logits, chunk_size=5)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(out.double(), naive_entropy(logits.detach().double()).double(), atol=1e-4, rtol=0)


def test_entropy_allows_minus_inf_logits():
    logits = torch.tensor([[[0.0, math.log(3.0), -math.inf]]], requires_grad=True)
    out = compute_entropy(logits)
    out.backward()
    assert out.item() == pytest.approx(0.5623351446, abs=1e-6)
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, 2].item() == 0.0


def test_entropy_gradcheck_float64():
    logits = torch.randn(2, 3, 6, dtype=torch.float64, generator=_gen(5), requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: compute_entropy(z, chunk_size=4), (logits,))


# ---- token_log_probs -----------------------------------------------------------------------


@pytest.mark.parametrize("B, T, V, chunk", SHAPES)
def test_token_log_probs_equal_naive_with_gradient(B, T, V, chunk):
    g = _gen(B * 100 + V + chunk)
    logits = (3 * torch.randn(B, T, V, generator=g)).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g)
    out = token_log_probs(logits, labels, chunk_size=chunk)
    ref = naive_log_probs(logits, labels)
    assert out.dtype == torch.float32 and out.shape == (B, T)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad((out * upstream).sum(), logits)
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), logits)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)


def test_ignored_labels_give_zero_and_no_gradient():
    logits = torch.randn(2, 4, 9, generator=_gen(6), requires_grad=True)
    labels = torch.tensor([[3, -100, 0, 8], [-100, -100, 5, -1]])
    out = token_log_probs(logits, labels, chunk_size=3)
    ignored = labels < 0
    assert torch.equal(out[ignored], torch.zeros(int(ignored.sum())))
    assert (out[~ignored] < 0).all()
    out.sum().backward()
    assert torch.equal(logits.grad[ignored], torch.zeros(int(ignored.sum()), 9))
    # a kept row's gradient sums to 0 (onehot - softmax)
    torch.testing.assert_close(logits.grad[~ignored].sum(-1), torch.zeros(int((~ignored).sum())))


def test_token_log_probs_bf16_input():
    g = _gen(7)
    logits = (4 * torch.randn(2, 5, 40, generator=g)).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 40, (2, 5), generator=g)
    out = token_log_probs(logits, labels, chunk_size=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive_log_probs(logits.detach(), labels), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    ref = logits.detach().float().requires_grad_(True)
    naive_log_probs(ref, labels).sum().backward()
    torch.testing.assert_close(logits.grad.float(), ref.grad, atol=1e-2, rtol=1e-2)


def test_token_log_probs_on_shifted_non_contiguous_logits():
    g = _gen(8)
    logits = torch.randn(3, 6, 10, generator=g, requires_grad=True)
    labels = torch.randint(0, 10, (3, 6), generator=g)
    out = token_log_probs(logits[:, :-1], labels[:, 1:], chunk_size=4)
    ref = naive_log_probs(logits[:, :-1], labels[:, 1:])
    torch.testing.assert_close(out, ref)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    (grad_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(grad, grad_ref)
    assert torch.equal(grad[:, -1], torch.zeros(3, 10))


def test_token_log_probs_huge_logits_are_finite():
    logits = (1e4 * torch.randn(2, 3, 11, generator=_gen(9))).requires_grad_(True)
    labels = logits.detach().argmax(-1)
    out = token_log_probs(logits, labels)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()


def test_token_log_probs_gradcheck_float64_and_shape_check():
    g = _gen(10)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([[0, 4, -100], [2, 2, 1]])
    assert torch.autograd.gradcheck(lambda z: token_log_probs(z, labels, chunk_size=2), (logits,))
    with pytest.raises(ValueError, match="labels shape"):
        token_log_probs(logits, labels[:, :2])


# ---- linear_log_probs (fused LM head) --------------------------------------------------------


def naive_linear(hidden, weight, bias, labels):
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    return naive_log_probs(logits, labels), naive_entropy(logits)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_log_probs_equal_naive_with_gradients(with_bias, return_entropy, seed):
    g = _gen(seed)
    B, T, H, V = 2, 7, 6, 23
    chunk = int(torch.randint(1, 2 * B * T, (1,), generator=g))
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    bias = torch.randn(V, generator=g, requires_grad=True) if with_bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    g_lp, g_h = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    params = [hidden, weight] + ([bias] if with_bias else [])

    lp, ent = linear_log_probs(hidden, weight, labels, bias=bias, chunk_size=chunk, return_entropy=return_entropy)
    lp_ref, ent_ref = naive_linear(hidden, weight, bias, labels)
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=1e-5)
    objective, objective_ref = (lp * g_lp).sum(), (lp_ref * g_lp).sum()
    if return_entropy:
        torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=1e-5)
        objective = objective + (ent * g_h).sum()
        objective_ref = objective_ref + (ent_ref * g_h).sum()
    else:
        assert ent is None
    grads = torch.autograd.grad(objective, params)
    grads_ref = torch.autograd.grad(objective_ref, params)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_linear_entropy_only_gradient_and_ignored_labels():
    g = _gen(11)
    hidden = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    weight = torch.randn(13, 5, generator=g, requires_grad=True)
    labels = torch.full((3, 4), -100)
    lp, ent = linear_log_probs(hidden, weight, labels, chunk_size=5, return_entropy=True)
    assert torch.equal(lp, torch.zeros(3, 4))
    # all labels ignored: the log-prob output carries no gradient at all
    (gh,) = torch.autograd.grad(lp.sum(), hidden, retain_graph=True)
    assert torch.equal(gh, torch.zeros_like(hidden))
    # entropy alone still flows
    grads = torch.autograd.grad(ent.sum(), [hidden, weight])
    grads_ref = torch.autograd.grad(naive_linear(hidden, weight, None, labels)[1].sum(), [hidden, weight])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_linear_frozen_weight_and_bf16():
    g = _gen(12)
    hidden = torch.randn(2, 3, 8, generator=g).to(torch.bfloat16).requires_grad_(True)
    weight = torch.randn(19, 8, generator=g).to(torch.bfloat16)  # frozen lm_head
    labels = torch.randint(0, 19, (2, 3), generator=g)
    lp, _ = linear_log_probs(hidden, weight, labels, chunk_size=4)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, naive_linear(hidden.detach(), weight, None, labels)[0], atol=1e-4, rtol=1e-4)
    lp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad is None


def test_linear_log_probs_gradcheck_float64():
    g = _gen(13)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([[1, -100, 6], [0, 3, 3]])

    def fn(h, w, b):
        return linear_log_probs(h, w, labels, bias=b, chunk_size=4, return_entropy=True)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_default_chunk_rows_come_from_a_byte_budget():
    from posttrain.ops.logprobs import CHUNK_BYTES, default_chunk_rows

    assert CHUNK_BYTES == 32 << 20
    assert default_chunk_rows(32768) == 256 and default_chunk_rows(131072) == 64
    assert default_chunk_rows(10**9) == 16  # a floor, never row by row
    assert default_chunk_rows(512) == 16384


def test_default_chunking_equals_explicit_chunks():
    """chunk_size=None picks rows from the byte budget; the values equal any explicit chunking."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 8, generator=g)
    w = torch.randn(50, 8, generator=g)
    y = torch.randint(0, 50, (3, 7), generator=g)
    logits = h @ w.T
    assert torch.allclose(token_log_probs(logits, y), token_log_probs(logits, y, chunk_size=2), atol=1e-6)
    assert torch.allclose(compute_entropy(logits), compute_entropy(logits, chunk_size=3), atol=1e-6)
    lp, _ = linear_log_probs(h, w, y)
    assert torch.allclose(lp, linear_log_probs(h, w, y, chunk_size=5)[0], atol=1e-5)
