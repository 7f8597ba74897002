"""Closed-form optima of the preference losses on a tabular policy.

One prompt with K = 4 possible responses; the policy is ``π_θ = softmax(θ)`` with the K logits
as free parameters, so "sequence log-probs" are just ``log π_θ(y_i)``. Each test minimizes a
loss from ``posttrain.ops`` to convergence (L-BFGS, float64) and compares the optimum with the
closed form from the reference notes:

- DPO recovers the Bradley–Terry reward up to a constant:
  ``β[(log π − log π_ref)_i − (log π − log π_ref)_j] = r*_i − r*_j``, i.e. ``π = π* ∝
  π_ref · exp(r*/β)`` (note 001 §6.2–6.5).
- IPO drives every observed margin to ``1/(2τ)`` (note 001 §7.1).
- The exponential-tilt loss recovers ``π*`` from rewards alone (note 002 §10.9).
"""

import math

import torch

from posttrain.ops import dpo_loss, ipo_loss, tilt_loss

K = 4
BETA = 0.5
R_STAR = torch.tensor([0.0, 0.8, -0.5, 1.6], dtype=torch.float64)  # the true BT reward


def _ref_log_probs(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)


def _minimize(objective, theta0: torch.Tensor, rounds: int = 5) -> torch.Tensor:
    """L-BFGS (strong Wolfe) on the K logits; returns the optimal logits (detached)."""
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
        history_size=20, line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = objective(torch.log_softmax(theta, 0))
        loss.backward()
        return loss

    for _ in range(rounds):
        opt.step(closure)
    return theta.detach()


def _ordered_pairs():
    idx = [(i, j) for i in range(K) for j in range(K) if i != j]
    chosen = torch.tensor([i for i, _ in idx])
    rejected = torch.tensor([j for _, j in idx])
    return chosen, rejected


def _implicit_reward_gaps(log_pi, ref, chosen, rejected):
    u = BETA * (log_pi - ref)
    return u[chosen] - u[rejected]


def _dpo_objective(ref, chosen, rejected, weights):
    """Σ_pairs w · L_dpo(chosen, rejected) / Σ w."""

    def objective(log_pi):
        losses, _ = dpo_loss(
            log_pi[chosen], log_pi[rejected], ref[chosen], ref[rejected], None, None, beta=BETA
        )
        return (weights * losses).sum() / weights.sum()

    return objective


def test_dpo_exact_expected_loss_recovers_the_bt_reward():
    """Exact population loss: every ordered pair (i ≻ j) weighted by its BT probability
    σ(r*_i − r*_j). Its minimizer satisfies σ(h_ij) = σ(r*_i − r*_j) for all pairs at once, so
    the implicit reward gaps equal the true gaps and π equals π* = π_ref·exp(r*/β)/Z.
    Tolerance: 1e-6 on every gap and every probability (optimizer precision; achieved ≈1e-9)."""
    ref = _ref_log_probs()
    chosen, rejected = _ordered_pairs()
    p_bt = torch.sigmoid(R_STAR[chosen] - R_STAR[rejected])
    theta = _minimize(_dpo_objective(ref, chosen, rejected, p_bt), ref.clone())  # start: π = π_ref
    log_pi = torch.log_softmax(theta, 0)

    gaps = _implicit_reward_gaps(log_pi, ref, chosen, rejected)
    true_gaps = R_STAR[chosen] - R_STAR[rejected]
    assert (gaps - true_gaps).abs().max().item() < 1e-6
    pi_star = torch.softmax(ref + R_STAR / BETA, 0)
    assert (log_pi.exp() - pi_star).abs().max().item() < 1e-6


def test_dpo_on_sampled_preferences_is_within_the_sampling_noise():
    """20,000 comparisons: a uniformly drawn unordered pair, the label drawn from BT with r*
    (fixed seed). DPO's optimum is then the BT maximum-likelihood estimate, whose gaps have
    standard errors σ_ij from the Fisher information I = Σ n_ij p_ij (1 − p_ij) e_ij e_ijᵀ
    (e_ij = e_i − e_j). Tolerance: every gap within 4 σ_ij of the truth (σ_ij ≈ 0.03 here, so
    about 0.12). Achieved for this seed: max |error| = 0.077, max |error| / σ = 2.8 (over
    seeds the errors / σ have unit standard deviation; the 99th percentile of the maximum
    over the 6 gaps is ≈ 3.2)."""
    g = torch.Generator().manual_seed(1234)
    n = 20_000
    pairs = [(i, j) for i in range(K) for j in range(i + 1, K)]
    which = torch.randint(len(pairs), (n,), generator=g)
    first = torch.tensor([pairs[k][0] for k in which.tolist()])
    second = torch.tensor([pairs[k][1] for k in which.tolist()])
    first_wins = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(R_STAR[first] - R_STAR[second])
    chosen = torch.where(first_wins, first, second)
    rejected = torch.where(first_wins, second, first)
    # aggregate identical comparisons into counts (same loss, cheaper)
    keys = chosen * K + rejected
    counts = torch.bincount(keys, minlength=K * K).to(torch.float64)
    ci, ri = _ordered_pairs()
    weights = counts[ci * K + ri]

    ref = _ref_log_probs()
    theta = _minimize(_dpo_objective(ref, ci, ri, weights), ref.clone())
    gaps = _implicit_reward_gaps(torch.log_softmax(theta, 0), ref, ci, ri)
    errors = gaps - (R_STAR[ci] - R_STAR[ri])

    fisher = torch.zeros(K, K, dtype=torch.float64)
    for i, j in pairs:
        n_ij = counts[i * K + j] + counts[j * K + i]
        p = torch.sigmoid(R_STAR[i] - R_STAR[j])
        e = torch.zeros(K, dtype=torch.float64)
        e[i], e[j] = 1.0, -1.0
        fisher += n_ij * p * (1 - p) * torch.outer(e, e)
    cov = torch.linalg.pinv(fisher)
    sigma = torch.tensor(
        [math.sqrt(cov[i, i] + cov[j, j] - 2 * cov[i, j]) for i, j in zip(ci.tolist(), ri.tolist())],
        dtype=torch.float64,
    )
    assert (sigma < 0.05).all()  # the noise scale the tolerance is built on
    assert (errors.abs() / sigma).max().item() < 4.0


