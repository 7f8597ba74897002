"""Rejection-sampling fine-tuning: the keep rule by hand, the prompt order, exact round-level
resume, a stored short curve, the command line on tiny random Llama and Qwen2, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from posttrain.algorithms.rft import RFTConfig, round_prompts, run_rft, select_samples
from posttrain.cli import main
from posttrain.config import load_config
from posttrain.errors import ConfigError, TrainingError

from .tiny import tiny_model, world_tokenizer


def digit_reward(prompts, completions, completion_ids, **_):
    """Share of digit characters in the completion (a random model's samples differ in it)."""
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in completions]


def zero_reward(prompts, completions, **_):
    return [0.0] * len(completions)


# --------------------------------------------------------------------------- the keep rule


def test_threshold_finished_dedup_and_cap_by_hand():
    rewards = [
        [1.0, 0.0, 1.0, 1.0, None, 1.0],   # prompt 0
        [0.0, float("nan"), 0.5, 0.0, 0.0, 0.0],  # prompt 1: nothing reaches 1.0
        [1.0, 1.0, 0.0, 0.0, 0.0, 0.0],    # prompt 2: its one correct-and-finished sample
    ]
    completions = [
        [[1, 2], [3], [1, 2], [4], [5], [6]],   # sample 2 repeats sample 0
        [[1], [2], [3], [4], [5], [6]],
        [[7], [8], [9], [1], [2], [3]],
    ]
    finished = [
        [True, True, True, True, True, True],
        [True] * 6,
        [False, True, True, True, True, True],  # prompt 2's first correct sample was cut off
    ]
    sel = select_samples(rewards, completions, finished, threshold=1.0, max_per_prompt=2)
    # prompt 0: candidates 0, 2, 3, 5 (all reward 1, sampling order); 2 duplicates 0; cap 2 -> 0, 3; 5 over the cap
    assert sel.kept == [[0, 3], [], [1]]
    assert sel.dropped == {"invalid": 2, "unfinished": 1, "below_threshold": 10, "duplicate": 1, "over_cap": 1}
    # every sample is counted exactly once: kept + dropped == all
    assert sel.num_kept + sum(sel.dropped.values()) == 18
    # pass@K: prompt 2 passed (a correct sample exists, even though it was cut off); prompt 1 did not
    assert sel.passed == [True, False, True]
    # without dedup / cap / the finished rule
    sel = select_samples(rewards, completions, finished, threshold=1.0, max_per_prompt=0, dedup=False,
                         require_finished=False)
    assert sel.kept == [[0, 2, 3, 5], [], [0, 1]]


def test_top_k_without_threshold_ranks_by_reward_ties_in_sampling_order():
    rewards = [[0.2, 0.9, 0.5, 0.9, 0.1]]
    completions = [[[1], [2], [3], [4], [5]]]
    sel = select_samples(rewards, completions, [[True] * 5], threshold=None, max_per_prompt=3)
    assert sel.kept == [[1, 3, 2]]
    assert sel.dropped["over_cap"] == 2 and sel.passed == [True]
    # a duplicate of the best sample does not take a top-k place
    completions = [[[1], [2], [3], [2], [5]]]
    sel = select_samples(rewards, completions, [[True] * 5], threshold=None, max_per_prompt=3)
    assert sel.kept == [[1, 2, 0]] and sel.dropped["duplicate"] == 1


def test_round_prompts_visit_every_prompt_once_per_pass():
    a = round_prompts(10, seed=3, start=0, count=25)
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))
    assert a[:10] != a[10:20]  # a new shuffle per pass
    # contiguous windows of the same sequence
    assert round_prompts(10, seed=3, start=7, count=8) == a[7:15]
    assert round_prompts(10, seed=4, start=0, count=10) != a[:10]


# --------------------------------------------------------------------------- runs




def _cfg(out, **overrides) -> RFTConfig:
    base = {
        "train.output_dir": str(out), "train.progress": False, "train.lr": 1e-3, "train.micro_batch_size": 4,
        "data.world_examples": 40, "data.eval": "null", "sampling.prompts_per_round": 6, "sampling.samples_per_prompt": 4,
        "sampling.max_new_tokens": 10, "sampling.rounds": 2, "reward.functions": "[tests.test_rft:digit_reward]",
        "select.threshold": "null", "select.max_per_prompt": 2, "select.require_finished": "false",
    }
    base.update(overrides)
    return load_config(RFTConfig, None, [f"{k}={v}" for k, v in base.items()])


def _run(cfg, arch="llama"):
    return run_rft(cfg, model=tiny_model(arch, seed=0, hidden=32), tokenizer=world_tokenizer(), log=lambda s: None)


def _weights(d):
    return load_file(str(d / "final" / "model.safetensors"))


# (kept, reward_mean, train_loss) of two rounds on a tiny random Llama with digit_reward, top-2 per prompt
# (regenerate with _run(_cfg(...))); the kept count is 12 = 6 prompts x 2 distinct samples each round.
STORED = [[12, 0.0076593, 5.984627], [12, 0.026307, 5.976738]]


