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
    # full fine-tuning of 7B in fp32 weights + AdamW (16 bytes/param, ~100 GiB) on 8 x 80 GiB: ZeRO-2 over the 8
    # devices (gradients and optimizer state / 8: 4 + 12/8 = 5.5 bytes/param) fits before LoRA is suggested;
    # on 8 x 40 GiB only sharding the weights too (FSDP2 / ZeRO-3, full logits) does
    v = verdict(llama7b, PlanInput(method="sft", seq_len=2048, micro_batch=1, devices=8, device_memory_gib=80,
                                   activation_dtype="bfloat16"))
    assert not v.fits and "train.sharding=zero2" in v.advice and "LoRA" not in v.advice
    zero2 = estimate(llama7b, PlanInput(method="sft", seq_len=2048, devices=8, sharding="zero2",
                                        activation_dtype="bfloat16"))
    n = llama7b.params
    assert zero2["weights"] == 4 * n and zero2["optimizer"] == pytest.approx(8 * n / 8)
    v = verdict(llama7b, PlanInput(method="sft", seq_len=2048, micro_batch=1, devices=8, device_memory_gib=40,
                                   activation_dtype="bfloat16"))
    assert not v.fits and "train.sharding=fsdp2 / zero3" in v.advice and "LoRA" not in v.advice
    sharded = peak_bytes(estimate(llama7b, PlanInput(method="sft", seq_len=2048, devices=8, sharding="fsdp",
                                                     chunked_logprobs=False, activation_dtype="bfloat16")))
    assert sharded < 80 * GIB
    # sampling methods are not sharded by posttrain: the planner says so
    v = verdict(llama7b, PlanInput(method="grpo", seq_len=1024, devices=8, device_memory_gib=40, peft="qlora",
                                   gradient_checkpointing=True))
    assert "train.sharding=fsdp2" not in v.advice
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
    print("sft", micro_batch, seq_len, predicted / 2**20, measured / 2**20)
    assert abs(predicted - measured) / measured < 0.15, (predicted / 2**20, measured / 2**20)


def test_plan_command(capsys):
    from posttrain.cli import main

    assert main(["plan", "--method", "grpo", "--seq-len", "128", "--new-tokens", "64", "--device-memory", "1"]) == 0
    out = capsys.readouterr().out
    assert "| kv_cache |" in out and "| reference |" in out and out.strip().splitlines()[-1].startswith("fits")
    assert main(["plan", "--model", "/nonexistent/model"]) == 2
    assert "'--model': no such directory '/nonexistent/model'" in capsys.readouterr().err


class _Captured(Exception):
    pass


def _capture_fit(monkeypatch, module):
    """Replace ``module.fit`` so a command builds its model, algorithm and plan and stops there."""
    box = {}

    def fake_fit(model, algorithm, plan, *args, **kw):
        box.update(model=model, algorithm=algorithm, plan=plan)
        raise _Captured

    monkeypatch.setattr(module, "fit", fake_fit)
    return box


def _tracked_step(model, algorithm, micro, reference=None) -> float:
    """Peak bytes of one optimizer step over the given micro-batches (after a first step made the
    optimizer state), tensor by tensor; ``reference`` (a frozen copy the step does not run) is
    counted as held memory."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from posttrain.train.optim import build_optimizer

    opt = build_optimizer(model, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    totals = {k: torch.tensor(float(sum(int(algorithm.counts(b)[k]) for b in micro))) for k in algorithm.counts(micro[0])}

    def step():
        for b in micro:
            loss, _ = algorithm.loss(model, b, totals)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    # MemTracker hooks every parameter of the modules it sees run; it refuses frozen ones (the
    # reference copy), so mark them trainable while tracking: it runs under no_grad and makes no
    # gradients either way
    frozen = [q for q in getattr(getattr(algorithm, "reference", None), "parameters", lambda: [])()
              if not q.requires_grad]
    for q in frozen:
        q.requires_grad_(True)
    tracker = MemTracker()
    tracker.track_external(model, opt, *([reference] if reference is not None else []))
    try:
        with tracker:
            step()
    finally:
        for q in frozen:
            q.requires_grad_(False)
    (per_kind,) = tracker.get_tracker_snapshot("peak").values()
    return sum(v for k, v in per_kind.items() if not str(k).endswith("Total"))


def test_predicted_dpo_and_grpo_peaks_are_within_15_percent_of_the_measured_ones(monkeypatch, tmp_path):
    """The real commands build model, algorithm and plan (their fit is stopped); one step of
    each is tracked: DPO with its frozen reference copy (pairs without a shared prompt, so the
    estimate's two full sequences per pair hold), and GRPO's training step on its rollouts."""
    import json

    import posttrain.algorithms.dpo as dpo
    import posttrain.algorithms.rl as rl
    from posttrain.algorithms.dpo import DPOConfig, run_preference
    from posttrain.algorithms.rl_config import RLConfig
    from posttrain.config import load_config
    from posttrain.memory import load_model_config

    shape = model_shape(load_model_config("builtin:tiny-world-base"))
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(str(int(x)) for x in torch.randint(0, 9, (n,), generator=g))

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": text(40), "chosen": text(80), "rejected": text(80)}) + "\n"
                             for _ in range(8)))
    box = _capture_fit(monkeypatch, dpo)
    with pytest.raises(_Captured):
        run_preference(load_config(DPOConfig, None, [
            f"data.train={pairs}", "data.eval=null", "data.share_prefix=false", "data.packing=false",
            "train.micro_batch_size=8", f"train.output_dir={tmp_path / 'dpo'}", "train.progress=false"]),
            log=lambda s: None)
    micro = box["plan"].batches(0)
    lengths = (micro[0]["attention_mask"].sum(-1) if "attention_mask" in micro[0] else None)
    seq_len = int(lengths.max()) if lengths is not None else micro[0]["input_ids"].shape[1]
    measured = _tracked_step(box["model"], box["algorithm"], micro)
    predicted = peak_bytes(estimate(shape, PlanInput(method="dpo", seq_len=seq_len, micro_batch=8)))
    print("dpo", predicted / 2**20, measured / 2**20)
    assert abs(predicted - measured) / measured < 0.15, ("dpo", predicted / 2**20, measured / 2**20)

    box = _capture_fit(monkeypatch, rl)
    with pytest.raises(_Captured):
        rl.run_rl(load_config(RLConfig, None, [
            "algorithm=grpo", "rollout.group_size=8", "rollout.prompts_per_step=4", "rollout.max_new_tokens=64",
            "data.world_examples=16", "data.eval=null", "train.max_steps=1", "loss.kl_beta=0.04",
            f"train.output_dir={tmp_path / 'grpo'}", "train.progress=false"]), log=lambda s: None)
    plan = box["plan"]
    (tmp_path / "grpo").mkdir(exist_ok=True)   # the rollouts' samples.jsonl goes there
    micro = plan.batches(0)   # samples the rollouts and computes old / reference log-probs (not tracked)
    reference = plan.r.reference
    assert reference is not None
    rows, width = max(b["input_ids"].shape for b in micro)
    measured = _tracked_step(box["model"], box["algorithm"], micro, reference=reference)
    predicted = peak_bytes({k: v for k, v in estimate(shape, PlanInput(
        method="grpo", seq_len=width - 64, micro_batch=rows, new_tokens=64)).items() if k != "kv_cache"})
    print("grpo", predicted / 2**20, measured / 2**20)
    assert abs(predicted - measured) / measured < 0.15, ("grpo", predicted / 2**20, measured / 2**20)
