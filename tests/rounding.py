"""Bounds for comparing two training runs that are equal in exact arithmetic but round differently
(GA=1 vs GA=k, one process vs two): they sum the same terms in another order, and another CPU's kernels
(AVX-512 vs AVX2, other blocking, other thread counts) change that order again, so a tolerance must follow
from the arithmetic, not from what one machine happened to give.

* A sum of n fp32 terms, in any order, errs by at most ``gamma(n) * sum |terms|`` (Higham, *Accuracy and
  Stability of Numerical Algorithms*, 2nd ed., 4.2): the bound holds for every kernel and ISA.
* AdamW is scale-free: its step is ``lr * m_hat / (sqrt(v_hat) + eps)``, a function of each element's
  gradient *relative* to its own size. An element whose gradient is near its rounding error (a sum that
  cancels) or near ``eps`` (an embedding or LM-head row the batch barely touches) can step differently by
  up to ~lr in the two runs; elements with a well-resolved gradient step alike to a few ulp. So compare
  the gradients (where GA's equivalence lives) tightly, and the trained weights by how far Adam may carry
  the gradients' difference (:func:`assert_adamw_weights_explained`), never by a fixed fraction of the
  update.
"""

from __future__ import annotations

import contextlib

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

U = 2.0 ** -24  # fp32 unit roundoff


def gamma(n: int) -> float:
    """``gamma_n = n u / (1 - n u)``: the worst-case relative error of an fp32 sum of n terms, any order."""
    return n * U / (1 - n * U)


@contextlib.contextmanager
def optimizer_steps():
    """Record every optimizer step of the code inside (a global pre-step hook, so after clipping: the
    gradients AdamW uses): per step, per param group, its ``lr``, ``betas``, ``eps``, a float64 copy of the
    gradients, and the parameters themselves (live: after the run they hold the trained weights)."""
    steps: list[list[dict]] = []

    def hook(opt, args, kwargs):
        assert all(p.grad is not None for g in opt.param_groups for p in g["params"])  # (AdamW would skip one)
        steps.append([{"lr": g["lr"], "betas": g["betas"], "eps": g["eps"], "params": list(g["params"]),
                       "grads": [p.grad.detach().double().clone() for p in g["params"]]}
                      for g in opt.param_groups])

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield steps
    finally:
        handle.remove()


def assert_same_gradients(step_a: list[dict], step_b: list[dict], rel: float = 1e-5):
    """One optimizer step's gradients of two runs taken at the same weights on the same data: every tensor
    within ``rel`` of its norm, normwise (a zero gradient must be zero in both). Per element the relative
    error is unbounded where the sum cancels; normwise it is the rounding of the whole computation, a few
    ulp measured (~5 on AVX-512 and AVX2 kernels); the default 1e-5 (~170 ulp) is the tolerance these tests
    hold the gradient norm to."""
    assert len(step_a) == len(step_b)
    for gi, (ga, gb) in enumerate(zip(step_a, step_b)):
        for j, (x, y) in enumerate(zip(ga["grads"], gb["grads"], strict=True)):
            assert float((x - y).norm()) <= rel * float(y.norm()), (gi, j, float((x - y).norm() / y.norm()))


def adam_direction_gap(ga: torch.Tensor, gb: torch.Tensor, betas, eps: float) -> torch.Tensor:
    """Per element, an upper bound on ``|r(ga) - r(gb)|``, ``r = m_hat / (sqrt(v_hat) + eps)`` AdamW's
    direction at step T, for gradient histories ``ga``, ``gb`` of shape (T, ...).

    ``m_hat = sum_k a_k g_k``, ``v_hat = sum_k c_k g_k^2`` (the bias-corrected EMAs). With D = sqrt(v_hat):
    |m_hat| <= R D (Cauchy-Schwarz, R = sqrt(sum a_k^2 / c_k)); |grad m_hat| = A = sqrt(sum a_k^2);
    |grad D| <= sqrt(max c); so |grad r| <= (A + R sqrt(max c)) / (D + eps) = L / (D + eps). On the segment
    from ga to gb, D >= sqrt(min c) * (max(|ga|, |gb|) - |ga - gb|), hence
    |r(ga) - r(gb)| <= L |ga - gb| / (sqrt(min c) (max(|ga|, |gb|) - |ga - gb|)+ + eps), and always
    <= 2R since |r| < R (norms over the T steps). T=1: r = g / (|g| + eps), L = 2, R = 1; T=2 with
    betas (0.9, 0.95): R = 1.0013."""
    b1, b2 = betas
    T = ga.shape[0]
    k = torch.arange(T, dtype=torch.float64)
    a = (1 - b1) * b1 ** (T - 1 - k) / (1 - b1 ** T)
    c = (1 - b2) * b2 ** (T - 1 - k) / (1 - b2 ** T)
    R = float((a * a / c).sum().sqrt())
    L = float((a * a).sum().sqrt()) + R * float(c.max().sqrt())
    d = (ga - gb).norm(dim=0)
    g = (torch.maximum(ga.norm(dim=0), gb.norm(dim=0)) - d).clamp(min=0)
    return (L * d / (float(c.min().sqrt()) * g + eps)).clamp(max=2 * R)


def assert_adamw_weights_explained(run_a: list[list[dict]], run_b: list[list[dict]]):
    """The trained weights of two AdamW runs (recorded by :func:`optimizer_steps`, same start, same param
    groups) differ, element by element, by no more than Adam's response to the difference of their
    recorded gradients: ``sum_t lr_t * adam_direction_gap(...)`` (decoupled decay multiplies a difference
    by 1 - lr * wd <= 1), plus the update's own fp32 rounding in each run (<= u |w| for the subtraction and
    ~8 u relative in the direction, |r| < 1.01, per step: 2 u (|w| + 10 lr) for the two runs)."""
    T = len(run_a)
    assert T == len(run_b) > 0
    for gi, group in enumerate(run_b[-1]):
        for j, pb in enumerate(group["params"]):
            pa = run_a[-1][gi]["params"][j]
            ga = torch.stack([run_a[t][gi]["grads"][j] for t in range(T)])
            gb = torch.stack([run_b[t][gi]["grads"][j] for t in range(T)])
            bound = sum(run_b[t][gi]["lr"] * adam_direction_gap(ga[: t + 1], gb[: t + 1], run_b[t][gi]["betas"],
                                                               run_b[t][gi]["eps"]) for t in range(T))
            wb = pb.detach().double()
            bound = bound + sum(2 * U * (wb.abs() + 10 * run_b[t][gi]["lr"]) for t in range(T))
            diff = (pa.detach().double() - wb).abs()
            assert (diff <= bound).all(), (gi, j, float((diff - bound).max()))
