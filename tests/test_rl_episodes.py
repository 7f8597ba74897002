"""Online RL over multi-turn episodes: every preset runs, environment tokens stay out of the loss,
turn-level credit, exact resume, LoRA, invalid episodes and bad configurations."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.algorithms.rl import PRESETS, RLConfig, run_rl
from posttrain.algorithms.rl.loss import OnlineRLAlgorithm, Sample, collate_samples
from posttrain.algorithms.online.episodes import EpisodeLimits, run_episodes
from posttrain.config import load_config
from posttrain.envs import Environment, StepResult
from posttrain.errors import ConfigError
from posttrain.rollout import HFSampler, SamplingParams

from .test_rl import _yaml, full_and_resumed
from .tiny import tiny_model, world_tokenizer


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


class DigitUser(Environment):
    """Three turns; each reply earns 0.1 per digit it holds (a per-turn reward a random model's
    samples differ in); the user answers "next"."""

    name = "test-digits"

    def reset(self, record):
        return [{"role": "user", "content": _text(record["prompt"])}]

    def step(self, turn):
        reward = 0.1 * sum(ch.isdigit() for ch in turn.text)
        return StepResult([{"role": "user", "content": "next"}], reward=reward, done=turn.index >= 2)


class SometimesBroken(DigitUser):
    def step(self, turn):
        if turn.text.endswith("o"):
            raise ValueError("no o at the end")
        return super().step(turn)


ENV = "tests.test_rl_episodes:DigitUser"


def _cfg(out, **overrides) -> RLConfig:
    base = {"train.output_dir": str(out), "train.max_steps": 2, "train.progress": False, "train.lr": 1e-3,
            "data.world_examples": 40, "data.eval": None, "rollout.prompts_per_step": 3, "rollout.group_size": 3,
            "rollout.max_new_tokens": 8, "reward.functions": ["tests.test_rl:digit_reward"],
            "rollout.samples_every": 1, "env.name": ENV, "env.max_turns": 4, "env.max_total_tokens": 48,
            # common characters end a turn, so a random model's turns end by themselves
            "env.stop": ["e", "a", "o", "1", "2", "3"]}
    base.update(overrides)
    return load_config(RLConfig, None, [f"{k}={_yaml(v)}" for k, v in base.items()])


def _run(cfg, seed=0):
    return run_rl(cfg, model=tiny_model("llama", seed=seed, hidden=32), tokenizer=world_tokenizer(), log=lambda s: None)


def _samples(out):
    return [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_multi_turn(tmp_path, preset):
    res = _run(_cfg(tmp_path / preset, algorithm=preset))
    h = res.fit.history
    assert len(h) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in h)
    assert h[0]["episode/turns"] > 1 and h[0]["episode/env_tokens"] > 0
    rec = _samples(tmp_path / preset)[0]
    assert rec["messages"][0]["role"] == "user" and rec["messages"][1]["role"] == "assistant"
    assert rec["turns"] == len(rec["turn_rewards"]) and rec["end"] in ("done", "max_total_tokens", "turn_length")


def test_environment_tokens_carry_no_label_and_no_gradient():
    """The loss over a collated episode equals a hand computation from a plain forward pass over the
    whole sequence with the policy's tokens selected; changing the log-probs the hand computation reads
    at environment positions changes nothing, and the gradients agree."""
    tok = world_tokenizer()
    model = tiny_model("llama", seed=1, hidden=32)
    (ep,) = run_episodes(DigitUser(), HFSampler(model, tok), tok, [{"prompt": "Mia has 14 shells."}],
                         # a third of the vocabulary ends a turn, so a random model's turns end (short) by themselves
                         SamplingParams(8, temperature=1.0, seed=3, stop_token_ids=tuple(range(0, len(tok), 3))),
                         EpisodeLimits(3, 60, 8), parser="hermes")
    assert ep.n_turns >= 2 and not all(ep.policy_mask)
    sample = Sample(example=ep.training_example(), n_tokens=len(ep.log_probs), advantage=0.7, trained=True,
                    rollout_logps=ep.log_probs)
    batch = collate_samples([[sample]], pad_token_id=tok.pad_token_id, attn_implementation="sdpa", row_length=128,
                            with_old=False, with_ref=False)
    policy_tokens = [t for t, m in zip(ep.completion_ids, ep.policy_mask) if m]
    assert batch["lp_targets"].tolist() == policy_tokens
    cfg = RLConfig().loss.resolved("grpo")
    cfg.kl_beta = 0.0
    alg = OnlineRLAlgorithm(cfg, temperature=1.0, max_new_tokens=8)
    totals = {"tokens": torch.tensor(float(len(policy_tokens))), "sequences": torch.tensor(1.0)}
    loss, _ = alg.loss(model, batch, totals)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # by hand: every completion position's log-prob from one forward pass, the policy's selected
    ids = torch.tensor([ep.prompt_ids + ep.completion_ids])
    logp = model(ids).logits[0, :-1].float().log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
    start = len(ep.prompt_ids) - 1
    mask = torch.tensor([0.0] * start + [float(m) for m in ep.policy_mask])
    noise = torch.randn_like(logp) * (1 - mask) * 100   # anything at environment positions
    for lp in (logp, logp + noise):
        ratio = torch.exp(lp - lp.detach())
        hand = -(0.7 * ratio * mask).sum() / mask.sum()   # ppo_clip at ratio 1 is the plain policy gradient
        assert float(hand.detach()) == pytest.approx(float(loss.detach()), abs=1e-6)
    hand.backward()
    for a, b in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_turn_credit_gives_each_turn_its_return(tmp_path):
    """env.credit=turn: the samples' per-token advantages are constant within a turn and the turn's
    group-relative return (hand check from the logged turn rewards and final rewards)."""
    out = tmp_path / "turn"
    _run(_cfg(out, **{"env.credit": "turn", "train.max_steps": 1, "algorithm": "rloo"}))
    recs = _samples(out)
    for rec in recs:
        assert rec["token_advantages"] is not None and len(rec["token_advantages"]) == rec["tokens"]
    # rloo on the turn-0 returns (the whole episode's reward, gamma 1): the first token's advantage
    for g in range(3):
        group = recs[3 * g: 3 * g + 3]
        r0 = [r["reward"] for r in group]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(r0) if j != i]
            assert r["token_advantages"][0] == pytest.approx(r0[i] - sum(others) / 2, abs=1e-5)


def test_resume_mid_run_equals_the_uninterrupted_run(tmp_path):
    common = {"train.save_every": 2, "train.max_steps": 4, "loss.kl_beta": 0.05, "env.name": ENV,
              "env.max_turns": 3, "env.max_total_tokens": 40, "rollout.max_new_tokens": 8, "env.credit": "turn"}
    full, full_model, resumed, model = full_and_resumed(tmp_path, common)
    for key in ("loss", "reward/mean", "episode/turns", "episode/turn_reward", "grad_norm"):
        assert [h[key] for h in resumed.fit.history] == [h[key] for h in full.fit.history[2:]], key
    for a, b in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(a, b)


def test_invalid_episodes_are_counted_not_trained(tmp_path):
    out = tmp_path / "broken"
    res = _run(_cfg(out, **{"env.name": "tests.test_rl_episodes:SometimesBroken", "train.max_steps": 1,
                            "rollout.max_new_tokens": 12}))
    h = res.fit.history[0]
    recs = _samples(out)
    bad = [r for r in recs if r["end"] == "invalid"]
    assert bad and all("ValueError: no o at the end" in r["error"] and r["reward"] is None for r in bad)
    assert h["episode/end_invalid"] == pytest.approx(len(bad) / len(recs))
    assert h["samples_excluded"] >= len(bad) and h["reward/invalid_env"] == len(bad)


def test_lora_trains_multi_turn(tmp_path):
    res = _run(_cfg(tmp_path / "lora", **{"model.peft.method": "lora", "model.peft.r": 4, "train.max_steps": 1}))
    assert res.fit.history[0]["episode/turns"] > 1
    assert (tmp_path / "lora" / "final" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("overrides, fragment", [
    ({"env.name": "nope"}, "neither a built-in environment"),
    ({"env.max_total_tokens": 4}, "env.max_total_tokens=4 is less than rollout.max_new_tokens"),
    ({"env.credit": "turn", "algorithm": "remax"}, "env.credit=turn with loss.advantage=remax"),
    ({"reward.process_weight": 1.0, "algorithm": "ppo", "reward.process_reward_model": "x"}, "per-token rewards"),
    ({"env.max_total_tokens": 600}, "position"),
])
def test_bad_configurations_are_refused(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _run(_cfg(tmp_path / "bad", **overrides))


def test_env_settings_without_an_environment_are_noted(tmp_path):
    lines = []
    cfg = _cfg(tmp_path / "n", **{"env.name": None, "env.max_turns": 3, "train.max_steps": 1})
    run_rl(cfg, model=tiny_model("llama", hidden=32), tokenizer=world_tokenizer(), log=lines.append)
    assert any("env.max_turns=3" in ln and "not used: env.name is not set" in ln for ln in lines)


def _doc_example():
    """The example environment of docs/multi_turn.md, as written there."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "multi_turn.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/multi_turn.md", "exec"), namespace)  # our own documentation's example
    return namespace["GuessTheNumber"]


