"""What a new user hits (issue 22): prompt-only RL data, rewards that need a missing field,
no-signal runs (NaN / None rewards, identical rewards in every group), the key a length error
names, peer trainers' option names, public data sets' own layouts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.algorithms.rl import RLConfig
from posttrain.cli import main
from posttrain.config import PEER_NAMES, config_keys, load_config
from posttrain.data import load_records
from posttrain.errors import ConfigError, DataError

from .tiny import tiny_model, world_tokenizer

# ----------------------------------------------------------------------------- reward functions the runs import


def brevity(prompts, completions, completion_ids, **_):
    """A reward that reads no record field: shorter is better."""
    return [-len(ids) / 8.0 for ids in completion_ids]


def none_reward(prompts, completions, **_):
    return [None] * len(completions)


def nan_reward(prompts, completions, **_):
    return [math.nan] * len(completions)


def constant_reward(prompts, completions, **_):
    return [1.0] * len(completions)


def topic_reward(prompts, completions, *, topic, **_):
    """Reads a record field that is not a format's: ``topic``."""
    return [float(t in c) for t, c in zip(topic, completions)]


topic_reward.needs_fields = ("topic",)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("newuser")
    tiny_model("llama", hidden=32).save_pretrained(ws / "model")
    world_tokenizer().save_pretrained(ws / "model")
    prompts = [{"prompt": f"Write about the number {i}."} for i in range(12)]
    (ws / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    chats = [{"prompt": [{"role": "user", "content": f"Say {i}."}], "topic": str(i)} for i in range(12)]
    (ws / "chat_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    gsm = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}]
    (ws / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    return ws


def _rl(ws, out, *extra):
    return ["grpo", f"model.name_or_path={ws / 'model'}", f"train.output_dir={out}", "train.progress=false",
            "rollout.group_size=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=6", "train.max_steps=2",
            "train.micro_batch_size=4", "train.save_every=0", "data.eval=null", *extra]


def _history(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln).get("split", "train") == "train" and "loss" in json.loads(ln)]


# ----------------------------------------------------------------------------- 1. prompt-only data


def test_prompt_only_records_are_their_own_format():
    ds = load_records([{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}], "id": 3}])
    assert ds.format == "prompt"
    assert ds.records[1] == {"prompt": [{"role": "user", "content": "b"}], "id": 3}
    # detected last: a record with an answer or a completion keeps its format
    assert load_records([{"prompt": "a", "answer": "1"}]).format == "prompt_answer"
    assert load_records([{"prompt": "a", "completion": "b"}]).format == "prompt_completion"
    with pytest.raises(DataError, match="looks like format 'prompt_answer' but the first record"):
        load_records([{"prompt": "a"}, {"prompt": "b", "answer": "2"}])
    with pytest.raises(DataError, match=r"item 0, field 'prompt'"):
        load_records([{"prompt": 3}])


