"""SFT end to end on tiny random models of two architectures, against stored loss curves."""

import json

import pytest
import torch

from posttrain.algorithms.sft import SFTConfig, run_sft
from posttrain.config import load_config
from posttrain.world.datasets import sft_record, write_jsonl
from posttrain.world.tasks import generate_problems

from .tiny import tiny_model, world_tokenizer

# Per-step training losses of the run below (torch 2.13.0 CPU, fp32). A change in the loss,
# masking, packing, schedule or optimizer shows up here first.
STORED = {
    "llama": [6.03301, 5.54893, 5.2826, 5.01064, 4.84755, 4.72015],
    "qwen2": [6.00274, 5.63811, 5.32838, 5.09154, 4.89516, 4.81013],
}


def _config(tmp_path, **over):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [sft_record(p) for p in generate_problems(48, seed=11)])
    held = tmp_path / "held.jsonl"
    write_jsonl(held, [sft_record(p) for p in generate_problems(8, seed=11, split="heldout")])
    overrides = [f"data.train={data}", f"data.eval={held}", f"train.output_dir={tmp_path / 'run'}",
                 "train.max_steps=6", "train.lr=3e-3", "train.micro_batch_size=2", "train.grad_accum=2",
                 "train.warmup_ratio=0.2", "data.max_length=160", "train.progress=false", "train.eval_every=3"]
    overrides += [f"{k}={v}" for k, v in over.items()]
    return load_config(SFTConfig, None, overrides)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sft_tiny_models_match_stored_loss_curve(tmp_path, arch):
    cfg = _config(tmp_path)
    model = tiny_model(arch, seed=0, hidden=64)
    res = run_sft(cfg, model=model, tokenizer=world_tokenizer(), log=lambda s: None)
    losses = [h["loss"] for h in res.fit.history]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.5  # it learns
    assert losses == pytest.approx(STORED[arch], rel=1e-4)
    # eval loss logged at steps 3 and 6, and the eval entropy is a proper mean entropy
    evals = res.fit.eval_history
    assert [e["step"] for e in evals] == [3, 6]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert 0 < evals[1]["eval_entropy"] < torch.log(torch.tensor(float(model.config.vocab_size)))
    # metrics file, config and a transformers-loadable final model
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "entropy", "loss_tokens", "input_tokens"} <= set(rows[0])
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (res.final_dir / "config.json").is_file()


def test_packing_on_and_off_give_the_same_first_loss(tmp_path):
    """Same examples in step 1 (one epoch, one step covering all data): packed == padded loss."""
    losses = {}
    for packing in (True, False):
        cfg = _config(tmp_path / str(packing), **{"data.packing": packing, "train.max_steps": 1,
                                                  "train.micro_batch_size": 48, "train.grad_accum": 1,
                                                  "train.eval_every": 0})
        res = run_sft(cfg, model=tiny_model("llama", seed=0, hidden=64), tokenizer=world_tokenizer(),
                      log=lambda s: None)
        losses[packing] = res.fit.history[0]
    assert losses[True]["loss"] == pytest.approx(losses[False]["loss"], abs=1e-5)
    assert losses[True]["grad_norm"] == pytest.approx(losses[False]["grad_norm"], rel=1e-4)
    assert losses[True]["loss_tokens"] == losses[False]["loss_tokens"]


def test_bf16_autocast_tracks_fp32(tmp_path):
    """train.mixed_precision=bf16 (autocast over fp32 weights) stays close to the fp32 run."""
    runs = {}
    for mp in ("no", "bf16"):
        cfg = _config(tmp_path / mp, **{"train.mixed_precision": mp, "train.max_steps": 3, "train.eval_every": 0,
                                       "data.eval": "null"})
        model = tiny_model("llama", seed=0, hidden=64)
        res = run_sft(cfg, model=model, tokenizer=world_tokenizer(), log=lambda s: None)
        runs[mp] = [h["loss"] for h in res.fit.history]
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert runs["bf16"] == pytest.approx(runs["no"], rel=0.02)
    assert runs["bf16"] != runs["no"]  # autocast really ran in bf16