def test_ipo_deterministic_chain_converges_to_the_target_margin():
    """IPO with deterministic preferences on a chain y0 ≻ y1 ≻ y2 ≻ y3 (only adjacent pairs
    observed), response lengths 3, 1, 2, 5 and τ = β = 0.25 (target 1/(2τ) = 2).

    With all six pairs observed the targets would be inconsistent (h_02 = h_01 + h_12 cannot
    equal both 1/(2τ) and 2/(2τ)), so the chain is the setup where every target is reachable
    at once: the loss goes to 0 and each observed length-averaged margin to exactly 1/(2τ);
    the unobserved margins follow by addition (h_02 = 2·1/(2τ), h_03 = 3·1/(2τ)). DPO on the same
    data has no finite optimum (its margins grow without bound), IPO's is finite.
    Tolerance: 1e-6 on each margin (achieved ≈1e-9)."""
    tau = 0.25
    target = 1 / (2 * tau)
    lengths = torch.tensor([3, 1, 2, 5])
    ref = _ref_log_probs(seed=5)
    chosen, rejected = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])

    def objective(log_pi):
        losses, _ = ipo_loss(
            log_pi[chosen], log_pi[rejected], ref[chosen], ref[rejected],
            lengths[chosen], lengths[rejected], beta=tau,
        )
        return losses.mean()

    theta = _minimize(objective, ref.clone())
    log_pi = torch.log_softmax(theta, 0)
    v = (log_pi - ref) / lengths  # length-averaged log-ratio of each response
    observed = v[chosen] - v[rejected]
    assert (observed - target).abs().max().item() < 1e-6
    assert abs((v[0] - v[2]).item() - 2 * target) < 1e-6
    assert abs((v[0] - v[3]).item() - 3 * target) < 1e-6
    assert objective(log_pi).item() < 1e-12


def test_tilt_recovers_the_exponential_tilt_of_a_uniform_reference():
    """All K responses once each, π_ref uniform: −Σ ω_i log π_i is a cross-entropy, minimized
    at π = ω = softmax(r/β) = π* (the weights are exactly the tilted reference).
    Tolerance: 1e-6 per probability (achieved ≈1e-9)."""
    logits0 = torch.zeros(K, dtype=torch.float64)
    group = torch.zeros(K, dtype=torch.long)

    def objective(log_pi):
        losses, _ = tilt_loss(log_pi, R_STAR, group, None, beta=BETA)
        return losses.sum()

    pi = torch.softmax(_minimize(objective, logits0), 0)
    pi_star = torch.softmax(R_STAR / BETA, 0)  # π_ref uniform
    assert (pi - pi_star).abs().max().item() < 1e-6


def test_tilt_on_samples_from_the_reference_is_self_normalized_importance_sampling():
    """N = 4,000 responses sampled from a non-uniform π_ref (fixed seed), one group. The
    optimum is the self-normalized importance estimate π̂_i = n_i e^{r_i/β} / Σ_j n_j e^{r_j/β}
    (checked to 1e-6), which approaches π* = π_ref·e^{r/β}/Z as N grows. Tolerance: each
    probability within 4 standard errors of π* (delta method on the multinomial counts n;
    σ_i ≈ 0.002–0.017 here). Achieved: max |π̂ − π*| = 0.013, max error / σ = 1.5."""
    ref = _ref_log_probs(seed=7)
    g = torch.Generator().manual_seed(99)
    n = 4000
    samples = torch.multinomial(ref.exp(), n, replacement=True, generator=g)
    group = torch.zeros(n, dtype=torch.long)

    def objective(log_pi):
        losses, _ = tilt_loss(log_pi[samples], R_STAR[samples], group, None, beta=BETA, num_groups=1)
        return losses.sum()

    pi = torch.softmax(_minimize(objective, torch.zeros(K, dtype=torch.float64)), 0)
    counts = torch.bincount(samples, minlength=K).to(torch.float64)
    w = torch.exp(R_STAR / BETA)
    assert (pi - counts * w / (counts * w).sum()).abs().max().item() < 1e-6

    # standard errors: π̂(n) = n⊙w / (n·w), Cov(n) = N (diag p − p pᵀ), linearized at n = N p
    p = ref.exp()
    mean_counts = n * p
    total = (mean_counts * w).sum()
    jac = torch.diag(w) / total - torch.outer(mean_counts * w, w) / total**2
    cov = jac @ (n * (torch.diag(p) - torch.outer(p, p))) @ jac.T
    sigma = cov.diagonal().sqrt()
    pi_star = torch.softmax(ref + R_STAR / BETA, 0)
    assert ((pi - pi_star).abs() / sigma).max().item() < 4.0