def test_the_documented_example_environment_plays_as_described():
    from posttrain.envs import AssistantTurn

    env = _doc_example()(cost=0.05).fresh()
    assert env.reset({"answer": "42"}) == [{"role": "user", "content": "Guess my number between 1 and 100."}]
    turn = lambda text, i: AssistantTurn(text, [], [], True, i)  # noqa: E731
    assert env.step(turn("50", 0)) == StepResult([{"role": "user", "content": "lower"}], reward=-0.05)
    assert env.step(turn("no idea", 1)).messages == [{"role": "user", "content": "Please answer with a number."}]
    assert env.step(turn("42", 2)) == StepResult(reward=1.0, done=True)
    with pytest.raises(ConfigError, match="does not take"):
        _doc_example()(colour="red")


def test_an_environment_can_be_the_whole_reward(tmp_path):
    """reward.functions=[] with an environment: the per-turn rewards are the reward."""
    out = tmp_path / "envonly"
    res = _run(_cfg(out, **{"reward.functions": [], "train.max_steps": 1}))
    recs = _samples(out)
    for r in recs:
        assert r["reward"] == pytest.approx(sum(x for x in r["turn_rewards"] if x is not None))
    assert res.fit.history[0]["reward/env"] == pytest.approx(sum(r["reward"] for r in recs) / len(recs))
    with pytest.raises(ConfigError, match="reward.functions is empty"):
        _run(_cfg(tmp_path / "none", **{"reward.functions": [], "env.name": None}))


