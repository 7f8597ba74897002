"""Model merging: hand-computed values for every method, DARE's expectation over seeds, a merge of
two tiny models that loads in transformers with the formula's logits, and bad configs."""

from __future__ import annotations

import math
import re

import pytest
import torch

from posttrain.cli import main
from posttrain.errors import ConfigError
from posttrain.merge import (
    METHODS,
    PARAMS,
    TOP_KEYS,
    linear,
    method_params,
    parse_merge_config,
    run_merge,
    slerp,
    task_merge,
)

from .tiny import tiny_model, world_tokenizer


def test_linear_weights_are_normalized():
    out = linear([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])], [1.0, 3.0])
    assert torch.allclose(out, torch.tensor([2.5, 5.0]))
    raw = linear([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])], [1.0, 3.0], normalize=False)
    assert torch.allclose(raw, torch.tensor([10.0, 20.0]))
    with pytest.raises(ConfigError, match="sum to 0"):
        linear([torch.ones(2), torch.ones(2)], [1.0, -1.0])


def test_slerp_endpoints_midpoint_and_parallel_fallback():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    h = math.sqrt(0.5)
    assert torch.allclose(slerp(a, b, 0.5), torch.tensor([h, h]), atol=1e-6)  # stays on the circle
    assert torch.allclose(slerp(a, b, 1 / 3), torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)
    # nearly parallel: linear interpolation
    assert torch.allclose(slerp(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]), 0.5), torch.tensor([1.5, 1.5]))
    # unequal norms: the original (unnormalized) vectors are interpolated
    out = slerp(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0]), 0.5)
    assert torch.allclose(out, torch.tensor([2 * h, 4 * h]), atol=1e-6)


def test_task_arithmetic_by_hand():
    base = torch.zeros(3)
    out = task_merge(base, [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.0, 1.0])], [1.0, 1.0], [1.0, 1.0],
                     sparsify=None, consensus=False, normalize=False, lam=0.5)
    assert torch.allclose(out, torch.tensor([0.0, 1.0, 2.0]))
    base = torch.tensor([1.0, 1.0, 1.0])  # deltas are taken from the base
    out = task_merge(base, [torch.tensor([2.0, 3.0, 4.0])], [2.0], [1.0], sparsify=None, consensus=False,
                     normalize=False)
    assert torch.allclose(out, torch.tensor([3.0, 5.0, 7.0]))


def test_ties_elects_signs_by_mass_on_a_constructed_conflict():
    base = torch.zeros(4)
    d1, d2 = torch.tensor([3.0, -1.0, 2.0, 0.1]), torch.tensor([-1.0, -2.0, 2.0, 0.2])
    # density 1: mass [2, -3, 4, 0.3] elects [+, -, +, +]; model 2's -1 in entry 0 disagrees and is dropped
    out = task_merge(base, [d1, d2], [1.0, 1.0], [1.0, 1.0], sparsify="magnitude", consensus=True, normalize=True)
    assert torch.allclose(out, torch.tensor([3.0, -1.5, 2.0, 0.15]))
    # density 0.5 keeps each delta's top 2 entries: [3, 0, 2, 0] and [0, -2, 2, 0]
    out = task_merge(base, [d1, d2], [1.0, 1.0], [0.5, 0.5], sparsify="magnitude", consensus=True, normalize=True)
    assert torch.allclose(out, torch.tensor([3.0, -2.0, 2.0, 0.0]))
    # weights move the election: model 2 at weight 4 wins entry 0 (mass 3 - 4 < 0)
    out = task_merge(base, [d1, d2], [1.0, 4.0], [1.0, 1.0], sparsify="magnitude", consensus=True, normalize=True)
    assert float(out[0]) == pytest.approx(-1.0)


def test_dare_rescales_so_the_expectation_is_the_task_vector():
    base, delta = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    outs = torch.stack([task_merge(base, [base + delta], [1.0], [0.25], sparsify="random", consensus=False,
                                   normalize=False, generator_seed=s) for s in range(4000)])
    kept = outs - base
    # every entry is dropped (0) or kept and rescaled by 1 / density
    assert torch.all((kept == 0) | torch.isclose(kept, 4 * delta.expand_as(kept)))
    assert (kept != 0).float().mean() == pytest.approx(0.25, abs=0.02)
    assert torch.allclose(kept.mean(0), delta, rtol=0.08)
    # seeded: the same seed drops the same entries
    a = task_merge(base, [base + delta], [1.0], [0.5], sparsify="random", consensus=False, normalize=False,
                   generator_seed=7)
    b = task_merge(base, [base + delta], [1.0], [0.5], sparsify="random", consensus=False, normalize=False,
                   generator_seed=7)
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    dirs = []
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"m{seed}")
        tiny_model("llama", seed=seed, hidden=32).save_pretrained(d)
        world_tokenizer().save_pretrained(d)
        dirs.append(d)
    return dirs


