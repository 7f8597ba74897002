"""train.gradient_checkpointing: the same losses, gradients and weights as without it (SFT micro-batch
with a full model, LoRA SFT through the engine, one GRPO step, one PPO step with its critic), and it
really recomputes each decoder layer's forward pass while training, and only then.

Why bitwise equality (``torch.equal``) is the right tolerance: transformers' per-layer checkpointing
with ``use_reentrant=False`` keeps the autograd graph of the plain forward pass and only drops the
tensors it saved for the backward; when the backward pass needs them it reruns the layer's forward
on the same input tensor, with the same weights, the same kernels on the same shapes and the same RNG
state (dropout draws the same masks). fp32 operations are deterministic on one machine, so the
recomputed tensors are the same bits, and the backward pass runs the same nodes in the same order:
no rounding difference is introduced anywhere (measured: 0.0 difference in every gradient element).
A difference of even one ulp would mean the recomputation is not the computation it replaces.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain.algorithms import rl as rl_mod
from posttrain.algorithms.rl import run_rl
from posttrain.algorithms.sft import SFTAlgorithm, SFTConfig, SFTPlan, run_sft
from posttrain.cli import main
from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.train.gradient_checkpointing import checkpointed_layers, gradient_checkpointing, hf_models
from posttrain.world.datasets import sft_record
from posttrain.world.tasks import generate_problems

from .rounding import optimizer_steps
from .test_distributed import ws  # noqa: F401  (the 2-process tests' model and data, a fixture)
from .test_rl import _cfg as _rl_cfg
from .tiny import sft_examples, tiny_model, world_tokenizer


def _count_layer_forwards(model) -> tuple[list[int], list]:
    """Calls of each decoder layer's MLP: once per forward pass, and once more per recomputation
    (the checkpoint reruns the layer's ``forward``, which calls its MLP module; a pre-hook, because
    torch stops a recomputation as soon as it has the last tensor the backward needs)."""
    calls, handles = [], []
    layers = [m for n, m in model.named_modules() if n.endswith(".mlp")]
    for i, mlp in enumerate(layers):
        calls.append(0)
        handles.append(mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)))
    return calls, handles


def _micro_batch_gradients(model, on: bool):
    plan = SFTPlan(sft_examples(12), micro_batch_size=4, grad_accum=1, epochs=1, max_steps=1, packing=True,
                   row_length=128, pad_token_id=0, seed=0)
    alg, batch = SFTAlgorithm(), plan.batches(0)[0]
    totals = {k: torch.tensor(float(v)) for k, v in alg.counts(batch).items()}
    model.train()
    calls, handles = _count_layer_forwards(model)
    with gradient_checkpointing(model, on) as layers:
        assert layers == (3 if on else 0) and checkpointed_layers(model) == layers
        loss, metrics = alg.loss(model, batch, totals)
        loss.backward()
    for h in handles:
        h.remove()
    assert checkpointed_layers(model) == 0  # off again afterwards
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), metrics, grads, calls


def test_sft_micro_batch_has_the_same_loss_and_gradients_and_recomputes_each_layer():
    l0, m0, g0, calls0 = _micro_batch_gradients(tiny_model("llama", layers=3, hidden=64), on=False)
    l1, m1, g1, calls1 = _micro_batch_gradients(tiny_model("llama", layers=3, hidden=64), on=True)
    assert calls0 == [1, 1, 1] and calls1 == [2, 2, 2]  # each layer's forward once more, in the backward
    assert torch.equal(l0, l1) and all(torch.equal(m0[k], m1[k]) for k in m0)
    assert g0.keys() == g1.keys() and len(g0) == 3 * 9 + 2  # every weight (tied embeddings, final norm)
    for k in g0:
        assert torch.equal(g0[k], g1[k]), (k, float((g0[k] - g1[k]).abs().max()))


def test_only_training_with_gradients_recomputes():
    """A forward pass in eval mode, or under no_grad, runs each layer once, exactly as without
    checkpointing; the sampler (eval mode, no_grad, KV cache) samples the same completions from a
    checkpointed model in training mode, and leaves it in training mode."""
    from posttrain.rollout.sampler import sample_groups

    model, tok = tiny_model("llama", layers=3, hidden=64), world_tokenizer()
    prompts = [tok.encode("12 + 7 ="), tok.encode("3 * 4 =")]
    ids = torch.tensor([prompts[0]])

    def rollouts():
        return [(r.completion_ids, r.log_probs) for r in
                sample_groups(model, tok, prompts, group_size=3, max_new_tokens=8, temperature=1.0, seed=1)]

    want = rollouts()
    with gradient_checkpointing(model, True):
        for training, grad in ((False, True), (True, False)):
            model.train(training)
            calls, handles = _count_layer_forwards(model)
            with torch.set_grad_enabled(grad):
                model(input_ids=ids, use_cache=False)
            assert calls == [1, 1, 1], (training, grad)
            for h in handles:
                h.remove()
        model.train()
        assert rollouts() == want and model.training


def _sft_cfg(tmp_path, name, **over) -> SFTConfig:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(sft_record(p)) + "\n" for p in generate_problems(16, seed=3)))
    overrides = {"data.train": data, "data.eval": "null", "train.output_dir": tmp_path / name, "train.max_steps": 2,
                 "train.lr": 3e-3, "train.micro_batch_size": 2, "train.grad_accum": 2, "data.max_length": 128,
                 "train.progress": "false", "model.peft.method": "lora", "model.peft.r": 4,
                 "model.peft.init": "gaussian", "model.peft.dropout": 0.1, **over}
    return load_config(SFTConfig, None, [f"{k}={v}" for k, v in overrides.items()])


def test_lora_sft_through_the_engine_is_the_same_with_adapter_dropout(tmp_path):
    """peft adapters on a frozen base (no input needs a gradient: non-reentrant checkpointing) with
    dropout 0.1 on the adapters' input: the recomputation draws the same dropout masks, so the two
    optimizer steps' gradients, the logged losses and the saved adapters are the same bits; the
    engine logs the switch and leaves the model as it found it."""
    runs = {}
    for on in (False, True):
        lines, seen = [], []
        model = tiny_model("llama", layers=3, hidden=64)
        original = SFTAlgorithm.loss

        def loss(self, m, batch, totals):
            seen.append((checkpointed_layers(m), m.training))
            return original(self, m, batch, totals)

        SFTAlgorithm.loss = loss
        try:
            with optimizer_steps() as steps:
                res = run_sft(_sft_cfg(tmp_path, f"on{on}", **{"train.gradient_checkpointing": str(on).lower()}),
                              model=model, tokenizer=world_tokenizer(), log=lines.append)
        finally:
            SFTAlgorithm.loss = original
        assert {s for s in seen if s[1]} == {(3 if on else 0, True)}  # every training forward
        assert any("gradient checkpointing: 3 decoder layers" in ln for ln in lines) == on
        assert not getattr(hf_models(model)[0], "_require_grads_hooks", None)  # (no input-grad hook left)
        runs[on] = (res, steps)
    (r0, s0), (r1, s1) = runs[False], runs[True]
    assert [h["loss"] for h in r0.fit.history] == [h["loss"] for h in r1.fit.history]
    assert [h["grad_norm"] for h in r0.fit.history] == [h["grad_norm"] for h in r1.fit.history]
    assert len(s0) == len(s1) == 2
    for a, b in zip(s0, s1):
        for ga, gb in zip(a, b):
            assert len(ga["grads"]) == len(gb["grads"]) > 0
            assert all(torch.equal(x, y) for x, y in zip(ga["grads"], gb["grads"]))
    w0, w1 = (load_file(str(tmp_path / d / "final" / "adapter_model.safetensors")) for d in ("onFalse", "onTrue"))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


def _rl_step(tmp_path, name, on: bool, **over):
    seen = []
    original = rl_mod.OnlineRLAlgorithm.loss

    def loss(self, model, batch, totals):
        seen.append((checkpointed_layers(model), model.training))
        return original(self, model, batch, totals)

    rl_mod.OnlineRLAlgorithm.loss = loss
    try:
        model = tiny_model("llama", seed=0, hidden=32, layers=2)
        with optimizer_steps() as steps:
            res = run_rl(_rl_cfg(tmp_path / name, **{"train.max_steps": 1, "train.gradient_checkpointing": on, **over}),
                         model=model, tokenizer=world_tokenizer(), log=lambda s: None)
    finally:
        rl_mod.OnlineRLAlgorithm.loss = original
    return res, steps, seen, tmp_path / name


@pytest.mark.parametrize("algorithm,layers", [("grpo", 2), ("ppo", 4)])
def test_one_online_rl_step_is_the_same(tmp_path, algorithm, layers):
    """One GRPO step (k3 KL to a frozen reference) and one PPO step (the critic, a second backbone,
    checkpointed too): the same rollouts (sampling is unaffected), the same loss, gradient norm,
    gradients and trained weights."""
    (r0, s0, seen0, d0), (r1, s1, seen1, d1) = (_rl_step(tmp_path, f"{algorithm}{on}", on, algorithm=algorithm)
                                                 for on in (False, True))
    # (every training forward; the final probe loss runs in eval mode)
    assert {s for s in seen0 if s[1]} == {(0, True)} and {s for s in seen1 if s[1]} == {(layers, True)}
    h0, h1 = r0.fit.history[0], r1.fit.history[0]
    for key in ("reward/mean", "loss", "grad_norm", "kl_k3" if algorithm == "grpo" else "value_loss"):
        assert h0[key] == h1[key], key
    assert (d0 / "samples.jsonl").read_text() == (d1 / "samples.jsonl").read_text()
    for ga, gb in zip(s0[0], s1[0], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(ga["grads"], gb["grads"], strict=True))
    for part in ("", "critic/") if algorithm == "ppo" else ("",):
        w0, w1 = (load_file(str(d / "final" / part / "model.safetensors")) for d in (d0, d1))
        assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0), part
    # final/ is the same model directory (no checkpointing setting leaks into config.json)
    assert (d0 / "final" / "config.json").read_text() == (d1 / "final" / "config.json").read_text()


def test_a_model_transformers_cannot_checkpoint_is_refused():
    model = tiny_model("llama", layers=2)
    model.supports_gradient_checkpointing = False
    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):
        with gradient_checkpointing(model, True):
            pass
    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):
        with gradient_checkpointing(torch.nn.Linear(2, 2), True):
            pass


@pytest.mark.parametrize("sharding", ["fsdp2", "zero3"])
def test_sharded_with_checkpointing_equals_one_process_without(ws, tmp_path, sharding):
    """FSDP2 and DeepSpeed ZeRO-3 gather each layer's weights in module hooks, which stay outside the
    recomputation (transformers checkpoints a layer's forward, not its __call__): 2 sharded processes
    with checkpointing train like one unsharded process without it (test_distributed's tolerances:
    the two runs sum the gradients in another order)."""
    from .test_distributed import _assert_same, _grad_norms, _torchrun

    common = [f"model.name_or_path={ws / 'model'}", f"data.train={ws / 'sft.jsonl'}", "data.eval=null",
              "train.micro_batch_size=2", "train.max_steps=3", "train.progress=false", "train.lr=1e-3",
              "data.max_length=128"]
    assert main(["sft", *common, "train.grad_accum=4", f"train.output_dir={tmp_path / 'one'}"]) == 0
    r = _torchrun(["sft", *common, "train.grad_accum=2", f"train.sharding={sharding}",
                   "train.gradient_checkpointing=true", f"train.output_dir={tmp_path / 'two'}"], tmp_path)
    assert "gradient checkpointing: 2 decoder layers" in r.stdout and "sharded: " in r.stdout
    _assert_same(tmp_path / "one", tmp_path / "two")
    assert _grad_norms(tmp_path / "two") == pytest.approx(_grad_norms(tmp_path / "one"), rel=1e-5)


def test_a_run_may_resume_with_checkpointing_switched():
    """Out of memory? Resume with checkpointing on: the setting changes no loss or gradient, so a
    resume may switch it, and checkpoints written before the option existed (no such key) resume."""
    from posttrain.train.checkpoint import config_differences

    saved = {"train": {"lr": 1e-3, "gradient_checkpointing": False}}
    assert config_differences(saved, {"train": {"lr": 1e-3, "gradient_checkpointing": True}}) == []
    assert config_differences({"train": {"lr": 1e-3}}, {"train": {"lr": 1e-3, "gradient_checkpointing": False}}) == []
    assert config_differences(saved, {"train": {"lr": 2e-3, "gradient_checkpointing": True}}) == [
        ("train.lr", 1e-3, 2e-3)]
