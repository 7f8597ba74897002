"""Closed form: on a tabular bandit, the ops' online-RL pieces find the KL-regularized optimum

    π*(k) = π_ref(k) · exp(r_k / β) / Z

A softmax policy over K = 5 one-token responses to one prompt, known rewards r_k and a fixed,
non-uniform reference. Each step samples groups of responses from the current policy (a fixed
torch.Generator seed) and takes one Adam step on a loss built only from ``posttrain.ops``.
"""

import torch

from posttrain.ops import (
    aggregate_loss,
    group_normalized_advantages,
    kl_k1,
    kl_k3,
    policy_gradient_loss,
    rloo_advantages,
)

REWARDS = torch.tensor([1.0, 0.6, 0.0, 0.3, 0.8])
LOG_REF = torch.log_softmax(torch.tensor([0.5, 0.0, -0.5, 1.0, -1.0]), 0)  # π_ref is not uniform
GROUP_SIZE, NUM_GROUPS = 8, 4


def optimum(beta: float) -> torch.Tensor:
    return torch.softmax(LOG_REF + REWARDS / beta, 0)


def train(step_loss, *, steps: int, lr: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Train softmax logits (from uniform) with ``step_loss(log_probs, actions) -> (B, 1) loss``."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.nn.Parameter(torch.zeros(len(REWARDS)))
    opt = torch.optim.Adam([logits], lr=lr)
    B = GROUP_SIZE * NUM_GROUPS
    mask = torch.ones(B, 1)  # one token per response
    for _ in range(steps):
        log_pi = torch.log_softmax(logits, 0)
        with torch.no_grad():
            actions = torch.multinomial(log_pi.exp(), B, replacement=True, generator=gen)
        log_probs = log_pi[actions][:, None]  # (B, 1), the sampled token's log-prob
        loss = aggregate_loss(step_loss(log_probs, actions), mask, "token_mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(logits.detach(), 0)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def test_rloo_with_k1_in_the_reward_converges_to_the_tilted_optimum():
    """REINFORCE + RLOO on r − β (log π − log π_ref) (k1 in the reward, detached).

    Its expected gradient is exactly ∇(E_π[r] − β KL(π ‖ π_ref)), whose maximizer is π*. At π*
    the shaped reward r_k − β log(π*(k)/π_ref(k)) = β log Z is the same for every response, so
    every leave-one-out advantage is 0 and π* is a *noise-free* fixed point: SGD noise does not
    blur the limit. Measured over seeds 0..4 (600 steps of 32 samples, < 1 s):
    TV ≤ 5.4e-8 and max |log π/π*| ≤ 9.6e-7 (float32 rounding of the shaped rewards).
    """
    beta = 0.5
    valid = torch.ones(GROUP_SIZE * NUM_GROUPS, dtype=torch.bool)

    def step_loss(log_probs, actions):
        shaped = REWARDS[actions] - beta * kl_k1(log_probs.detach(), LOG_REF[actions][:, None])[:, 0]
        adv, _ = rloo_advantages(shaped, valid, group_size=GROUP_SIZE)
        loss, _ = policy_gradient_loss(log_probs, None, adv, torch.ones_like(log_probs))
        return loss

    pi = train(step_loss, steps=600)
    target = optimum(beta)
    assert total_variation(pi, target) < 1e-6
    assert (pi.log() - target.log()).abs().max().item() < 1e-5
    # the optimum is far from both the start (uniform) and the reference
    assert total_variation(target, torch.full((5,), 0.2)) > 0.3
    assert total_variation(target, LOG_REF.exp()) > 0.2


def test_grpo_with_k3_in_the_loss_lands_near_the_optimum_at_small_beta():
    """GRPO advantages (group-normalized, raw rewards) + β·k3 in the loss (gradient through
    log π), as in DeepSeekMath.

    This is *not* an unbiased route to π*: on-policy, E_π[∇k3] = ∇KL(π_ref ‖ π) (the forward,
    mass-covering KL) rather than ∇KL(π ‖ π_ref), and dividing by the group std rescales the
    reward term. The fixed point keeps extra mass where π_ref has it: at β = 0.05,
    π* = (0.9957, 2.0e-4, 7.6e-10, 1.4e-6, 4.1e-3) while the run ends near
    (0.985, 0.0031, 0.0019, 0.0085, 0.0013): response 3, π_ref's favourite, keeps 0.85 %.
    Measured bias over seeds 0..4 (800 steps, < 1 s): TV(π, π*) = 0.0129–0.0139; 2000 steps
    give 0.0126–0.0133, so it is the fixed point, not slow convergence. It shrinks with β
    (2000 steps with a cosine-decayed learning rate: TV ≈ 0.006 at β = 0.02, 0.014 at
    β = 0.05, 0.03 at β = 0.1). We assert TV < 0.02.
    """
    beta = 0.05
    valid = torch.ones(GROUP_SIZE * NUM_GROUPS, dtype=torch.bool)

    def step_loss(log_probs, actions):
        adv, _ = group_normalized_advantages(REWARDS[actions], valid, group_size=GROUP_SIZE)
        loss, _ = policy_gradient_loss(log_probs, None, adv, torch.ones_like(log_probs))
        return loss + beta * kl_k3(log_probs, LOG_REF[actions][:, None])

    pi = train(step_loss, steps=800)
    target = optimum(beta)
    tv = total_variation(pi, target)
    assert tv < 0.02
    assert pi.argmax().item() == target.argmax().item() == 0