def test_ppo_gae_runs_over_the_policy_tokens_with_turn_rewards_at_turn_ends(tmp_path):
    """PPO with env.credit=turn: the logged per-token advantages and returns are GAE, by hand, over
    the policy's tokens only (environment tokens skipped), with each turn's reward at its last token
    and the final reply's score at the last one, from the logged critic values."""
    out = tmp_path / "ppo"
    _run(_cfg(out, **{"algorithm": "ppo", "env.credit": "turn", "train.max_steps": 1, "loss.kl_beta": 0.0,
                      "loss.whiten_advantages": False, "loss.gamma": 0.9, "loss.lam": 0.8}))
    checked = 0
    for rec in _samples(out):
        if rec["reward"] is None:
            continue
        n = rec["tokens"]
        final = rec["reward"] - sum(r for r in rec["turn_rewards"] if r is not None)
        rewards = [0.0] * n
        for end, r in zip(rec["turn_ends"], rec["turn_rewards"]):
            rewards[end - 1] += r or 0.0
        rewards[n - 1] += final
        values = rec["values"]
        adv, ret = [0.0] * n, [0.0] * n
        a = 0.0
        for t in range(n - 1, -1, -1):
            nxt = values[t + 1] if t + 1 < n else 0.0
            a = rewards[t] + 0.9 * nxt - values[t] + 0.9 * 0.8 * a
            adv[t], ret[t] = a, a + values[t]
        assert rec["token_advantages"] == pytest.approx(adv, abs=1e-5)
        assert rec["returns"] == pytest.approx(ret, abs=1e-5)
        checked += len(rec["turn_ends"]) > 1
    assert checked > 0  # multi-turn episodes were among them
