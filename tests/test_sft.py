"""SFT end to end on tiny random models of two architectures, against stored loss curves."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from posttrain.algorithms.sft import SFTConfig, run_sft
from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.train import engine
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


# The engine trains on the GPU when there is one, else on the CPU, where it refuses bf16 autocast unless the
# CPU has bf16 units (engine.cpu_bf16_supported: oneDNN's check for AVX-512 BF16 / AMX); an AVX2-only CPU has
# none, and there bf16 would be emulated at many times fp32's cost. (The same check as the engine's, read once.)
BF16_TRAINS_HERE = torch.cuda.is_available() or engine.cpu_bf16_supported()


@pytest.mark.skipif(not BF16_TRAINS_HERE, reason="this CPU has no bf16 units (AVX-512 BF16 / AMX), so posttrain "
                    "refuses train.mixed_precision=bf16 here (test_bf16_is_refused_on_a_cpu_without_bf16_units)")
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the run would train on the GPU, where bf16 is native")
def test_bf16_is_refused_on_a_cpu_without_bf16_units(tmp_path, monkeypatch):
    """On a CPU without bf16 units (an AVX2-only one, simulated on any CPU) train.mixed_precision=bf16 stops
    before the first step with the reason and the fix, instead of emulating bf16 many times slower."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(engine, "cpu_bf16_supported", lambda: False)
    cfg = _config(tmp_path, **{"train.mixed_precision": "bf16", "train.max_steps": 1, "train.eval_every": 0,
                               "data.eval": "null"})
    model = tiny_model("llama", seed=0, hidden=64)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"train.mixed_precision=bf16 asks for bf16 compute, but this CPU has no "
                                          r"bf16 units(.|\n)*train in fp32 on this machine"):
        run_sft(cfg, model=model, tokenizer=world_tokenizer(), log=lambda s: None)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # not a step was taken
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN's x86 ISA cap")
def test_an_avx2_only_cpu_reports_no_bf16_units():
    """The check the refusal above rests on says "no" on an AVX2-only CPU: oneDNN capped at AVX2 (as on a
    2-core AMD EPYC VM without AVX-512) reports no bf16 units, whatever this machine has."""
    env = {**os.environ, "DNNL_MAX_CPU_ISA": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "from posttrain.train.engine import cpu_bf16_supported; print(cpu_bf16_supported())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
