"""Online DPO: the pairing rule by hand, ln 2 at every refreshed reference, micro-batching
equality, exact resume, a stored short curve, the command line on tiny Llama and Qwen2, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import online_dpo as od
from posttrain.algorithms.online_dpo import OnlineDPOConfig, best_worst_pairs, run_online_dpo
from posttrain.cli import main
from posttrain.config import load_config
from posttrain.errors import ConfigError, TrainingError

from .tiny import tiny_model, world_tokenizer


def test_best_vs_worst_pairs_by_hand():
    nan = float("nan")
    p = best_worst_pairs([
        [0.0, 1.0, 0.5, 1.0],      # best: first of the two 1.0 (sample 1); worst: sample 0
        [1.0, 1.0, 1.0, 1.0],      # all tied: skipped, counted
        [None, 0.3, nan, None],    # one valid reward: skipped, counted
        [0.2, None, 0.2, -1.0],    # invalid left out; worst -1.0 (sample 3), best first 0.2 (sample 0)
        [0.7, 0.7, None, nan],     # the valid ones tie
    ])
    assert p.pairs == [(0, 1, 0), (3, 0, 3)]
    assert (p.tied, p.too_few_valid) == (2, 1)


def _cfg(out, **overrides) -> OnlineDPOConfig:
    base = {
        "train.output_dir": str(out), "train.progress": "false", "train.lr": 1e-3, "train.max_steps": 4,
        "online.steps_per_rollout": 2, "data.world_examples": 40, "data.eval": "null", "rollout.prompts_per_step": 4,
        "rollout.group_size": 4, "rollout.max_new_tokens": 10, "reward.functions": "[tests.test_rft:digit_reward]",
        "train.micro_batch_size": 4, "rollout.samples_every": 1,
    }
    base.update(overrides)
    return load_config(OnlineDPOConfig, None, [f"{k}={v}" for k, v in base.items()])


def _run(cfg, model=None):
    return run_online_dpo(cfg, model=model or tiny_model("llama", seed=0, hidden=32), tokenizer=world_tokenizer(),
                          log=lambda s: None)


def test_refreshed_reference_gives_ln2_at_every_iteration_start(tmp_path):
    res = _run(_cfg(tmp_path / "r", **{"online.reference": "refresh", "train.max_steps": 6}))
    h = res.fit.history
    for i in (0, 2, 4):  # first step of each iteration: policy == reference
        assert h[i]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert h[i]["chosen_logratio"] == pytest.approx(0.0, abs=1e-6)
    # the step after trained on the same pairs: in the first iteration Adam's first update is a sign-gradient
    # step of size lr, which lowers the loss on them; later iterations carry momentum from earlier pairs, so
    # there the loss has only moved away from ln 2
    assert h[1]["loss"] < math.log(2)
    assert all(abs(h[i]["loss"] - math.log(2)) > 1e-6 for i in (3, 5))
    # with the initial policy as reference only the very first step is at ln 2
    res = _run(_cfg(tmp_path / "i", **{"online.reference": "initial", "train.max_steps": 6}))
    assert res.fit.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(res.fit.history[2]["loss"] - math.log(2)) > 1e-3


def test_micro_batches_do_not_change_the_step(tmp_path):
    """One forward of 4 pairs vs four of 1 (global unit counts): the same loss and gradient norm at
    every step of two iterations, and the same weights after one step. (Over several Adam steps,
    coordinates with near-zero gradients amplify float rounding, so weights are compared after one.)"""
    runs = {}
    for mbs in (4, 1):
        runs[mbs] = _run(_cfg(tmp_path / f"a{mbs}", **{"train.micro_batch_size": mbs}))
    for key in ("loss", "grad_norm"):
        assert [h[key] for h in runs[1].fit.history] == pytest.approx([h[key] for h in runs[4].fit.history],
                                                                      rel=1e-5), key
    weights = {}
    for mbs in (4, 1):
        model = tiny_model("llama", seed=0, hidden=32)
        _run(_cfg(tmp_path / f"b{mbs}", **{"train.micro_batch_size": mbs, "train.max_steps": 1,
                                            "online.steps_per_rollout": 1}), model)
        weights[mbs] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(weights[1], weights[4], atol=1e-6)


def test_resume_continues_exactly(tmp_path):
    common = {"train.save_every": 2}
    full_model = tiny_model("llama", seed=0, hidden=32)
    full = _run(_cfg(tmp_path / "full", **common), full_model)

    class Stop(Exception):
        pass

    original = od.PreferenceAlgorithm.loss
    calls = {"n": 0}

    def stopping(self, model, batch, totals):
        calls["n"] += 1
        if calls["n"] > 2:  # one micro-batch per step: stop inside step 3
            raise Stop
        return original(self, model, batch, totals)

    cut = _cfg(tmp_path / "cut", **common)
    od.PreferenceAlgorithm.loss = stopping
    try:
        with pytest.raises(Stop):
            _run(cut)
    finally:
        od.PreferenceAlgorithm.loss = original
    cut.train.resume = "auto"
    model = tiny_model("llama", seed=0, hidden=32)
    resumed = _run(cut, model)
    assert [h["step"] for h in resumed.fit.history] == [3, 4]
    for key in ("loss", "reward/mean", "grad_norm"):
        assert [h.get(key) for h in resumed.fit.history] == [h.get(key) for h in full.fit.history[2:]], key
    for x, y in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(x, y)


# (loss, grad_norm) of 4 steps (2 iterations) on a tiny random Llama with digit_reward, reference initial
# (regenerate with _run(_cfg(...))); step 1 is at ln 2 (policy == reference)
STORED = [[0.693147, 1.301951], [0.691347, 1.301827], [0.69143, 1.336834], [0.69118, 1.280041]]


def test_online_dpo_matches_its_stored_curve(tmp_path):
    res = _run(_cfg(tmp_path / "r"))
    got = [[h["loss"], h["grad_norm"]] for h in res.fit.history]
    assert [g[0] for g in got] == pytest.approx([s[0] for s in STORED], rel=1e-4)
    assert [g[1] for g in got] == pytest.approx([s[1] for s in STORED], rel=1e-4)
    lines = (tmp_path / "r" / "pairs.jsonl").read_text().splitlines()
    assert len(lines) == 8  # 4 pairs x 2 iterations (rollout.samples_every=1)


def test_all_tied_groups_stop_with_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path / "r", **{"reward.functions": "[tests.test_rft:zero_reward]", "online.max_sampling_rounds": 1})
    with pytest.raises(TrainingError, match=r"iteration 1: all \d+ sampled prompts gave no pair \(\d+ with tied"):
        _run(cfg)
    assert not (tmp_path / "r" / "final").exists()


def test_config_errors():
    with pytest.raises(ConfigError, match="builds pairs"):
        load_config(OnlineDPOConfig, None, ["loss.name=kto"])
    with pytest.raises(ConfigError, match="a pair needs two samples"):
        load_config(OnlineDPOConfig, None, ["rollout.group_size=1"])
    with pytest.raises(ConfigError, match="online.reference=refresh"):
        load_config(OnlineDPOConfig, None, ["online.reference=refresh", "loss.reference=some/dir"])
    with pytest.raises(ConfigError, match="not a multiple of online.steps_per_rollout=3"):
        load_config(OnlineDPOConfig, None, ["online.steps_per_rollout=3", "train.max_steps=10"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_online_dpo_runs_from_the_command_line(capsys, model_dirs, tmp_path, arch, loss):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    code = main(["online-dpo", f"model.name_or_path={model_dirs[arch]}", f"train.output_dir={out}",
                 "train.progress=false", "train.max_steps=2", f"loss.name={loss}", "data.world_examples=20",
                 "data.eval=null", "rollout.prompts_per_step=2", "rollout.group_size=3", "rollout.max_new_tokens=8",
                 "reward.functions=[tests.test_rft:digit_reward]"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "done: 2 steps" in printed.out
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.model_type == arch


def test_process_reward_placement_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="posttrain online-dpo` scores whole completions"):
        load_config(OnlineDPOConfig, None, ["reward.process_weight=1", "reward.process_reward_model=x"])
    from posttrain.algorithms.rft import RFTConfig

    with pytest.raises(ConfigError, match="posttrain rft` scores whole completions"):
        load_config(RFTConfig, None, ["reward.process_weight=1", "reward.process_reward_model=x"])