def test_grpo_trains_on_prompt_only_data_with_a_reward_that_reads_no_field(ws, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(_rl(ws, out, f"data.train={ws / 'prompts.jsonl'}", "reward.functions=[tests.test_new_user:brevity]"))
    assert code == 0, capsys.readouterr().err
    hist = _history(out)
    assert [h["step"] for h in hist] == [1, 2]
    samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    # the reward is exactly the function of the sampled tokens
    assert all(s["reward"] == pytest.approx(-s["tokens"] / 8.0) for s in samples)
    assert {s["prompt"] for s in samples} <= {f"Write about the number {i}." for i in range(12)}


def test_message_prompts_with_extra_fields_reach_the_reward(ws, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(_rl(ws, out, f"data.train={ws / 'chat_prompts.jsonl'}", "train.max_steps=1",
                    "reward.functions=[tests.test_new_user:topic_reward]"))
    assert code == 0, capsys.readouterr().err
    samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    for s in samples:
        topic = s["prompt"].split()[-1].rstrip(".")
        assert s["reward"] == float(topic in s["completion"])


@pytest.mark.parametrize("command", ["grpo", "rft", "online-dpo"])
def test_a_reward_that_needs_a_missing_field_is_named_with_the_field(ws, tmp_path, capsys, command):
    argv = [command, f"model.name_or_path={ws / 'model'}", f"train.output_dir={tmp_path / 'r'}",
            f"data.train={ws / 'prompts.jsonl'}", "reward.functions=[math_answer]", "train.progress=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl" in err and "'math_answer' needs the record field(s) 'answer'" in err
    assert "their fields besides the prompt: none" in err and "Fix:" in err


def test_prompt_only_data_is_refused_by_sft_and_dpo_with_the_format_named(ws, tmp_path, capsys):
    assert main(["sft", f"model.name_or_path={ws / 'model'}", f"data.train={ws / 'prompts.jsonl'}",
                 f"train.output_dir={tmp_path / 's'}"]) == 2
    assert "holds prompt records" in capsys.readouterr().err
    assert main(["dpo", f"model.name_or_path={ws / 'model'}", f"data.train={ws / 'prompts.jsonl'}",
                 f"train.output_dir={tmp_path / 'd'}"]) == 2
    assert "holds prompt records" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 3. no-signal runs


@pytest.mark.parametrize("fn", ["none_reward", "nan_reward"])
def test_no_valid_reward_warns_then_stops_after_the_configured_iterations(ws, tmp_path, capsys, fn):
    out = tmp_path / "run"
    code = main(_rl(ws, out, f"data.train={ws / 'prompts.jsonl'}", f"reward.functions=[tests.test_new_user:{fn}]",
                    "train.max_steps=5", "monitor.no_reward_steps=3", "train.save_every=1"))
    printed = capsys.readouterr()
    assert code == 2
    # iteration 1 warns (once), iteration 3 stops before training: two optimizer steps ran, each a no-op
    assert printed.out.count("no valid reward") + printed.err.count("no valid reward") >= 2
    assert "warning: iteration 1: no valid reward: every one of the 8 completions" in printed.out + printed.err
    assert f"{fn}: 8" in printed.out + printed.err
    assert "3 iterations in a row (monitor.no_reward_steps=3)" in printed.err and "Fix:" in printed.err
    hist = _history(out)
    assert [h["step"] for h in hist] == [1, 2]
    assert all(h["samples_excluded"] == 8 and h["grad_norm"] == 0.0 for h in hist)


def test_no_reward_steps_zero_only_warns(ws, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(_rl(ws, out, f"data.train={ws / 'prompts.jsonl'}", "reward.functions=[tests.test_new_user:nan_reward]",
                    "train.max_steps=3", "monitor.no_reward_steps=0"))
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert (printed.out + printed.err).count("no valid reward") == 1   # warned once
    assert [h["step"] for h in _history(out)] == [1, 2, 3]


def test_no_reward_counter_resets_when_a_reward_arrives(ws, tmp_path, capsys, monkeypatch):
    """Iterations alternate between no valid reward and valid ones: never 2 in a row, so the run ends."""
    from posttrain.algorithms.rl import runner as rl   # where the runner scores

    calls = {"n": 0}
    real = rl.score_rollouts

    def flaky(functions, prompts, rolls, **kw):
        res = real(functions, prompts, rolls, **kw)
        calls["n"] += 1
        if calls["n"] % 2 == 1:
            res.valid[:] = False
            res.total[:] = math.nan
        return res

    monkeypatch.setattr(rl, "score_rollouts", flaky)
    out = tmp_path / "run"
    code = main(_rl(ws, out, f"data.train={ws / 'prompts.jsonl'}", "reward.functions=[tests.test_new_user:brevity]",
                    "train.max_steps=4", "monitor.no_reward_steps=2"))
    assert code == 0, capsys.readouterr().err
    assert [h["samples_excluded"] for h in _history(out)] == [8, 0, 8, 0]


def test_identical_rewards_in_every_group_warn_with_the_fix(ws, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(_rl(ws, out, f"data.train={ws / 'prompts.jsonl'}",
                    "reward.functions=[tests.test_new_user:constant_reward]", "train.max_steps=2"))
    printed = capsys.readouterr()
    assert code == 0, printed.err
    text = printed.out + printed.err
    assert text.count("every prompt group had identical rewards") == 1
    assert "loss.dynamic_sampling=true" in text and "rollout.temperature" in text
    hist = _history(out)
    assert all(h["zero_variance_groups"] == 1.0 for h in hist)
    # GRPO's advantages are exactly 0 and kl_beta 0 (the preset's): the gradient is exactly zero
    assert all(h["grad_norm"] == 0.0 for h in hist)


def test_a_mostly_identical_first_iteration_warns_once(ws, tmp_path, capsys, monkeypatch):
    """3 of 4 groups identical at iteration 1 (>= monitor.zero_variance_warn=0.75): one warning naming the share."""
    from posttrain.algorithms.rl import runner as rl   # where the runner scores

    real = rl.score_rollouts

    def three_flat(functions, prompts, rolls, **kw):
        res = real(functions, prompts, rolls, **kw)
        G = 4
        for g in range(len(rolls) // G):
            res.total[g * G:(g + 1) * G] = 0.5 if g % 4 else torch.arange(G, dtype=res.total.dtype)
        return res

    monkeypatch.setattr(rl, "score_rollouts", three_flat)
    out = tmp_path / "run"
    code = main(_rl(ws, out, f"data.train={ws / 'prompts.jsonl'}", "reward.functions=[tests.test_new_user:brevity]",
                    "rollout.prompts_per_step=4", "train.max_steps=2"))
    printed = capsys.readouterr()
    assert code == 0, printed.err
    text = printed.out + printed.err
    assert text.count("75% of the prompt groups had identical rewards") == 1
    assert "monitor.zero_variance_warn=0.75" in text
    assert [h["zero_variance_groups"] for h in _history(out)] == [0.75, 0.75]


# ----------------------------------------------------------------------------- 7. the key the user set


def test_a_too_long_rollout_names_the_keys_the_user_set(ws, tmp_path, capsys):
    limit = tiny_model("llama", hidden=32).config.max_position_embeddings
    assert main(_rl(ws, tmp_path / "r", f"data.train={ws / 'prompts.jsonl'}", "rollout.max_new_tokens=100000",
                    "reward.functions=[tests.test_new_user:brevity]", "data.max_prompt_length=256")) == 2
    err = capsys.readouterr().err
    assert "data.max_prompt_length=256 + rollout.max_new_tokens=100000 = 100256 tokens" in err
    assert f"position limit of {limit}" in err and f"set rollout.max_new_tokens to at most {limit - 256}" in err
    assert "data.max_length" not in err


# ----------------------------------------------------------------------------- 10. messages that say the fix


@pytest.mark.parametrize("key,expected", [
    ("num_generations", "rollout.group_size"), ("per_device_train_batch_size", "train.micro_batch_size"),
    ("max_completion_length", "rollout.max_new_tokens"), ("beta", "loss.kl_beta"), ("learning_rate", "train.lr"),
    ("gradient_accumulation_steps", "train.grad_accum"), ("loss.beta", "loss.kl_beta"),
    ("train.learning_rate", "train.lr"),
])
def test_peer_trainers_names_get_posttrains_key(key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(RLConfig, None, [f"{key}=1"])
    assert f"Did you mean '{expected}'? ('{key.split('.')[-1]}' is the name other trainers use" in str(e.value)


def test_peer_names_point_to_each_commands_own_key():
    from posttrain.algorithms.dpo import DPOConfig
    from posttrain.algorithms.rft import RFTConfig

    with pytest.raises(ConfigError, match=r"Did you mean 'loss.beta'"):
        load_config(DPOConfig, None, ["beta=0.1"])
    with pytest.raises(ConfigError, match=r"Did you mean 'sampling.samples_per_prompt'"):
        load_config(RFTConfig, None, ["num_generations=8"])
    with pytest.raises(ConfigError, match=r"Did you mean 'sampling.max_new_tokens'"):
        load_config(RFTConfig, None, ["max_completion_length=8"])


def test_every_peer_target_is_a_key_of_some_command():
    from posttrain.algorithms.cai import CAIConfig
    from posttrain.algorithms.distill import DistillConfig
    from posttrain.algorithms.dpo import DPOConfig
    from posttrain.algorithms.evaluate import EvalConfig
    from posttrain.algorithms.online_dpo import OnlineDPOConfig
    from posttrain.algorithms.prm import PRMConfig
    from posttrain.algorithms.rft import RFTConfig
    from posttrain.algorithms.rm import RMConfig
    from posttrain.algorithms.sft import SFTConfig

    keys = set()
    for cls in (SFTConfig, RMConfig, DPOConfig, RLConfig, RFTConfig, OnlineDPOConfig, PRMConfig, CAIConfig,
                DistillConfig, EvalConfig):
        keys |= set(config_keys(cls))
    missing = {peer: t for peer, targets in PEER_NAMES.items() for t in targets if t not in keys}
    assert not missing


def test_gsm8k_shaped_records_point_to_the_preset(ws, tmp_path, capsys):
    argv = _rl(ws, tmp_path / "r", f"data.train={ws / 'gsm.jsonl'}")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "gsm.jsonl" in err and "data.fields=gsm8k" in err and "line 1" in err
    # and with the preset it loads as prompt / answer records (the number after ####)
    ds = load_records(ws / "gsm.jsonl", fields="gsm8k")
    assert ds.format == "prompt_answer" and ds.records[0]["answer"] == "7"
