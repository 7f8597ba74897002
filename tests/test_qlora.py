"""QLoRA: a 4-bit NF4 base (double quantization) under a LoRA adapter, through bitsandbytes.

Runs where bitsandbytes can quantize and multiply in 4 bits on this machine (its CPU backend
does on x86-64 with torch 2.13); elsewhere every test here is skipped with the reason
(see docs/lora.md)."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import load_config
from posttrain.errors import ConfigError

from .test_rl import _cli
from .tiny import tiny_model, world_tokenizer


def _bnb_problem() -> str | None:
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a backend that fails to initialize
        return f"bitsandbytes is not importable: {type(e).__name__}: {e}"
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        layer = layer.to("cpu")
        with torch.no_grad():
            layer(torch.randn(2, 64))
    except Exception as e:
        return f"bitsandbytes cannot run a 4-bit layer on this CPU: {type(e).__name__}: {e}"
    return None


PROBLEM = _bnb_problem()
needs_4bit = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama-64")
    tiny_model("llama", hidden=64, seed=0).save_pretrained(d)
    world_tokenizer().save_pretrained(d)
    return d


def _load(model_dir, quantize="nf4"):
    from posttrain.models.loading import load_causal_lm

    return load_causal_lm(str(model_dir), quantize=quantize, compute_dtype="float32")


@needs_4bit
def test_nf4_base_is_four_bit_and_close_to_full_precision(model_dir):
    import bitsandbytes as bnb

    q, full = _load(model_dir).eval(), _load(model_dir, "none").eval()
    q_proj = q.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.nested  # double quantization: the absmax constants are quantized too
    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lq, lf = q(input_ids=ids).logits, full(input_ids=ids).logits
    # 4-bit weights change the logits, but by far less than their spread
    err = (lq - lf).abs().mean() / lf.std()
    assert 0 < err < 0.2, err


@needs_4bit
def test_adapter_disabled_reference_equals_the_quantized_base(model_dir):
    from posttrain.config import PeftConfig
    from posttrain.models.peft import AdapterDisabled, apply_peft

    from .test_lora import _logps, _perturb_adapter

    policy = apply_peft(_load(model_dir), PeftConfig(method="lora", r=4, alpha=8, quantize="nf4"))
    _perturb_adapter(policy)
    base = _load(model_dir)
    ids = torch.randint(4, 300, (1, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(_logps(AdapterDisabled(policy), ids), _logps(base.eval(), ids))
        assert not torch.allclose(_logps(policy, ids), _logps(base, ids), atol=1e-3)


@needs_4bit
def test_qlora_sft_resumes_exactly(capsys, model_dir, tmp_path):
    from safetensors.torch import load_file

    common = [f"model.name_or_path={model_dir}", "train.max_steps=4", "train.save_every=2", "train.progress=false",
              "data.train=builtin:world-sft", "data.world_examples=32", "data.eval=null", "train.micro_batch_size=4",
              "model.peft.method=lora", "model.peft.r=4", "model.peft.quantize=nf4", "train.lr=1e-3"]
    assert _cli(capsys, "sft", *common, f"train.output_dir={tmp_path / 'full'}")[0] == 0
    # the same run, cut back to its step-2 checkpoint (as if it had stopped there), then resumed
    assert _cli(capsys, "sft", *common, f"train.output_dir={tmp_path / 'cut'}")[0] == 0
    import shutil

    cut = tmp_path / "cut"
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-000004")
    code, out, err = _cli(capsys, "sft", *common, f"train.output_dir={cut}", "train.resume=auto")
    assert code == 0, err
    assert "resumed from" in out
    a = load_file(str(tmp_path / "full" / "final" / "adapter_model.safetensors"))
    b = load_file(str(cut / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert losses(cut)[3] == losses(tmp_path / "full")[3] and losses(cut)[4] == losses(tmp_path / "full")[4]


def test_qlora_config_errors():
    from posttrain.algorithms.rl import RLConfig
    from posttrain.algorithms.rm import RMConfig
    from posttrain.algorithms.sft import SFTConfig

    with pytest.raises(ConfigError, match="model.peft.method=lora"):
        load_config(SFTConfig, None, ["model.peft.quantize=nf4"])
    with pytest.raises(ConfigError, match="critic"):
        load_config(RLConfig, None, ["algorithm=ppo", "model.peft.method=lora", "model.peft.quantize=nf4"])
    with pytest.raises(ConfigError, match="reward models"):
        load_config(RMConfig, None, ["model.peft.method=lora", "model.peft.quantize=nf4"])


def test_qlora_without_bitsandbytes_is_one_clear_error(monkeypatch):
    """Runs everywhere (no 4-bit kernel needed): the missing package is named with the install command."""
    import importlib.util

    from posttrain.models import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"posttrain\[qlora\]"):
        loading.quantization_config("nf4", "float32")
