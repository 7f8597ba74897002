"""LoRA adapters away from where they were trained, and ``posttrain export``'s output (issue 22):
the base model is recorded by a path that resolves from any working directory; a base that moved,
or one of another size, gives one short error naming export's own --base; an --output that is a
file is refused before the merge; a failed write leaves no ``*.partial`` directory."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from posttrain.cli import main
from posttrain.config import PeftConfig, load_config
from posttrain.errors import CheckpointError
from posttrain.models.loading import load_causal_lm, merge_adapter_dir, portable_base
from posttrain.models.peft import apply_peft

from .tiny import tiny_model, world_tokenizer

LORA = PeftConfig(method="lora", r=4, alpha=8)


def _base(directory, hidden=32):
    tiny_model("llama", seed=0, hidden=hidden).save_pretrained(directory)
    world_tokenizer().save_pretrained(directory)
    return directory


def _adapter(directory, base):
    """A LoRA adapter on ``base`` saved as a run saves it (adapter_config.json + safetensors + tokenizer)."""
    model = apply_peft(load_causal_lm(str(base), device="cpu"), LORA)
    with torch.no_grad():  # a non-zero B, so the adapter changes the outputs
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(directory)
    world_tokenizer().save_pretrained(directory)
    return directory


def _recorded_base(adapter_dir):
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def _logits(model, seed=0):
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_a_lora_run_from_a_relative_base_exports_from_another_directory(tmp_path, monkeypatch, capsys):
    from posttrain.algorithms.sft import SFTConfig, run_sft

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    _base(work / "base")
    monkeypatch.chdir(work)
    cfg = load_config(SFTConfig, None, [
        "model.name_or_path=base", "train.output_dir=run", "data.train=builtin:world-sft", "data.world_examples=16",
        "data.eval=null", "train.max_steps=2", "train.save_every=1", "train.micro_batch_size=4", "train.lr=1e-2",
        "train.progress=false", "model.peft.method=lora", "model.peft.r=4", "model.peft.alpha=8"])
    res = run_sft(cfg, log=lambda s: None)
    final = work / res.final_dir
    # the base is recorded as an absolute path, in final/ and in every checkpoint
    assert _recorded_base(final) == str(work / "base")
    assert _recorded_base(work / "run" / "checkpoints" / "step-000001" / "model") == str(work / "base")

    monkeypatch.chdir(elsewhere)
    assert main(["export", str(final), "--output", "merged"]) == 0, capsys.readouterr().err
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(elsewhere / "merged")
    want = merge_adapter_dir(final, base=str(work / "base"))
    assert torch.allclose(_logits(merged), _logits(want), atol=1e-5)
    assert not torch.allclose(_logits(merged), _logits(load_causal_lm(str(work / "base"))), atol=1e-4)  # trained
    # a run can also start from the adapter from here: it loads merged
    assert torch.allclose(_logits(load_causal_lm(str(final))), _logits(want), atol=1e-5)


def test_the_recorded_base_keeps_builtin_names_and_hub_ids(tmp_path, monkeypatch):
    builtin = apply_peft(load_causal_lm("builtin:tiny-world-base", device="cpu"), LORA)
    assert builtin.peft_config["default"].base_model_name_or_path == "builtin:tiny-world-base"
    assert portable_base("builtin:tiny-world-base") == "builtin:tiny-world-base"
    assert portable_base("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # no such local directory: a hub id
    assert portable_base(None) is None and portable_base("") == ""
    (tmp_path / "models" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "models")
    assert portable_base("b") == str(tmp_path / "models" / "b")
    assert portable_base("./b/../b") == str(tmp_path / "models" / "b")


def test_a_moved_base_says_so_and_names_exports_own_option(tmp_path, capsys):
    base = _base(tmp_path / "base")
    adapter = _adapter(tmp_path / "adapter", base)
    assert _recorded_base(adapter) == str(base)
    moved = tmp_path / "models" / "base"
    moved.parent.mkdir()
    base.rename(moved)

    assert main(["export", str(adapter), "--output", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert f"names its base model '{base}'" in err and "moved or deleted" in err
    assert "--base <base model directory>" in err and "model.name_or_path" not in err
    assert "Option '--base'" not in err  # the user did not pass --base
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()
    # the fix works
    assert main(["export", str(adapter), "--base", str(moved), "--output", str(tmp_path / "merged")]) == 0
    # a run started from the adapter is told to export first (runs have no --base)
    with pytest.raises(CheckpointError, match="moved or deleted") as info:
        load_causal_lm(str(adapter), device="cpu")
    assert "set model.name_or_path to the merged directory" in str(info.value)


def test_an_old_relative_base_from_another_directory_is_explained(tmp_path, monkeypatch, capsys):
    base = _base(tmp_path / "base")
    adapter = _adapter(tmp_path / "adapter", base)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "base"  # as posttrain wrote it before: the path as typed
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["export", str(adapter), "--output", "merged"]) == 2
    err = capsys.readouterr().err
    assert "relative path is read from the working directory" in err and str(tmp_path / "elsewhere") in err
    assert "--base" in err and "model.name_or_path" not in err
    monkeypatch.chdir(tmp_path)  # from the directory it was trained in it still works
    assert main(["export", str(adapter), "--output", "merged"]) == 0


def test_a_base_of_another_size_is_one_short_summary(tmp_path, capsys):
    adapter = _adapter(tmp_path / "adapter", _base(tmp_path / "base"))
    wide = _base(tmp_path / "wide", hidden=48)
    assert main(["export", str(adapter), "--base", str(wide), "--output", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    n_lora = sum(1 for line in err.splitlines() if "size mismatch" in line)
    assert n_lora == 0 and len(err) < 1500, err  # not one line per tensor (peft's message is ~6 KB here)
    n_tensors = 2 * 2 * 7  # lora_A and lora_B of 7 linear layers in each of 2 decoder layers
    assert f"{n_tensors} of its tensors have other shapes" in err
    assert "[4, 32] in the adapter, [4, 48] in the base model" in err and f"and {n_tensors - 3} more" in err
    assert "trained on another base model" in err and "--base" in err
    assert not (tmp_path / "merged").exists()


def test_a_run_from_an_adapter_records_that_adapter_as_the_next_adapters_base(tmp_path, capsys):
    from peft import PeftModel

    adapter = _adapter(tmp_path / "adapter", _base(tmp_path / "base"))
    second = apply_peft(load_causal_lm(str(adapter), device="cpu"), LORA)
    # the model it trains on is base + first adapter: exporting the second adapter must merge both
    assert second.peft_config["default"].base_model_name_or_path == str(adapter)
    second_dir = _adapter(tmp_path / "second", adapter)
    assert main(["export", str(second_dir), "--output", str(tmp_path / "merged")]) == 0, capsys.readouterr().err
    from transformers import AutoModelForCausalLM

    both = PeftModel.from_pretrained(load_causal_lm(str(adapter), device="cpu"), str(second_dir))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(_logits(merged), _logits(both), atol=1e-5)
    assert not torch.allclose(_logits(merged), _logits(load_causal_lm(str(adapter))), atol=1e-4)


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_onto_a_file_is_refused_before_the_merge(tmp_path, capsys, monkeypatch, overwrite):
    adapter = _adapter(tmp_path / "adapter", _base(tmp_path / "base"))
    target = tmp_path / "merged.bin"
    target.write_text("not a directory")

    def no_merge(*a, **k):
        raise AssertionError("the output must be checked before the merge")

    monkeypatch.setattr("posttrain.models.loading.merge_adapter_dir", no_merge)
    assert main(["export", str(adapter), "--output", str(target), *(["--overwrite"] if overwrite else [])]) == 2
    err = capsys.readouterr().err
    assert "Option '--output'" in err and "is a file" in err and "--overwrite only replaces a directory" in err
    assert "train." not in err and "Traceback" not in err
    assert target.read_text() == "not a directory"
    assert not (tmp_path / "merged.bin.partial").exists()


def test_export_messages_name_exports_options(tmp_path, capsys):
    adapter = _adapter(tmp_path / "adapter", _base(tmp_path / "base"))
    full = tmp_path / "full"
    (full / "x").mkdir(parents=True)
    assert main(["export", str(adapter), "--output", str(full)]) == 2
    err = capsys.readouterr().err
    assert "Option '--output'" in err and "add --overwrite" in err and "train." not in err
    # --overwrite may not delete the directory that holds the adapter
    assert main(["export", str(adapter), "--output", str(tmp_path), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "holds the adapter" in err and (adapter / "adapter_config.json").is_file()
    assert main(["export", str(adapter), "--output", str(full), "--overwrite"]) == 0
    assert (full / "config.json").is_file() and not (full / "x").exists()


@pytest.mark.parametrize("failure", ["disk_full", "ctrl_c"])
def test_a_failed_export_write_leaves_no_partial_directory(tmp_path, capsys, monkeypatch, failure):
    from transformers import PreTrainedModel

    adapter = _adapter(tmp_path / "adapter", _base(tmp_path / "base"))
    original = PreTrainedModel.save_pretrained

    def failing(self, directory, *a, **k):  # half the files written, then the failure
        original(self, directory, *a, **k)
        if failure == "ctrl_c":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing)
    out = tmp_path / "merged"
    code = main(["export", str(adapter), "--output", str(out)])
    err = capsys.readouterr().err
    if failure == "ctrl_c":
        assert code == 130 and "interrupted" in err
    else:
        assert code == 2
        assert "Could not write" in err and os.strerror(errno.ENOSPC) in err and "--output" in err
        assert "train.output_dir" not in err and "train.resume" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no merged.partial
