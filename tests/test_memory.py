"""The memory planner: the well-known per-parameter byte counts of published configurations, the
predicted peak of a real training step against the measured one, the verdict, the command."""

from __future__ import annotations

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.memory import GIB, PlanInput, estimate, lora_params, model_shape, peak_bytes, verdict

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def llama7b():
    from transformers import LlamaConfig

    return model_shape(LlamaConfig(**LLAMA2_7B))


def test_published_7b_figures(llama7b):
    assert llama7b.params == 6_738_415_616                     # Llama-2-7B
    # LoRA r=16 on all linear layers: peft reports 39,976,960 trainable parameters for this model
    assert lora_params(llama7b, 16) == 39_976_960
    full = estimate(llama7b, PlanInput(method="sft", weight_dtype="float32", activation_dtype="bfloat16"))
    # mixed-precision AdamW: 4 (fp32 weights) + 4 (gradients) + 8 (two fp32 moments) = 16 bytes per parameter
    assert full["weights"] + full["gradients"] + full["optimizer"] == 16 * llama7b.params
    # bf16 weights: 2 bytes per parameter (13.5 GB)
    assert estimate(llama7b, PlanInput(weight_dtype="bfloat16"))["weights"] == 2 * llama7b.params
    # QLoRA: ~0.53 byte per linear weight (4-bit + double-quantized absmax) + bf16 embeddings/norms + fp32 adapters
    q = estimate(llama7b, PlanInput(weight_dtype="bfloat16", peft="qlora"))
    assert 3.5 * GIB < q["weights"] < 4.5 * GIB
    assert q["gradients"] == 4 * 39_976_960 and q["optimizer"] == 8 * 39_976_960
    # ZeRO-3 over 8 devices divides weights, gradients and optimizer state by 8
    z = estimate(llama7b, PlanInput(devices=8, sharding="zero3"))
    assert z["weights"] * 8 == full["weights"] and z["optimizer"] * 8 == full["optimizer"]


def test_the_verdict_names_the_cheapest_change(llama7b):
    v = verdict(llama7b, PlanInput(method="dpo", seq_len=1024, micro_batch=4, weight_dtype="bfloat16",
                                   activation_dtype="bfloat16", device_memory_gib=24))
    assert not v.fits and "LoRA" in v.advice and v.advice.startswith("does not fit")
    fits = verdict(llama7b, PlanInput(method="sft", seq_len=512, weight_dtype="bfloat16", activation_dtype="bfloat16",
                                      peft="qlora", device_memory_gib=24))
    assert fits.fits
    # LoRA makes the reference the adapter-disabled model: no copy
    assert "reference" in estimate(llama7b, PlanInput(method="dpo"))
    assert "reference" not in estimate(llama7b, PlanInput(method="dpo", peft="lora"))
    assert "reference" not in estimate(llama7b, PlanInput(method="simpo"))
    ppo = estimate(llama7b, PlanInput(method="ppo", reward_model=True))
    assert {"critic", "critic_gradients", "reward_model", "kv_cache", "reference"} <= set(ppo)
    with pytest.raises(ConfigError, match="Unknown method 'sftt'"):
        estimate(llama7b, PlanInput(method="sftt"))


def _measured_sft_peak(micro_batch: int, seq_len: int) -> float:
    """Peak bytes of one real SFT optimizer step (the engine's loss path: fused, chunked
    log-probs) of the shipped tiny model, tracked tensor by tensor (torch's MemTracker)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from posttrain.algorithms.sft import SFTAlgorithm, SFTPlan
    from posttrain.data import EncodedExample
    from posttrain.models.loading import load_causal_lm

    g = torch.Generator().manual_seed(0)
    model = load_causal_lm("builtin:tiny-world-base", device="cpu")
    ex = [EncodedExample(input_ids=torch.randint(0, 700, (seq_len,), generator=g).tolist(),
                         labels=torch.randint(0, 700, (seq_len,), generator=g).tolist()) for _ in range(micro_batch)]
    plan = SFTPlan(ex, micro_batch_size=micro_batch, grad_accum=1, epochs=1, max_steps=1, packing=True,
                   row_length=seq_len, pad_token_id=0, seed=0)
    alg = SFTAlgorithm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        micro = plan.batches(0)
        totals = {k: torch.tensor(float(sum(int(alg.counts(b)[k]) for b in micro))) for k in alg.counts(micro[0])}
        for b in micro:
            loss, _ = alg.loss(model, b, totals)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()   # the optimizer state exists from the first step on
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    (per_kind,) = tracker.get_tracker_snapshot("peak").values()   # the one device, the CPU
    return sum(v for k, v in per_kind.items() if not str(k).endswith("Total"))


@pytest.mark.parametrize("micro_batch,seq_len", [(8, 256), (2, 512)])
def test_predicted_sft_peak_is_within_15_percent_of_the_measured_one(micro_batch, seq_len):
    from posttrain.memory import load_model_config

    measured = _measured_sft_peak(micro_batch, seq_len)
    shape = model_shape(load_model_config("builtin:tiny-world-base"))
    predicted = peak_bytes(estimate(shape, PlanInput(method="sft", seq_len=seq_len, micro_batch=micro_batch)))
    assert abs(predicted - measured) / measured < 0.15, (predicted / 2**20, measured / 2**20)


def test_plan_command(capsys):
    from posttrain.cli import main

    assert main(["plan", "--method", "grpo", "--seq-len", "128", "--new-tokens", "64", "--device-memory", "1"]) == 0
    out = capsys.readouterr().out
    assert "| kv_cache |" in out and "| reference |" in out and out.strip().splitlines()[-1].startswith("fits")
    assert main(["plan", "--model", "/nonexistent/model"]) == 2
    assert "'--model': no such directory '/nonexistent/model'" in capsys.readouterr().err