def test_rft_matches_its_stored_curve_and_writes_what_it_kept(tmp_path):
    res = _run(_cfg(tmp_path / "r"))
    rows = res.rounds[1:]
    got = [[r["kept"], r["reward_mean"], r["train_loss"]] for r in rows]
    assert [g[0] for g in got] == [s[0] for s in STORED]
    assert [g[1] for g in got] == pytest.approx([s[1] for s in STORED], abs=1e-6)
    assert [g[2] for g in got] == pytest.approx([s[2] for s in STORED], rel=1e-4)
    for r in rows:
        assert r["kept"] + sum(v for k, v in r.items() if k.startswith("dropped/")) == r["samples"] == 24
        kept = [json.loads(ln) for ln in (tmp_path / "r" / f"round_{r['round']}" / "kept.jsonl").read_text().splitlines()]
        assert len(kept) == r["kept"]
        # kept records are prompt/completion conversations with their reward and the record's fields
        assert kept[0]["completion"][0]["role"] == "assistant" and "answer" in kept[0]
        by_prompt: dict = {}
        for k in kept:
            by_prompt.setdefault(k["prompt"][0]["content"], []).append(k["reward"])
        assert all(len(v) <= 2 and v == sorted(v, reverse=True) for v in by_prompt.values())
    lines = (tmp_path / "r" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(ln)["round"] for ln in lines] == [0, 1, 2]
    assert res.final_dir == tmp_path / "r" / "final" and not (tmp_path / "r" / "round_2" / "final").exists()
    assert (tmp_path / "r" / "round_1" / "final" / "model.safetensors").exists()


def test_resume_after_a_finished_round_equals_the_uninterrupted_run(tmp_path, model_dirs):
    """Two rounds in one go == one round, then train.resume=auto with two rounds (the second run
    reloads round 1's model and samples round 2 with the same seed): identical weights."""
    name = {"model.name_or_path": str(model_dirs["llama"])}
    full = run_rft(_cfg(tmp_path / "full", **name), log=lambda s: None)
    run_rft(_cfg(tmp_path / "part", **name, **{"sampling.rounds": 1}), log=lambda s: None)
    resumed = run_rft(_cfg(tmp_path / "part", **name, **{"train.resume": "auto"}), log=lambda s: None)
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2]
    assert resumed.rounds[2]["kept"] == full.rounds[2]["kept"]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # round 1's model went back to round_1/final, the last round's is final/
    assert (tmp_path / "part" / "round_1" / "final" / "model.safetensors").exists()
    # a finished run resumed with the same rounds has nothing to do
    again = run_rft(_cfg(tmp_path / "part", **name, **{"train.resume": "auto"}), log=lambda s: None)
    assert len(again.rounds) == 3 and again.final_dir == tmp_path / "part" / "final"


def test_round_with_nothing_kept_stops_with_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path / "r", **{"reward.functions": "[tests.test_rft:zero_reward]", "select.threshold": 1.0})
    with pytest.raises(TrainingError, match=r"round 1: none of the 24 samples was kept \(below_threshold: 24\)"):
        _run(cfg)
    assert (tmp_path / "r" / "round_1" / "kept.jsonl").read_text() == ""
    assert not (tmp_path / "r" / "final").exists()


def test_config_errors():
    with pytest.raises(ConfigError, match="every sample would be kept"):
        load_config(RFTConfig, None, ["select.threshold=null", "select.max_per_prompt=0"])
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        load_config(RFTConfig, None, ["sampling.samples_per_prompt=0"])
    with pytest.raises(ConfigError, match="reward.gold"):
        load_config(RFTConfig, None, ["reward.gold=[format]"])


def test_a_second_fresh_run_into_the_same_directory_is_refused(tmp_path):
    _run(_cfg(tmp_path / "r", **{"sampling.rounds": 1}))
    with pytest.raises(ConfigError, match="already holds an rft run"):
        _run(_cfg(tmp_path / "r", **{"sampling.rounds": 1}))
    res = _run(_cfg(tmp_path / "r", **{"sampling.rounds": 1, "train.overwrite_output_dir": "true"}))
    assert [r["round"] for r in res.rounds] == [0, 1]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rft_runs_from_the_command_line(capsys, model_dirs, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    code = main(["rft", f"model.name_or_path={model_dirs[arch]}", f"train.output_dir={out}", "train.progress=false",
                 "data.world_examples=20", "data.eval=null", "sampling.rounds=2", "sampling.prompts_per_round=3",
                 "sampling.samples_per_prompt=2", "sampling.max_new_tokens=8", "select.threshold=null",
                 "select.max_per_prompt=1", "select.require_finished=false",
                 "reward.functions=[tests.test_rft:digit_reward]"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "done: 2 rounds" in printed.out
    m = AutoModelForCausalLM.from_pretrained(out / "final")
    assert m.config.model_type == arch
    assert len((out / "round_2" / "kept.jsonl").read_text().splitlines()) == 3
    assert math.isfinite(json.loads((out / "rounds.jsonl").read_text().splitlines()[-1])["train_loss"])
    assert torch.isfinite(next(iter(_weights(out).values()))).all()
