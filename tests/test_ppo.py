"""PPO with a critic on the online loop: GAE over per-token rewards in the loop (closed forms),
the KL in the reward, the critic's checkpoints and learning rate, GA and resume equality with a
critic, critic initialization from a reward model, and the critic's config errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from posttrain.algorithms.rl.critic import PolicyWithCritic, critic_from_policy
from posttrain.algorithms.rl import RLRunner, Sample, run_rl
from posttrain.data import EncodedExample
from posttrain.errors import ConfigError
from posttrain.ops import FixedKLController
from posttrain.train.optim import build_optimizer

from .rounding import assert_adamw_weights_explained, assert_same_gradients, gamma, optimizer_steps
from .test_rl import _cfg, _run, assert_cli_error, full_and_resumed
from .tiny import tiny_model, world_tokenizer


def _samples(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gae_with_lambda_one_gives_the_reward_minus_the_value(tmp_path):
    """gamma = lambda = 1, no KL, no whitening: every token's return is the sequence reward and its
    advantage the reward minus the critic's value of the state before it. In the first iteration
    the zero-initialized critic says 0 everywhere; in the second its values have moved."""
    res = _run(_cfg(tmp_path / "r", **{"algorithm": "ppo", "loss.kl_beta": 0.0, "loss.lam": 1.0,
                                       "loss.whiten_advantages": False, "train.max_steps": 2,
                                       "critic.lr": 1e-2}))
    rows = _samples(tmp_path / "r" / "samples.jsonl")
    assert {r["iteration"] for r in rows} == {1, 2}
    for r in rows:
        assert len(r["token_advantages"]) == len(r["returns"]) == len(r["values"]) == r["tokens"]
        assert r["returns"] == pytest.approx([r["reward"]] * r["tokens"], abs=1e-6)
        want = [r["reward"] - v for v in r["values"]]
        assert r["token_advantages"] == pytest.approx(want, abs=1e-6)
        if r["iteration"] == 1:
            assert r["values"] == [0.0] * r["tokens"]
    assert any(abs(v) > 1e-4 for r in rows if r["iteration"] == 2 for v in r["values"])
    h = res.fit.history
    assert h[0]["advantage/value_mean"] == 0.0 and h[0]["advantage/explained_variance"] == 0.0
    assert h[0]["value_loss"] > h[1]["value_loss"] > 0


def _gae_reference(rewards, values, gamma, lam):
    """The textbook backward loop for one episode."""
    adv, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        nxt = values[t + 1] if t + 1 < len(rewards) else 0.0
        last = rewards[t] + gamma * nxt - values[t] + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


def _runner(*, beta, gamma, lam, whiten, estimator="k1"):
    r = object.__new__(RLRunner)
    r.loss = type("L", (), {"kl_placement": "reward", "kl_estimator": estimator})()
    r.reference = object()  # only tested for presence
    r.state = type("S", (), {"kl": FixedKLController(beta)})()
    r.est_hparams = {"gamma": gamma, "lam": lam, "whiten": whiten}
    r.process = None  # no process reward model
    return r


def _sample(n, seed, trained=True):
    g = torch.Generator().manual_seed(seed)
    return Sample(example=EncodedExample(input_ids=[1] * (n + 2), labels=[-100, -100] + [1] * n), n_tokens=n,
                  advantage=0.0, trained=trained, rollout_logps=[0.0] * n,
                  old_logps=(-torch.rand(n, generator=g)).tolist(), ref_logps=(-torch.rand(n, generator=g)).tolist(),
                  old_values=torch.randn(n, generator=g).tolist())


def test_token_rewards_carry_the_kl_and_the_score_at_the_last_token():
    """The loop's per-token rewards (-beta * k1 on every token, the reward added at the last one)
    through GAE equal the textbook loop per episode; an excluded sample gets zeros and takes no part
    in the whitening."""
    beta, gamma, lam = 0.1, 0.9, 0.8
    groups = [[_sample(5, 1), _sample(3, 2)], [_sample(4, 3, trained=False), _sample(1, 4)]]
    total = torch.tensor([1.0, -0.5, float("nan"), 2.0])
    valid = torch.tensor([True, True, False, True])
    _runner(beta=beta, gamma=gamma, lam=lam, whiten=False)._token_advantages(groups, total, valid)
    flat = [s for g in groups for s in g]
    for s, score in zip(flat, total.tolist()):
        if not s.trained:
            assert s.token_advantages == [0.0] * s.n_tokens and s.returns == [0.0] * s.n_tokens
            continue
        rewards = [-beta * (o - r) for o, r in zip(s.old_logps, s.ref_logps)]
        rewards[-1] += score
        adv, ret = _gae_reference(rewards, s.old_values, gamma, lam)
        assert s.token_advantages == pytest.approx(adv, abs=1e-5)
        assert s.returns == pytest.approx(ret, abs=1e-5)
    _runner(beta=beta, gamma=gamma, lam=lam, whiten=True)._token_advantages(groups, total, valid)
    kept = torch.tensor([a for s in flat if s.trained for a in s.token_advantages])
    assert float(kept.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(kept.var(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert flat[2].token_advantages == [0.0] * 4


def test_first_minibatch_has_ratio_one_and_no_value_clipping(tmp_path):
    res = _run(_cfg(tmp_path / "r", **{"algorithm": "ppo", "loss.epochs": 2, "loss.mini_batches": 2,
                                       "train.max_steps": 4, "critic.value_clip": 0.001, "critic.lr": 1e-2}))
    first = res.fit.history[0]
    assert first["ratio"] == 1.0 and first["approx_kl"] == 0.0 and first["value_clipped"] == 0.0
    # later mini-batches see a moved critic: the tiny clip range acts
    assert any(h["value_clipped"] > 0 for h in res.fit.history[1:])


def _critic_weights(run_dir):
    return load_file(str(run_dir / "final" / "critic" / "model.safetensors"))


def test_grad_accumulation_with_a_critic_equals_one_big_batch(tmp_path):
    """4 groups per micro-batch (GA=1) vs 1 (GA=4), policy and critic in one AdamW, 2 steps."""
    runs = {}
    for mbs in (4, 1):
        with optimizer_steps() as steps:
            res = run_rl(_cfg(tmp_path / f"mbs{mbs}", **{"algorithm": "ppo", "train.micro_batch_size": mbs,
                                                           "train.max_steps": 2}),
                         model=tiny_model("llama", seed=0, hidden=32), tokenizer=world_tokenizer(), log=lambda s: None)
        runs[mbs] = (res.fit.history, steps)
    (h4, s4), (h1, s1) = runs[4], runs[1]
    assert len(s1) == len(s4) == 2
    for a, b in zip(h1, h4):
        assert a["value_loss"] == pytest.approx(b["value_loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        # The policy loss at ratio 1 (exactly: the old log-probs come from the same micro-batches) is minus
        # the token-mean of the whitened advantages: 0 but for rounding. |mean A| <= |token_mean| + gamma_N
        # (the logged fp32 mean), the loss's own sum (per micro-batch, divided by N, then summed) adds
        # gamma_{N+1} mean|A|, and mean|A| <= 1 (whitened: mean A^2 <= 1). So |policy_loss| <= |token_mean| +
        # 2 gamma_{N+1} (2.3e-5 for N = 192 loss tokens) in any summation order, i.e. on any CPU; unwhitened
        # advantages would give their mean (~0.1 here). (This test used abs 1e-6, the size of a typical
        # rounding walk rather than a bound: AVX2 kernels give 5e-7.)
        for h in (a, b):
            assert abs(h["policy_loss"]) <= abs(h["advantage/token_mean"]) + 2 * gamma(h["loss_tokens"] + 1)
    # Step 1: same weights and rollouts, so the gradients (policy and critic; the critic's backbone gets
    # exactly 0 from its zero-initialized head) differ only by the order of fp32 sums.
    assert_same_gradients(s1[0], s4[0])
    # The trained weights, policy and critic: within what Adam makes of the two runs' gradient differences.
    # (This test held the update to 1e-3 |w4 - w0| + 1e-7 per element: an embedding row whose gradient is
    # near rounding level stepped 2.7e-6 apart on one CPU, beyond it.)
    assert_adamw_weights_explained(s1, s4)
    assert _critic_weights(tmp_path / "mbs1").keys() == _critic_weights(tmp_path / "mbs4").keys()


def test_resume_with_a_critic_continues_exactly(tmp_path):
    full, full_model, resumed, model = full_and_resumed(
        tmp_path, {"algorithm": "ppo", "train.save_every": 2, "train.max_steps": 4, "critic.lr": 3e-3})
    assert (tmp_path / "full" / "checkpoints" / "step-000002" / "model" / "critic" / "model.safetensors").exists()
    for key in ("loss", "value_loss", "reward/mean", "kl_k1", "grad_norm", "advantage/value_mean"):
        assert [h[key] for h in resumed.fit.history] == [h[key] for h in full.fit.history[2:]], key
    for a, b in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(a, b)
    c_full, c_cut = _critic_weights(tmp_path / "full"), _critic_weights(tmp_path / "cut")
    assert all(torch.equal(c_full[k], c_cut[k]) for k in c_full)


def test_the_critic_has_its_own_learning_rate_on_the_same_schedule():
    policy = tiny_model("llama", seed=0, hidden=32)
    critic = critic_from_policy(policy, pad_token_id=0)
    both = PolicyWithCritic(policy, critic, critic_lr=5e-3)
    opt = build_optimizer(both, lr=1e-4, weight_decay=0.1)
    n_policy = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    by_lr = {}
    for g in opt.param_groups:
        by_lr[g["lr"]] = by_lr.get(g["lr"], 0) + sum(p.numel() for p in g["params"])
    assert by_lr == {1e-4: n_policy, 5e-3: sum(p.numel() for p in critic.parameters())}
    # the backbone is a copy (not shared), and the head starts at zero
    assert critic.base_model.embed_tokens.weight.data_ptr() != policy.model.embed_tokens.weight.data_ptr()
    assert torch.equal(critic.base_model.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert float(critic.score.weight.detach().abs().sum()) == 0.0


def _reward_model_dir(path, vocab_size=None):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=vocab_size or len(world_tokenizer()), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, num_labels=1, pad_token_id=world_tokenizer().pad_token_id)
    rm = LlamaForSequenceClassification(cfg)
    rm.save_pretrained(path)
    world_tokenizer().save_pretrained(path)
    return rm


def test_critic_from_a_reward_model_starts_with_its_scores(tmp_path):
    """critic.init=<reward model dir>: the value of the state after the prompt, V(s_0), is the
    reward model's score of the prompt alone (its head read at the prompt's last token)."""
    rm = _reward_model_dir(tmp_path / "rm").eval()
    _run(_cfg(tmp_path / "r", **{"algorithm": "ppo", "critic.init": str(tmp_path / "rm"), "train.max_steps": 1}))
    tok = world_tokenizer()
    from posttrain.data.chat import render_prompt

    rows = _samples(tmp_path / "r" / "samples.jsonl")
    for r in rows[:4]:
        ids = render_prompt(tok, [{"role": "user", "content": r["prompt"]}])
        with torch.no_grad():
            want = float(rm(input_ids=torch.tensor([ids])).logits[0, 0])
        assert r["values"][0] == pytest.approx(want, abs=1e-5)


def test_a_critic_with_another_vocabulary_is_refused(tmp_path):
    _reward_model_dir(tmp_path / "rm", vocab_size=50)
    with pytest.raises(ConfigError, match="same tokenizer"):
        _run(_cfg(tmp_path / "r", **{"algorithm": "ppo", "critic.init": str(tmp_path / "rm")}))


@pytest.mark.parametrize("argv, fragments", [
    (["grpo", "critic.init=policy"], ["critic.init='policy'", "loss.advantage=grpo", "algorithm=ppo"]),
    (["rloo", "critic.lr=0.001"], ["critic.lr=0.001", "loss.advantage=rloo"]),
    (["ppo", "critic.init=none"], ["critic.init is none", "loss.advantage=gae"]),
    (["ppo", "critic.init=reward_model"], ["reward.reward_model is not set"]),
    (["ppo", "critic.init=no/such/dir"], ["critic.init", "no/such/dir"]),
    (["ppo", "critic.value_clip=-1"], ["critic.value_clip"]),
])
def test_bad_critic_config_is_one_clear_error(capsys, model_dirs, tmp_path, argv, fragments):
    assert_cli_error(capsys, model_dirs, tmp_path, argv, fragments)


def test_ppo_keeps_training_when_rewards_are_missing(tmp_path):
    """None / NaN rewards with a critic: the samples are excluded (mask 0 in the policy and value
    losses, no part in whitening), and nothing non-finite reaches the loss."""
    res = _run(_cfg(tmp_path / "r", **{"algorithm": "ppo", "reward.functions": ["tests.test_rl:sometimes_none_reward"],
                                       "train.max_steps": 2}))
    for h in res.fit.history:
        assert h["samples_excluded"] > 0
        assert math.isfinite(h["loss"]) and math.isfinite(h["value_loss"])


def short_reward(prompts, completions, completion_ids, **_):
    """Shorter is better: a signal a random tiny model can learn within a few dozen steps (it only has
    to make its end-of-turn token likelier)."""
    return [-len(ids) / 12 for ids in completion_ids]
