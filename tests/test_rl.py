"""The online RL loop: ratio 1 on the first mini-batch, GA=1 vs GA=k, exact resume, every preset
from the command line on tiny random Llama and Qwen2 models, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.algorithms.rl import run as rl_run
from posttrain.algorithms import rl as rl_mod
from posttrain.algorithms.rl import PRESETS, RLConfig, run_rl
from posttrain.algorithms.rl.loss import _padded
from posttrain.cli import main
from posttrain.config import load_config
from posttrain.errors import ConfigError

from .rounding import assert_adamw_weights_explained, assert_same_gradients, optimizer_steps
from .tiny import tiny_model, world_tokenizer


def digit_reward(prompts, completions, completion_ids, **_):
    """A dense reward a random model's samples differ in: the share of digit characters, plus a
    bonus for stopping (so groups are never all equal)."""
    out = []
    for text, ids in zip(completions, completion_ids):
        digits = sum(ch.isdigit() for ch in text)
        out.append(digits / max(1, len(text)) + 0.01 * len(ids))
    return out


def raising_reward(prompts, completions, **_):
    raise RuntimeError("grader crashed")


def _cfg(out, **overrides) -> RLConfig:
    base = {
        "train.output_dir": str(out), "train.max_steps": 2, "train.progress": False, "train.lr": 1e-3,
        "data.world_examples": 40, "data.eval": None, "rollout.prompts_per_step": 4, "rollout.group_size": 4,
        "rollout.max_new_tokens": 12, "reward.functions": ["tests.test_rl:digit_reward"],
        "rollout.samples_every": 1,
    }
    base.update(overrides)
    return load_config(RLConfig, None, [f"{k}={_yaml(v)}" for k, v in base.items()])


def _yaml(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


def _run(cfg, seed=0, arch="llama"):
    return run_rl(cfg, model=tiny_model(arch, seed=seed, hidden=32), tokenizer=world_tokenizer(), log=lambda s: None)


def test_padded_matches_explicit_loop():
    seq = torch.tensor([0, 0, 0, 2, 1, 1, 2, 2, 2])
    vals = torch.arange(9, dtype=torch.float32)
    got = _padded(vals, seq, 4, 5)
    want = torch.zeros(4, 5)
    pos = [0, 0, 0, 0]
    for v, s in zip(vals.tolist(), seq.tolist()):
        want[s, pos[s]] = v
        pos[s] += 1
    assert torch.equal(got, want)


def test_first_minibatch_ratio_is_exactly_one(tmp_path):
    """With mu=2 epochs x 2 mini-batches the old log-probs are computed before any update: on the
    first mini-batch of the first epoch the ratio is exactly 1 (nothing clipped, approx KL 0);
    later mini-batches see updated weights."""
    res = _run(_cfg(tmp_path / "r", **{"loss.epochs": 2, "loss.mini_batches": 2, "train.max_steps": 4}))
    first = res.fit.history[0]
    assert first["ratio"] == 1.0
    assert first["approx_kl"] == 0.0
    assert first["clipped_low"] == 0.0 and first["clipped_high"] == 0.0
    assert any(h["approx_kl"] > 0 for h in res.fit.history[1:])
    assert first["reward/std"] > 0  # the test reward really separates samples


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    """micro_batch_size = 1 group (4 micro-batches of uneven token counts) gives the same loss,
    gradient norm and weights as one micro-batch of all 4 groups."""
    results = {}
    for mbs in (4, 1):
        cfg = _cfg(tmp_path / f"mbs{mbs}", **{"train.micro_batch_size": mbs, "train.max_steps": 1,
                                              "algorithm": "dapo", "loss.dynamic_sampling": False})
        with optimizer_steps() as steps:
            res = run_rl(cfg, model=tiny_model("llama", seed=0, hidden=32), tokenizer=world_tokenizer(),
                         log=lambda s: None)
        results[mbs] = (res.fit.history[0], steps)
    (h4, s4), (h1, s1) = results[4], results[1]
    assert h1["loss_tokens"] == h4["loss_tokens"]
    assert h1["loss"] == pytest.approx(h4["loss"], rel=1e-5, abs=1e-7)
    assert h1["grad_norm"] == pytest.approx(h4["grad_norm"], rel=1e-5)
    assert len(s1) == len(s4) == 1
    assert_same_gradients(s1[0], s4[0])
    # The weights after one AdamW step, lr * g / (|g| + eps) per element: within what Adam makes of the
    # gradients' rounding difference (tests/rounding.py). (This test held them to atol 1e-6: a gate_proj
    # element with |g| = 2e-8 ~ 2 eps, where the step is most sensitive, stepped 1.4e-6 apart on AVX-512.)
    assert_adamw_weights_explained(s1, s4)


def full_and_resumed(tmp_path, common: dict, stop_after: int = 2):
    """An uninterrupted 4-step run, and the same run stopped inside step 3 (after the step-2
    checkpoint; ``stop_after`` loss calls) then resumed: ``(full, full_model, resumed, model)``."""
    full_model = tiny_model("llama", seed=0, hidden=32)
    full = run_rl(_cfg(tmp_path / "full", **common), model=full_model, tokenizer=world_tokenizer(),
                  log=lambda s: None)

    class Stop(Exception):
        pass

    original = rl_mod.OnlineRLAlgorithm.loss
    calls = {"n": 0}

    def stopping_loss(self, model, batch, totals):
        calls["n"] += 1
        if calls["n"] > stop_after:  # one micro-batch per step: stop inside step 3
            raise Stop
        return original(self, model, batch, totals)

    cut = _cfg(tmp_path / "cut", **common)
    rl_mod.OnlineRLAlgorithm.loss = stopping_loss
    try:
        with pytest.raises(Stop):
            _run(cut)
    finally:
        rl_mod.OnlineRLAlgorithm.loss = original
    cut.train.resume = "auto"
    model = tiny_model("llama", seed=0, hidden=32)
    resumed = run_rl(cut, model=model, tokenizer=world_tokenizer(), log=lambda s: None)
    assert [h["step"] for h in resumed.fit.history] == [3, 4]
    return full, full_model, resumed, model


def test_resume_continues_exactly(tmp_path):
    """Stopped inside iteration 3 (after the step-2 checkpoint) and resumed: iterations 3-4 have
    the same rewards and losses as the uninterrupted run, and the final weights are equal."""
    full, full_model, resumed, model = full_and_resumed(
        tmp_path, {"train.save_every": 2, "train.max_steps": 4, "loss.kl_beta": 0.05})
    for key in ("loss", "reward/mean", "kl_k1", "grad_norm"):
        assert [h[key] for h in resumed.fit.history] == [h[key] for h in full.fit.history[2:]], key
    for a, b in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(a, b)


def test_no_reference_model_when_beta_is_zero(tmp_path, monkeypatch):
    made = []
    real = rl_run.reference_policy
    monkeypatch.setattr(rl_run, "reference_policy", lambda m: made.append(1) or real(m))
    res = _run(_cfg(tmp_path / "r", **{"algorithm": "dr_grpo", "train.max_steps": 1}))
    assert made == [] and "kl_k1" not in res.fit.history[0]
    _run(_cfg(tmp_path / "r2", **{"algorithm": "grpo", "train.max_steps": 1}))
    assert made == [1]


def test_presets_resolve_to_their_parts():
    cfg = RLConfig(algorithm="dr_grpo")
    loss = cfg.loss.resolved("dr_grpo")
    assert (loss.advantage, loss.normalize_by_std, loss.aggregation, loss.kl_beta) == \
        ("grpo", False, "seq_mean_token_sum_norm", 0.0)
    loss = RLConfig().loss.resolved("dapo")
    assert (loss.clip_eps, loss.clip_eps_high, loss.aggregation, loss.dynamic_sampling) == \
        (0.2, 0.28, "token_mean", True)
    loss = RLConfig(algorithm="ppo").loss.resolved("ppo")
    assert (loss.advantage, loss.kl_placement, loss.kl_estimator, loss.whiten_advantages, loss.lam) == \
        ("gae", "reward", "k1", True, 0.95)
    # an explicit value beats the preset
    cfg = load_config(RLConfig, None, ["algorithm=grpo", "loss.policy_loss=cispo"])
    assert cfg.loss.resolved(cfg.algorithm).policy_loss == "cispo"


def _cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_from_the_command_line(capsys, model_dirs, tmp_path, preset, arch):
    code, out, err = _cli(capsys, preset, f"model.name_or_path={model_dirs[arch]}",
                          f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.progress=false",
                          "data.world_examples=20", "data.eval=null", "rollout.prompts_per_step=2",
                          "rollout.group_size=2", "rollout.max_new_tokens=8",
                          "reward.functions=[tests.test_rl:digit_reward]")
    assert code == 0, err
    assert "done: 2 steps" in out
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert (tmp_path / "run" / "samples.jsonl").exists()


@pytest.mark.parametrize("argv, fragments", [
    (["grpo", "rollout.group_size=1"], ["rollout.group_size", "2 or more"]),
    (["rl", "algorithm=ppo2"], ["algorithm", "grpo"]),
    (["rl", "loss.advantage=gae2"], ["loss.advantage", "gae"]),
    (["grpo", "train.max_steps=3", "loss.epochs=2"], ["train.max_steps", "multiple of 2"]),
    (["grpo", "train.grad_accum=2"], ["train.grad_accum", "loss.mini_batches"]),
    (["grpo", "reward.functions=[no_such_reward]"], ["reward.functions", "no_such_reward"]),
    (["grpo", "reward.functions=[tests.test_rl:raising_reward]"], ["raising_reward", "grader crashed"]),
    (["dapo", "algorithm=grpo"], ["dapo", "algorithm"]),
])
def test_bad_rl_input_is_one_clear_error(capsys, model_dirs, tmp_path, argv, fragments):
    assert_cli_error(capsys, model_dirs, tmp_path, argv, fragments)


def assert_cli_error(capsys, model_dirs, tmp_path, argv, fragments):
    """``posttrain <argv>`` on a tiny Llama exits with status 2 and an error naming every fragment."""
    code, out, err = _cli(capsys, *argv, f"model.name_or_path={model_dirs['llama']}",
                          f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "data.world_examples=8",
                          "data.eval=null", "rollout.prompts_per_step=2", "rollout.max_new_tokens=4")
    assert code == 2, (out, err)
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)


def test_config_checks_in_python():
    with pytest.raises(ConfigError, match="group_size"):
        load_config(RLConfig, None, ["algorithm=rloo", "rollout.group_size=1"])
    # remax and reinforce_pp work with one sample per prompt
    load_config(RLConfig, None, ["algorithm=remax", "rollout.group_size=1"])
    load_config(RLConfig, None, ["algorithm=reinforce_pp", "rollout.group_size=1"])
    # gspo's sequence-level ratio needs the per-response token mean: token_mean (the dapo preset's) is refused,
    # naming both keys and the fix, not silently length-weighted
    with pytest.raises(ConfigError, match="loss.policy_loss=gspo") as e:
        load_config(RLConfig, None, ["algorithm=dapo", "loss.policy_loss=gspo"])
    assert "loss.aggregation=token_mean" in str(e.value) and "seq_mean_token_mean" in e.value.fix
    for agg in ("seq_mean_token_sum", "seq_mean_token_sum_norm"):
        with pytest.raises(ConfigError, match="loss.aggregation"):
            load_config(RLConfig, None, ["algorithm=gspo", f"loss.aggregation={agg}"])
    load_config(RLConfig, None, ["algorithm=dapo", "loss.policy_loss=gspo", "loss.aggregation=seq_mean_token_mean"])
    # a large clip range is how the clip is switched off: accepted
    load_config(RLConfig, None, ["algorithm=grpo", "loss.clip_eps=10", "loss.clip_eps_high=10"])


def sometimes_none_reward(prompts, completions, completion_ids, **_):
    """Every third sample unscorable (None), every fifth NaN: excluded and counted, never NaN in the loss."""
    out = []
    for i, ids in enumerate(completion_ids):
        out.append(None if i % 3 == 0 else float("nan") if i % 5 == 0 else len(ids) / 10)
    return out


def wrong_count_reward(prompts, completions, **_):
    return [1.0]


def test_none_and_nan_rewards_are_excluded_and_counted(tmp_path):
    res = _run(_cfg(tmp_path / "r", **{"reward.functions": ["tests.test_rl:sometimes_none_reward"],
                                       "train.max_steps": 2}))
    n = 16  # 4 prompts x 4 samples
    bad = sum(1 for i in range(n) if i % 3 == 0 or i % 5 == 0)
    for h in res.fit.history:
        assert h["reward/invalid_tests.test_rl:sometimes_none_reward"] == bad
        assert h["samples_excluded"] == bad
        assert torch.isfinite(torch.tensor(h["loss"]))
    for p in res.final_dir.parent.glob("final/*.safetensors"):
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(p).values())


def test_reward_function_with_wrong_count_is_named(tmp_path):
    from posttrain.rewards import RewardError

    with pytest.raises(RewardError, match="wrong_count_reward"):
        _run(_cfg(tmp_path / "r", **{"reward.functions": ["tests.test_rl:wrong_count_reward"]}))


def test_data_without_the_reward_field_is_refused(tmp_path):
    from posttrain.errors import DataError
    from posttrain.world.datasets import write_jsonl

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 3?", "completion": "5"}] * 4)
    with pytest.raises(DataError, match="answer"):
        _run(_cfg(tmp_path / "r", **{"data.train": str(data), "reward.functions": ["world_correct"]}))


def test_truncation_warning_names_the_rate(tmp_path):
    lines = []
    run_rl(_cfg(tmp_path / "r", **{"rollout.max_new_tokens": 2, "train.max_steps": 1}),
           model=tiny_model("llama", seed=0, hidden=32), tokenizer=world_tokenizer(), log=lines.append)
    warning = [ln for ln in lines if "rollout.max_new_tokens=2" in ln]
    assert warning and "mask_truncated" in warning[0]


def test_truncated_importance_sampling_and_kl_in_reward_run(tmp_path):
    """rloo with k1 in the reward and TIS on: the rollout/trainer mismatch is logged and small."""
    res = _run(_cfg(tmp_path / "r", **{"algorithm": "rloo", "loss.tis_cap": 2.0, "train.max_steps": 2}))
    h = res.fit.history[0]
    assert 0 <= h["mismatch/logprob_abs_diff"] < 1e-3
    assert h["mismatch/max_ratio"] == pytest.approx(1.0, abs=1e-2)
    assert h["kl_beta"] == pytest.approx(0.05)


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_tis_in_the_loss_equals_tis_from_an_old_log_prob_pass(tmp_path, monkeypatch, mode):
    """With one update per rollout batch pi_old is the policy being trained, so the loss takes the
    TIS weights from its own detached log-probs instead of a separate old-log-prob pass. The two
    give the same losses, gradients and weights. The rollout log-probs are shifted by +-0.4 on
    alternate tokens (a stand-in for an engine's mismatch) so that the cap 1.2 acts on about half
    the tokens."""
    from safetensors.torch import load_file

    from posttrain.algorithms.rl import RLRunner
    from posttrain.rollout import HFSampler

    generate = HFSampler.generate

    def shifted(self, reqs, sampling):
        rolls = generate(self, reqs, sampling)
        for r in rolls:
            r.log_probs = [lp + (0.4 if i % 2 else -0.4) for i, lp in enumerate(r.log_probs)]
        return rolls

    monkeypatch.setattr(HFSampler, "generate", shifted)
    over = {"loss.tis_cap": 1.2, "loss.tis_mode": mode, "train.max_steps": 3, "loss.kl_beta": 0.0}
    in_loss = _run(_cfg(tmp_path / "a", **over))
    init = RLRunner.__init__

    def with_old_pass(self, *a, **kw):
        init(self, *a, **kw)
        assert self.tis_in_loss and not self.needs_old
        self.needs_old, self.tis_in_loss = True, False

    monkeypatch.setattr(RLRunner, "__init__", with_old_pass)
    passed = _run(_cfg(tmp_path / "b", **over))
    for a, b in zip(in_loss.fit.history, passed.fit.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["tis_capped"] == pytest.approx(b["mismatch/tis_capped"], abs=1e-6)
        assert 0.2 < a["tis_capped"] < 0.8
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


# (grad_norm, reward/mean) of the first 3 steps of every preset on a tiny random Llama with digit_reward
# (regenerate: run each preset through _cfg/_run with train.max_steps=3). At ratio 1 GSPO's
# gradient equals GRPO's (sequence-mean aggregation), so their first grad norms agree; dr_grpo's constant
# normalizer (max_new_tokens=12) gives much smaller gradients; dapo's rewards carry the overlong penalty.
# The rewards of the first iteration agree across presets: the same seeded samples from the same weights.
STORED = {
    "grpo": [[0.510732, 0.137093], [0.358012, 0.126653], [0.540873, 0.132628]],
    "dr_grpo": [[0.015106, 0.137093], [0.009536, 0.126653], [0.018654, 0.133164]],
    "dapo": [[0.510732, -0.862907], [0.506976, -0.862618], [0.507369, -0.863139]],
    "gspo": [[0.510732, 0.137093], [0.358033, 0.126653], [0.540894, 0.132628]],
    "rloo": [[0.241701, 0.137093], [0.148912, 0.126653], [0.291523, 0.133164]],
    "remax": [[0.220931, 0.137093], [0.132527, 0.126653], [0.240752, 0.133544]],
    # reinforce_pp: per-token KL-to-go, whitened over tokens (Hu 2025). Its first iteration has KL 0 and the
    # random model's samples all run to max_new_tokens, so the earlier sequence-level form gave the same first
    # grad norm; from the second iteration on the KL-to-go makes the advantages differ along each response
    "reinforce_pp": [[0.593009, 0.137093], [0.587422, 0.126653], [0.600914, 0.132971]],
    # ppo's grad norm covers the policy and the critic (one clip over both)
    "ppo": [[0.590524, 0.137093], [0.580224, 0.126653], [0.598143, 0.136036]],
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_matches_its_stored_curve(tmp_path, preset):
    res = _run(_cfg(tmp_path / "r", **{"algorithm": preset, "train.max_steps": 3}))
    got = [[h["grad_norm"], h["reward/mean"]] for h in res.fit.history]
    want = STORED[preset]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], rel=1e-4)
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-6)


def test_monitors_warn_on_falls_not_on_levels():
    """Mode collapse is a fall of entropy (a policy that starts peaked is not collapsing); reward
    hacking needs the gold metric to fall by more than the margin while the trained reward rises.
    Both warn once, and their windows survive a checkpoint."""
    from posttrain.algorithms.rl import MonitorConfig, RLState
    from posttrain.ops import FixedKLController

    logs = []
    state = RLState(MonitorConfig(hacking_window=2, hacking_gold_drop=0.03), FixedKLController(0.0), log=logs.append,
                    gold=True)

    def step(i, entropy, distinct, proxy, gold):
        state.pending = {"distinct_rate": distinct, "entropy": entropy, "reward/mean": proxy, "gold/mean": gold}
        rec = {"step": i, "step_seconds": 1.0}
        state(rec)
        return rec

    # peaked from the start: no collapse warning
    assert step(1, 0.02, 0.1, 0.5, 0.80)["warning/collapse"] == 0
    assert step(2, 0.02, 0.1, 0.5, 0.79)["warning/collapse"] == 0
    # gold falls by 0.02 only (noise): no hacking warning
    assert step(3, 0.02, 0.1, 0.6, 0.78)["warning/hacking"] == 0
    saved = json.loads(json.dumps(state.state_dict()))
    resumed = RLState(MonitorConfig(hacking_window=2, hacking_gold_drop=0.03), FixedKLController(0.0),
                      log=logs.append, gold=True)
    resumed.load_state_dict(saved)
    state = resumed
    # proxy up, gold down by more than the margin: hacking; entropy halves: collapse
    rec = step(4, 0.005, 0.1, 0.7, 0.70)
    assert rec["warning/hacking"] == 1 and rec["warning/collapse"] == 1
    assert sum("reward hacking" in ln for ln in logs) == 1 and sum("mode collapse" in ln for ln in logs) == 1


def test_the_starting_model_is_evaluated_as_step_0_and_not_again_on_resume(tmp_path):
    """eval at step 0 is the one evaluator's score of the model before any update (a copy of the
    initial weights scored separately); a resumed run does not add a second step 0."""
    import copy

    from posttrain.algorithms.online import RLDataConfig, build_rewards, encode_prompts, evaluate_prompts
    from posttrain.algorithms.online import load_prompt_source

    over = {"data.eval": "builtin:world-problems-heldout", "data.world_eval_examples": 6,
            "rollout.eval_max_new_tokens": 12, "train.max_steps": 2, "train.save_every": 1}
    model = tiny_model("llama", hidden=32)
    start = copy.deepcopy(model)
    tok = world_tokenizer()
    res = run_rl(_cfg(tmp_path / "a", **over), model=model, tokenizer=tok, log=lambda s: None)
    assert [e["step"] for e in res.fit.eval_history] == [0, 2]
    prompts, _ = encode_prompts(load_prompt_source("builtin:world-problems-heldout",
                                                   RLDataConfig(world_eval_examples=6), 0), tok, max_prompt_length=256)
    functions, _ = build_rewards(load_config(RLConfig, None, ["reward.functions=[tests.test_rl:digit_reward]"]).reward,
                                 tok, "cpu", max_new_tokens=12)
    want = evaluate_prompts(start, tok, prompts, functions, max_new_tokens=12)
    assert {k: v for k, v in res.fit.eval_history[0].items() if k != "step"} == want
    assert res.fit.eval_history[1] != res.fit.eval_history[0]   # the trained model answers otherwise

    resumed = run_rl(_cfg(tmp_path / "a", **{**over, "train.resume": "auto"}),
                     model=tiny_model("llama", hidden=32), tokenizer=tok, log=lambda s: None)
    assert 0 not in [e["step"] for e in resumed.fit.eval_history]
