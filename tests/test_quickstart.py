"""The quickstart pipeline end to end on a very small budget (the real run is `make quickstart`)."""

import json

import pytest

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.quickstart import QuickstartConfig, run_quickstart


def test_quickstart_small(tmp_path):
    lines = []
    cfg = load_config(QuickstartConfig, None, [
        f"output_dir={tmp_path}", "stages=[sft,rm,dpo,rl]", "train_examples=64", "eval_problems=8", "curve_points=1", "curve_problems=4",
        "max_new_tokens=24", "sft.train.max_steps=4", "sft.train.progress=false", "preference_pairs=12",
        "eval_pairs=6", "rm.train.max_steps=2", "rm.train.progress=false", "dpo.train.max_steps=2",
        "dpo.train.progress=false", "dpo_losses=[dpo,simpo]", "rl_prompts=8", "rl.train.max_steps=1",
        "rl.train.progress=false", "rl.rollout.prompts_per_step=2", "rl.rollout.group_size=2",
        "rl.rollout.max_new_tokens=8",
    ])
    summary = run_quickstart(cfg, log=lines.append)
    text = "\n".join(lines)
    assert "held-out accuracy" in text and "format compliance" in text
    assert "reward model (from SFT, bt): held-out pairwise accuracy" in text
    assert "dpo: held-out accuracy" in text and "simpo: held-out accuracy" in text
    assert "grpo: held-out accuracy" in text
    for name in ("summary.json", "samples.jsonl", "learning_curves.png", "sft/metrics.jsonl", "sft/final/config.json",
                 "rm/final/config.json", "dpo-dpo/final/config.json", "dpo-simpo/metrics.jsonl",
                 "dpo-dpo/curves.png", "dpo-simpo/curves.png", "rl/curves.png",
                 "data/sft_train.jsonl", "data/problems_heldout.jsonl", "data/pairs_train.jsonl"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["sft_steps"] == 4 == summary["sft_steps"]
    assert [c[0] for c in saved["learning_curve"]] == [0, 2, 4]
    assert set(saved) >= {"base", "SFT", "+dpo", "+simpo", "+grpo", "reward_model", "preference", "rl"}
    assert 0.0 <= saved["+dpo"]["accuracy"] <= 1.0
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and set(rows[0]) >= {"question", "answer", "base", "SFT", "+dpo", "+simpo", "+grpo"}
    # a second quickstart replaces its own run directory (no "already holds an earlier run")
    again = load_config(QuickstartConfig, None, [
        f"output_dir={tmp_path}", "stages=[sft]", "train_examples=16", "eval_problems=4", "curve_points=0",
        "max_new_tokens=8", "sft.train.max_steps=1", "sft.train.progress=false"])
    assert run_quickstart(again, log=lambda s: None)["sft_steps"] == 1
    steps = sorted(p.name for p in (tmp_path / "sft" / "checkpoints").iterdir())
    assert steps == ["step-000001"]  # the first run's step-000004 was replaced, not mixed in


def test_quickstart_rl_stage(tmp_path):
    """stages=[sft,rl]: online RL (dapo here) from the SFT checkpoint on the world's train problems."""
    lines = []
    cfg = load_config(QuickstartConfig, None, [
        f"output_dir={tmp_path}", "stages=[sft,rl]", "train_examples=32", "eval_problems=6", "curve_points=0",
        "max_new_tokens=16", "sft.train.max_steps=2", "sft.train.progress=false", "rl_prompts=24",
        "rl.algorithm=dapo", "rl.train.max_steps=2", "rl.train.progress=false", "rl.rollout.prompts_per_step=2",
        "rl.rollout.group_size=2", "rl.rollout.max_new_tokens=8"])
    summary = run_quickstart(cfg, log=lines.append)
    text = "\n".join(lines)
    assert "+dapo" in text and "dapo: held-out accuracy" in text
    for name in ("rl/final/config.json", "rl/curves.png", "rl/samples.jsonl", "data/problems_train.jsonl"):
        assert (tmp_path / name).is_file(), name
    assert summary["rl"]["algorithm"] == "dapo" and 0.0 <= summary["+dapo"]["accuracy"] <= 1.0
    with pytest.raises(ConfigError, match="rl.model.name_or_path"):
        load_config(QuickstartConfig, None, ["rl.model.name_or_path=x"])


def test_quickstart_stage_validation():
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(QuickstartConfig, None, ["stages=[sft,ppo]"])
    assert load_config(QuickstartConfig, None, []).stages == ["sft", "dpo", "rl"]
    with pytest.raises(ConfigError, match=r"'direct_answer_levels' is \[3, 5\]; the world's levels are \[1, 2, 3, 4\]"):
        load_config(QuickstartConfig, None, ["direct_answer_levels=[3,5]"])
    with pytest.raises(ConfigError, match="'sft' must be in 'stages'"):
        load_config(QuickstartConfig, None, ["stages=[dpo]"])
    with pytest.raises(ConfigError, match="paired losses"):
        load_config(QuickstartConfig, None, ["dpo_losses=[kto]"])


def test_quickstart_uses_the_sft_sections_tokenizer_settings(tmp_path):
    """sft.model.pad_token / chat_template / tokenizer reach the tokenizer (they were ignored once)."""
    import json as _json

    from tests.tiny import tiny_model, world_tokenizer

    d = tmp_path / "m"
    tiny_model("llama", hidden=32).save_pretrained(d)
    world_tokenizer().save_pretrained(d)
    tc = _json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("pad_token", None)
    (d / "tokenizer_config.json").write_text(_json.dumps(tc))
    cfg = load_config(QuickstartConfig, None, [
        f"output_dir={tmp_path / 'qs'}", "stages=[sft]", f"sft.model.name_or_path={d}", "sft.model.pad_token=<|im_end|>",
        "train_examples=8", "eval_problems=2", "curve_points=0", "max_new_tokens=4", "sft.train.max_steps=1",
        "sft.train.progress=false"])
    assert run_quickstart(cfg, log=lambda s: None)["sft_steps"] == 1
    with pytest.raises(ConfigError, match="sets it itself"):
        load_config(QuickstartConfig, None, ["sft.train.seed=3"])


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_world_sft_data_mixes_direct_answers_in_the_given_share(tmp_path, fraction):
    """direct_answers: that share of the train conversations (seeded) replies with the final line
    only; the others and every held-out conversation keep the worked solution."""
    from posttrain.world.datasets import write_world_datasets
    from posttrain.world.tasks import generate_problems

    paths = write_world_datasets(tmp_path, n_train=400, n_heldout=20, seed=3, direct_fraction=fraction)
    train = [json.loads(x)["messages"] for x in paths["sft_train"].read_text().splitlines()]
    problems = generate_problems(400, seed=3, split="train")
    direct = 0
    for msgs, p in zip(train, problems, strict=True):
        assert msgs[0]["content"] == p.question
        if msgs[1]["content"] == f"#### {p.answer}":
            direct += 1
        else:
            assert msgs[1]["content"] == p.solution and "\n" in p.solution
    # binomial(400, 0.5): 5 standard deviations = 50
    assert {0.0: direct == 0, 1.0: direct == 400, 0.5: abs(direct - 200) < 50}[fraction], direct
    held = [json.loads(x)["messages"][1]["content"] for x in paths["sft_heldout"].read_text().splitlines()]
    assert all("\n" in h for h in held)
    again = write_world_datasets(tmp_path / "again", n_train=400, n_heldout=20, seed=3, direct_fraction=fraction)
    assert again["sft_train"].read_text() == paths["sft_train"].read_text()
