"""PPO with the exact per-state KL in the loss (loss.kl_estimator=exact, reference note 002, PPO-KL):
the loop's KL term equals the KL enumerated over a tiny vocabulary at every sampled state, and so
does its gradient; config checks."""

from __future__ import annotations

import pytest
import torch

from posttrain.algorithms.rl import OnlineRLAlgorithm, RLConfig, RLLossConfig, Sample, collate_samples
from posttrain.config import load_config
from posttrain.data import EncodedExample
from posttrain.errors import ConfigError

from .tiny import tiny_model

V = 16          # a vocabulary small enough to enumerate
TEMPERATURE = 0.7


def _groups():
    g = torch.Generator().manual_seed(3)
    groups = []
    for prompt_len, lengths in ((3, (4, 2)), (5, (3, 5))):
        prompt = torch.randint(1, V, (prompt_len,), generator=g).tolist()
        group = []
        for n in lengths:
            completion = torch.randint(1, V, (n,), generator=g).tolist()
            group.append(Sample(example=EncodedExample(input_ids=prompt + completion,
                                                       labels=[-100] * prompt_len + completion),
                                n_tokens=n, advantage=0.0, trained=True, rollout_logps=[0.0] * n,
                                ref_logps=[0.0] * n))
        groups.append(group)
    return groups


def _enumerated_kl_loss(policy, reference, groups, beta):
    """Token mean over all completion tokens of beta * sum_v p (log p - log q), each sequence run alone."""
    terms = []
    for s in (s for g in groups for s in g):
        ids = torch.tensor([s.example.input_ids])
        start = len(s.example.input_ids) - s.n_tokens
        z = policy(input_ids=ids).logits[0, start - 1:-1].float() / TEMPERATURE
        with torch.no_grad():
            zr = reference(input_ids=ids).logits[0, start - 1:-1].float() / TEMPERATURE
        logp, logq = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
        terms.append((logp.exp() * (logp - logq)).sum(-1))
    return beta * torch.cat(terms).mean()


def test_exact_kl_in_the_loss_equals_the_enumerated_kl_and_its_gradient():
    beta = 0.5
    policy = tiny_model("llama", vocab_size=V, seed=0, hidden=32)
    reference = tiny_model("llama", vocab_size=V, seed=1, hidden=32)
    reference.requires_grad_(False)
    loss_cfg = RLLossConfig(kl_beta=beta, kl_estimator="exact", kl_placement="loss", policy_loss="pg",
                            aggregation="token_mean").resolved("grpo")
    algo = OnlineRLAlgorithm(loss_cfg, temperature=TEMPERATURE, max_new_tokens=8)
    algo.reference = reference
    groups = _groups()
    batch = collate_samples(groups, pad_token_id=0, attn_implementation="sdpa", row_length=32, with_old=False,
                            with_ref=True)
    totals = {k: torch.tensor(float(v)) for k, v in algo.counts(batch).items()}
    loss, metrics = algo.loss(policy, batch, totals)   # advantages are 0: the loss is the KL term alone
    loss.backward()
    got_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    want = _enumerated_kl_loss(policy, reference, groups, beta)
    want.backward()
    # the same fp32 math in another order (chunked softmaxes, a prefix-shared packed forward): a few ulps of
    # the O(1) logits, times the O(1) sums
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert float(metrics["kl_exact"]) == pytest.approx(float(want.detach()) / beta, rel=1e-5)
    assert float(want.detach()) > 1e-3   # the two models really differ
    for got, p in zip(got_grads, policy.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)


def test_exact_kl_is_zero_with_zero_gradient_at_the_reference():
    policy = tiny_model("llama", vocab_size=V, seed=0, hidden=32)
    loss_cfg = RLLossConfig(kl_beta=1.0, kl_estimator="exact", kl_placement="loss", policy_loss="pg",
                            aggregation="token_mean").resolved("grpo")
    algo = OnlineRLAlgorithm(loss_cfg, temperature=1.0, max_new_tokens=8)
    algo.reference = tiny_model("llama", vocab_size=V, seed=0, hidden=32)   # the same weights
    batch = collate_samples(_groups(), pad_token_id=0, attn_implementation="sdpa", row_length=32, with_old=False,
                            with_ref=True)
    totals = {k: torch.tensor(float(v)) for k, v in algo.counts(batch).items()}
    loss, _ = algo.loss(policy, batch, totals)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6
    assert max(float(p.grad.abs().max()) for p in policy.parameters()) < 1e-6


def test_exact_kl_config_checks():
    cfg = load_config(RLConfig, None, ["algorithm=grpo", "loss.kl_estimator=exact"])
    assert cfg.loss.resolved("grpo").kl_placement == "loss"
    with pytest.raises(ConfigError, match="loss.kl_estimator=exact") as e:
        load_config(RLConfig, None, ["algorithm=rloo", "loss.kl_estimator=exact"])   # rloo: KL in the reward
    assert "loss.kl_placement=loss" in e.value.fix


def test_a_run_with_the_exact_kl(tmp_path):
    from .test_rl import _cfg, _run

    res = _run(_cfg(tmp_path / "r", **{"algorithm": "grpo", "loss.kl_estimator": "exact", "train.max_steps": 2}))
    first, second = res.fit.history
    assert first["kl_exact"] == 0.0            # the policy is its reference before the first update
    assert 0.0 < second["kl_exact"] < 10.0