def test_a_merge_of_two_models_loads_and_gives_the_formula_logits(two_models, tmp_path):
    from transformers import AutoModelForCausalLM

    a_dir, b_dir = two_models
    cfg = parse_merge_config({"merge_method": "linear", "models": [
        {"model": str(a_dir), "parameters": {"weight": 0.3}}, {"model": str(b_dir), "parameters": {"weight": 0.7}}]})
    out = run_merge(cfg, tmp_path / "merged", log=lambda s: None)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    a = AutoModelForCausalLM.from_pretrained(a_dir)
    b = AutoModelForCausalLM.from_pretrained(b_dir)
    want = tiny_model("llama", seed=5, hidden=32).eval()
    sa, sb = a.state_dict(), b.state_dict()
    want.load_state_dict({k: 0.3 * sa[k] + 0.7 * sb[k] for k in sa})
    ids = torch.randint(4, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, want(input_ids=ids).logits, atol=1e-5)
    assert (out / "tokenizer.json").is_file() and (out / "merge_config.json").is_file()


def test_merge_from_the_command_line_with_mergekit_yaml(two_models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    a_dir, b_dir = two_models
    for method, extra in (("ties", "  - model: {b}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                                   "parameters: {{normalize: true, int8_mask: true}}\n"),
                          ("dare_ties", "  - model: {b}\n    parameters: {{weight: 1.0, density: 0.5}}\n"),
                          ("slerp", "  - model: {b}\nparameters: {{t: 0.5}}\n"),
                          ("task_arithmetic", "  - model: {b}\n    parameters: {{weight: 0.5}}\n"
                                              "parameters: {{lambda: 0.8}}\n")):
        yml = tmp_path / f"{method}.yaml"
        yml.write_text(f"merge_method: {method}\nbase_model: {a_dir}\nmodels:\n  - model: {a_dir}\n"
                       + extra.format(b=b_dir) + "dtype: float32\nseed: 3\n")
        assert main(["merge", str(yml), str(tmp_path / method)]) == 0, capsys.readouterr().err
        model = AutoModelForCausalLM.from_pretrained(tmp_path / method)
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("yaml_text, fragments", [
    ("merge_method: frankenmerge\nmodels: [{model: A}, {model: B}]\n", ["merge_method", "linear"]),
    ("merge_method: linear\nslices: []\nmodels: [{model: A}, {model: B}]\n", ["slices", "not supported"]),
    ("merge_method: ties\nbase_model: A\nmodels: [{model: B, parameters: {density: 1.5}}]\n",
     ["models[0].parameters.density", "(0, 1]"]),
    ("merge_method: ties\nmodels: [{model: B}]\n", ["needs base_model"]),
    ("merge_method: slerp\nbase_model: A\nmodels: [{model: A}, {model: B}]\n", ["parameters.t"]),
    ("merge_method: linear\nmodels: [{model: A, parameters: {weight: [0, 1]}}, {model: B}]\n",
     ["models[0].parameters.weight", "single number"]),
    ("merge_method: linear\nmodels: [{model: A}, {model: B}]\nparameters: {filter_wise: true}\n",
     ["parameters.filter_wise"]),
    # an unknown parameter is refused, naming the ones the method reads
    ("merge_method: ties\nbase_model: A\nmodels: [{model: B}]\nparameters: {tee: 0.5}\n",
     ["parameters.tee is not supported", "weight, density, normalize, lambda"]),
])
def test_bad_merge_configs_are_refused_by_name(yaml_text, fragments, tmp_path, capsys):
    yml = tmp_path / "m.yaml"
    yml.write_text(yaml_text)
    assert main(["merge", str(yml), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    for f in fragments:
        assert f in err, (f, err)
    assert not (tmp_path / "out").exists()


def test_models_of_different_shapes_or_kinds_are_refused(two_models, tmp_path, capsys):
    a_dir, _ = two_models
    wide = tmp_path / "wide"
    tiny_model("llama", seed=0, hidden=48).save_pretrained(wide)
    cfg = parse_merge_config({"merge_method": "linear", "models": [{"model": str(a_dir)}, {"model": str(wide)}]})
    with pytest.raises(ConfigError, match=r"tensor 'model\.embed_tokens\.weight' has shape \[\d+, 32\]"):
        run_merge(cfg, tmp_path / "out", log=lambda s: None)
    qwen = tmp_path / "qwen"
    tiny_model("qwen2", seed=0, hidden=32).save_pretrained(qwen)
    cfg = parse_merge_config({"merge_method": "linear", "models": [{"model": str(a_dir)}, {"model": str(qwen)}]})
    with pytest.raises(ConfigError, match="one architecture"):
        run_merge(cfg, tmp_path / "out", log=lambda s: None)
    cfg = parse_merge_config({"merge_method": "linear", "models": [{"model": str(a_dir)},
                                                                   {"model": str(tmp_path / "nope")}]})
    with pytest.raises(ConfigError, match="nope"):
        run_merge(cfg, tmp_path / "out", log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_merge_help_lists_every_method_and_the_keys_each_accepts(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out

    def entry(name: str) -> str:  # a name's row in the help, with its continuation lines
        found = re.search(rf"^  {name}  .*?(?=^  \S|^\S|\Z)", out, re.M | re.S)
        assert found, f"{name} is not in posttrain merge --help"
        return found.group(0)

    for key in [*TOP_KEYS, *PARAMS]:
        entry(key)

    def config(method: str, key: str, value) -> dict:  # a valid config but for parameters.key
        models = [{"model": "B"}] if method == "slerp" else [{"model": "B"}, {"model": "C"}]
        parameters = {"t": 0.5} if method == "slerp" else {}
        return {"merge_method": method, "base_model": "A", "models": models, "parameters": {**parameters, key: value}}

    for method in METHODS:
        reads = entry(method).split("parameters:")[1]
        for key in method_params(method):
            assert key in PARAMS  # so its meaning is listed
            # each parameter the parser takes is listed with the method (int8_mask: with every method, in PARAMS)
            assert re.search(rf"\b{key}\b", reads) or key == "int8_mask", (method, key)
            parse_merge_config(config(method, key, {"rescale": True, "normalize": True}.get(key, 0.5)))
        for key in set(PARAMS) - set(method_params(method)):  # the others are accepted (as mergekit) and reported
            value = {"rescale": True, "normalize": True}.get(key, 0.5)
            assert parse_merge_config(config(method, key, value)).ignored == [f"parameters.{key}"]


def _linear_yaml(tmp_path, two_models):
    a_dir, b_dir = two_models
    yml = tmp_path / "m.yaml"
    yml.write_text(f"merge_method: linear\nmodels:\n  - model: {a_dir}\n  - model: {b_dir}\n")
    return yml


@pytest.mark.parametrize("overwrite", [False, True])
def test_merge_onto_a_file_is_refused_before_any_model_is_read(two_models, tmp_path, capsys, monkeypatch, overwrite):
    yml = _linear_yaml(tmp_path, two_models)
    target = tmp_path / "merged.bin"
    target.write_text("a file")

    def no_reading(*a, **k):
        raise AssertionError("the output must be checked before the models are read")

    monkeypatch.setattr("posttrain.merge._Weights", no_reading)
    assert main(["merge", str(yml), str(target), *(["--overwrite"] if overwrite else [])]) == 2
    err = capsys.readouterr().err
    assert "Argument 'output'" in err and "is a file" in err and "--overwrite only replaces a directory" in err
    assert "NotADirectoryError" not in err and "train." not in err
    assert target.read_text() == "a file" and not (tmp_path / "merged.bin.partial").exists()


def test_merge_output_messages_name_the_merge_commands_own_arguments(two_models, tmp_path, capsys):
    yml = _linear_yaml(tmp_path, two_models)
    full = tmp_path / "full"
    (full / "old").mkdir(parents=True)
    assert main(["merge", str(yml), str(full)]) == 2
    err = capsys.readouterr().err
    assert "Argument 'output'" in err and "add --overwrite" in err and "train." not in err
    # --overwrite may not delete a directory holding a model the merge reads
    import shutil

    holder = tmp_path / "models"
    copies = [shutil.copytree(d, holder / d.name) for d in two_models]
    own = _linear_yaml(tmp_path / "models", copies)
    assert main(["merge", str(own), str(holder), "--overwrite"]) == 2
    assert "models[0]" in capsys.readouterr().err and (copies[0] / "config.json").is_file()
    assert main(["merge", str(yml), str(full), "--overwrite"]) == 0
    assert (full / "model.safetensors").is_file() and not (full / "old").exists()


@pytest.mark.parametrize("failure", ["disk_full", "ctrl_c", "bug"])
def test_a_merge_that_fails_mid_write_leaves_no_partial_directory(two_models, tmp_path, capsys, monkeypatch,
                                                                  failure):
    import errno
    import os

    import safetensors.torch

    yml = _linear_yaml(tmp_path, two_models)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("the earlier merge")  # replaced only when the new one is complete
    original = safetensors.torch.save_file

    def failing(tensors, filename, *a, **k):  # the shard is half written, then the failure
        original(tensors, filename, *a, **k)
        raise {"disk_full": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "ctrl_c": KeyboardInterrupt(),
               "bug": RuntimeError("boom")}[failure]

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    if failure == "bug":
        with pytest.raises(RuntimeError, match="boom"):
            main(["merge", str(yml), str(out), "--overwrite"])
    else:
        code = main(["merge", str(yml), str(out), "--overwrite"])
        err = capsys.readouterr().err
        if failure == "disk_full":
            assert code == 2 and "Could not write the merged model" in err and os.strerror(errno.ENOSPC) in err
            assert "the output argument" in err and "train." not in err
        else:
            assert code == 130
    assert not (tmp_path / "merged.partial").exists()
    assert (out / "keep.txt").read_text() == "the earlier merge"


def test_merge_yaml_errors_give_file_line_and_column(tmp_path, capsys):
    yml = tmp_path / "m.yaml"
    yml.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1\n  - model: b\n")
    assert main(["merge", str(yml), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(yml))}:5:\d+: ", err), err
    yml.write_text("merge_method: linear\nmodels: []\nmerge_method: ties\n")  # a repeated key
    assert main(["merge", str(yml), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{yml}:3:1: the key 'merge_method' appears twice" in err, err
