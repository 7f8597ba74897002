"""Loading never runs foreign code: no pickle (checkpoints, weights), no repository code, no prompt.

Every payload below would create a marker file if it ever ran; the tests assert that it was
refused (or ignored) and that the marker does not exist.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from posttrain.algorithms.sft import SFTAlgorithm, SFTPlan
from posttrain.cli import main
from posttrain.config import TrainConfig
from posttrain.errors import CheckpointError, ConfigError, TokenizerError
from posttrain.models import loading
from posttrain.models.loading import load_causal_lm, load_sequence_classifier, load_tokenizer, locate
from posttrain.train.engine import fit
from posttrain.train.safestate import StateFormatError, load_state, save_state

from .tiny import sft_examples, tiny_model, world_tokenizer

SRC = Path(__file__).resolve().parent.parent / "src" / "posttrain"


class _Payload:
    """Unpickling this creates ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture()
def no_prompt(monkeypatch):
    """Fail the test if anything asks on stdin (transformers' trust_remote_code [y/N] prompt)."""
    def refuse(*a, **k):
        raise AssertionError("something prompted on stdin")
    monkeypatch.setattr(builtins, "input", refuse)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama", hidden=32).save_pretrained(d)
    world_tokenizer().save_pretrained(d)
    return d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- static guard


def test_no_pickle_loading_or_remote_code_in_the_source():
    """No torch.load / pickle / unsafe YAML / eval / trust_remote_code=True anywhere in the package or the
    benchmarks, every from_pretrained call lives in models/loading.py (which passes trust_remote_code=False),
    and the one import of a module named by a config is the reward registry's (a user's own reward function)."""
    unpickling = ("torch.load", "torch.serialization.load", "pickle.load", "pickle.loads", "pickle.Unpickler",
                  "np.load", "numpy.load", "marshal.load", "marshal.loads", "yaml.unsafe_load", "yaml.full_load",
                  "yaml.unsafe_load_all", "eval", "exec")
    offenders = []
    for path in [*SRC.rglob("*.py"), *(SRC.parent.parent / "benchmarks").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in unpickling:
                    offenders.append(f"{path.name}: {name}")
                if name.endswith("from_pretrained") and path.name != "loading.py":
                    offenders.append(f"{path.name}: {name}")
                loaders = [ast.unparse(kw.value) for kw in node.keywords if kw.arg == "Loader"]
                safe = any("Safe" in v or v == "_YAML12Loader" for v in loaders)
                if name in ("yaml.load", "yaml.load_all") and not safe:
                    offenders.append(f"{path.name}: {name} without a safe loader")
                if name in ("importlib.import_module", "__import__") and path.name != "registry.py":
                    offenders.append(f"{path.name}: {name}")
                for kw in node.keywords:
                    if kw.arg == "trust_remote_code" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                        offenders.append(f"{path.name}: trust_remote_code={ast.unparse(kw.value)}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"} & set(names):
                    offenders.append(f"{path.name}: imports {names}")
    assert not offenders, offenders
    assert "trust_remote_code\": False" in (SRC / "models" / "loading.py").read_text()
    assert issubclass(__import__("posttrain.config", fromlist=["_YAML12Loader"])._YAML12Loader,
                      __import__("yaml").SafeLoader)


def test_world_build_from_pretrained_calls_are_safe():
    """The world builder loads only files it wrote itself; still, no remote code there either."""
    for path in (SRC / "world").rglob("*.py"):
        assert "trust_remote_code=True" not in path.read_text()


# --------------------------------------------------------------------------- checkpoints


def _plan(n=8):
    return SFTPlan(sft_examples(n, seed=6), micro_batch_size=4, grad_accum=1, epochs=1.0, max_steps=2, packing=False,
                   row_length=128, pad_token_id=world_tokenizer().pad_token_id, seed=0)


def _cfg(out, **kw):
    return TrainConfig(output_dir=str(out), lr=1e-3, warmup_ratio=0.0, progress=False, **kw)


def test_checkpoint_state_is_json_and_safetensors_only(tmp_path):
    fit(tiny_model("llama"), SFTAlgorithm(), _plan(), _cfg(tmp_path, save_every=1), tokenizer=world_tokenizer(),
        log=lambda s: None)
    ck = tmp_path / "checkpoints" / "step-000001"
    names = sorted(p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file())
    assert "trainer_state.json" in names and "trainer_state.safetensors" in names
    assert not [n for n in names if n.endswith((".pt", ".bin", ".pkl", ".pth"))], names
    meta = json.loads((ck / "checkpoint.json").read_text())
    assert set(meta["files"]) == set(names) - {"checkpoint.json"}


def test_poisoned_legacy_pickle_state_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    fit(tiny_model("llama"), SFTAlgorithm(), _plan(), _cfg(tmp_path / "run", save_every=1),
        tokenizer=world_tokenizer(), log=lambda s: None)
    ck = tmp_path / "run" / "checkpoints" / "step-000001"
    # turn it into a checkpoint of the old layout: pickled trainer_state.pt, no manifest
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (ck / name).unlink()
    with open(ck / "trainer_state.pt", "wb") as fh:
        pickle.dump({"optimizer": _Payload(marker)}, fh)
    meta = json.loads((ck / "checkpoint.json").read_text())
    meta.pop("files")
    (ck / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="pickle") as e:
        fit(tiny_model("llama"), SFTAlgorithm(), _plan(), _cfg(tmp_path / "run", resume=str(ck)),
            tokenizer=world_tokenizer(), log=lambda s: None)
    assert "model.name_or_path=" in str(e.value)
    assert not marker.exists()


def test_planted_pickle_next_to_a_checkpoint_is_never_loaded(tmp_path):
    marker = tmp_path / "PWNED"
    fit(tiny_model("llama"), SFTAlgorithm(), _plan(), _cfg(tmp_path / "run", save_every=1),
        tokenizer=world_tokenizer(), log=lambda s: None)
    ck = tmp_path / "run" / "checkpoints" / "step-000001"
    with open(ck / "trainer_state.pt", "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    with open(ck / "model" / "pytorch_model.bin", "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    res = fit(tiny_model("llama"), SFTAlgorithm(), _plan(), _cfg(tmp_path / "run", resume=str(ck)),
              tokenizer=world_tokenizer(), log=lambda s: None)
    assert [h["step"] for h in res.history] == [2]
    assert not marker.exists()


def test_safestate_round_trip_is_exact(tmp_path):
    import random

    import numpy as np

    model = tiny_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "nan": float("nan"), "nested": {3: (1, "a", None)}}
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert back["python"] == state["python"]
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][1].dtype == state["numpy"][1].dtype and back["numpy"][2:] == state["numpy"][2:]
    assert torch.equal(back["torch"], state["torch"])
    assert back["nested"] == {3: (1, "a", None)} and back["nan"] != back["nan"]
    o1, o2 = state["optimizer"], back["optimizer"]
    assert o1["param_groups"] == o2["param_groups"] and set(o1["state"]) == set(o2["state"])
    for k in o1["state"]:
        for name, v in o1["state"][k].items():
            assert torch.equal(v, o2["state"][k][name]) and v.dtype == o2["state"][k][name].dtype
    # the restored RNG streams continue identically
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
    a = (random.random(), np.random.rand())
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    assert a == (random.random(), np.random.rand())


def test_safestate_rejects_damaged_files(tmp_path):
    save_state({"x": torch.ones(3)}, tmp_path, "s")
    (tmp_path / "s.json").write_text('{"x": {"__tensor__": "t9"}}')
    with pytest.raises(StateFormatError, match="t9"):
        load_state(tmp_path, "s")
    (tmp_path / "s.json").write_text('{"x": ')
    with pytest.raises(StateFormatError, match="not valid JSON"):
        load_state(tmp_path, "s")
    save_state({"x": torch.ones(3)}, tmp_path, "s")
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "s.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(StateFormatError, match="safetensors"):
        load_state(tmp_path, "s")


# --------------------------------------------------------------------------- model directories


def _custom_code_dir(model_dir: Path, dst: Path, marker: Path, *, model_type: str = "llama") -> Path:
    d = _copy(model_dir, dst)
    _edit_json(d / "config.json", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilLM",
                                            "AutoModelForSequenceClassification": "evil.EvilLM"},
               model_type=model_type)
    (d / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    return d


def test_custom_code_of_a_known_architecture_is_ignored(model_dir, tmp_path, no_prompt, capsys):
    marker = tmp_path / "PWNED"
    d = _custom_code_dir(model_dir, tmp_path / "m", marker)
    model = load_causal_lm(str(d), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert "never runs it" in capsys.readouterr().out
    load_sequence_classifier(str(d), device="cpu")
    assert not marker.exists()


def test_custom_code_of_an_unknown_architecture_is_refused(model_dir, tmp_path, no_prompt):
    marker = tmp_path / "PWNED"
    d = _custom_code_dir(model_dir, tmp_path / "m", marker, model_type="evil_arch")
    for load in (load_causal_lm, load_sequence_classifier):
        with pytest.raises(CheckpointError, match="never runs code") as e:
            load(str(d), device="cpu")
        assert "auto_map" in str(e.value) and "evil_arch" in str(e.value)
    assert not marker.exists()


def test_custom_tokenizer_code_is_refused(model_dir, tmp_path, no_prompt):
    marker = tmp_path / "PWNED"
    d = _copy(model_dir, tmp_path / "t")
    (d / "tokenizer.json").unlink()
    _edit_json(d / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.EvilTok", None]},
               tokenizer_class="EvilTokenizer")
    (d / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    with pytest.raises(TokenizerError, match="never runs code"):
        load_tokenizer(str(d))
    assert not marker.exists()


def test_custom_code_from_the_cli_ends_cleanly(model_dir, tmp_path, no_prompt, capsys):
    """The reward model and DPO reference loaders refuse it too; exit 2, no traceback."""
    marker = tmp_path / "PWNED"
    d = _custom_code_dir(model_dir, tmp_path / "m", marker, model_type="evil_arch")
    for argv in (["rm", f"model.name_or_path={d}", f"model.tokenizer={model_dir}"],
                 ["dpo", f"model.name_or_path={model_dir}", f"loss.reference={d}"],
                 ["eval", f"model.name_or_path={d}", f"model.tokenizer={model_dir}"]):
        out = tmp_path / f"run-{argv[0]}"
        extra = [f"train.output_dir={out}", "train.max_steps=1"] if argv[0] != "eval" else []
        extra.append("data.world_examples=4")
        code = main(argv + extra)
        err = capsys.readouterr().err
        assert code == 2 and "never runs code" in err, (argv, err)
    assert not marker.exists()


def test_pickle_only_weights_are_refused_with_a_conversion_recipe(model_dir, tmp_path):
    marker = tmp_path / "PWNED"
    d = _copy(model_dir, tmp_path / "p")
    (d / "model.safetensors").unlink()
    with open(d / "pytorch_model.bin", "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    for load in (load_causal_lm, load_sequence_classifier):
        with pytest.raises(CheckpointError) as e:
            load(str(d), device="cpu")
        msg = str(e.value)
        assert "pytorch_model.bin" in msg and "safetensors" in msg and "save_pretrained" in msg
    assert not marker.exists()


def test_a_directory_with_both_formats_loads_the_safetensors(model_dir, tmp_path):
    marker = tmp_path / "PWNED"
    d = _copy(model_dir, tmp_path / "both")
    with open(d / "pytorch_model.bin", "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    model = load_causal_lm(str(d), device="cpu")
    ref = load_causal_lm(str(model_dir), device="cpu")
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert not marker.exists()


def test_a_weights_index_that_lists_pickle_shards_is_refused(model_dir, tmp_path):
    """model.safetensors.index.json naming a .bin shard: transformers would unpickle it (weights_only, or a
    traceback advising weights_only=False for a malicious one) although the directory "has" safetensors."""
    from safetensors.torch import load_file

    marker = tmp_path / "PWNED"
    tensors = load_file(str(model_dir / "model.safetensors"))
    for name, poisoned in (("plain", False), ("poisoned", True)):
        d = _copy(model_dir, tmp_path / name)
        (d / "model.safetensors").unlink()
        shard = d / "pytorch_model-00001-of-00001.bin"
        if poisoned:
            with open(shard, "wb") as fh:
                pickle.dump(_Payload(marker), fh)
        else:
            torch.save(tensors, shard)
        index = {"metadata": {}, "weight_map": {k: shard.name for k in tensors}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        for load in (load_causal_lm, load_sequence_classifier):
            with pytest.raises(CheckpointError, match="not safetensors files") as e:
                load(str(d), device="cpu")
            assert shard.name in str(e.value) and "weights_only" not in str(e.value)
    d = _copy(model_dir, tmp_path / "outside")
    index = {"metadata": {}, "weight_map": {k: "../x.safetensors" for k in tensors}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="inside the directory"):
        load_causal_lm(str(d), device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("value", ["kernels-community/evil-attn", "eager"])
def test_config_json_cannot_choose_the_attention_or_a_hub_kernel(model_dir, tmp_path, value):
    """transformers lets config.json's _attn_implementation override the caller's attn_implementation; a
    hub kernel named there would be downloaded and run (with the `kernels` package installed)."""
    from transformers.integrations import hub_kernels

    d = _copy(model_dir, tmp_path / "m")
    _edit_json(d / "config.json", _attn_implementation=value)
    fetched = []
    real = hub_kernels.load_and_register_attn_kernel
    hub_kernels.load_and_register_attn_kernel = lambda *a, **k: fetched.append(a)
    try:
        for load in (load_causal_lm, load_sequence_classifier):
            assert load(str(d), device="cpu").config._attn_implementation == "sdpa"
        assert load_causal_lm(str(d), device="cpu", attn_implementation="eager").config._attn_implementation == "eager"
    finally:
        hub_kernels.load_and_register_attn_kernel = real
    assert not fetched


def test_chat_templates_are_rendered_in_a_sandbox(model_dir, tmp_path):
    """A model directory's chat template cannot reach Python: transformers renders it in Jinja2's
    sandbox (an escape attempt is a clear error), and a Jinja2 with known sandbox escapes is refused."""
    from posttrain.data.chat import render_prompt

    marker = tmp_path / "PWNED"
    d = _copy(model_dir, tmp_path / "t")
    (d / "chat_template.jinja").write_text(
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}{{ messages[0]['content'] }}")
    tok = load_tokenizer(str(d))
    with pytest.raises(TokenizerError, match="SecurityError"):
        render_prompt(tok, [{"role": "user", "content": "q"}])
    assert not marker.exists()
    old = loading._jinja_version
    try:
        loading._jinja_version = lambda: "3.1.4"
        with pytest.raises(ConfigError, match="3.1.6"):
            load_tokenizer(str(model_dir))
        with pytest.raises(ConfigError, match="3.1.6"):
            load_tokenizer(str(model_dir), chat_template="{{ messages }}")
    finally:
        loading._jinja_version = old


@pytest.mark.parametrize("damage, fragment", [
    ("config", "not valid JSON"),
    ("no_config", "no config.json"),
    ("no_weights", "no weights"),
    ("truncated_weights", "Could not load"),
])
def test_broken_model_directories_are_named(model_dir, tmp_path, damage, fragment):
    d = _copy(model_dir, tmp_path / damage)
    if damage == "config":
        (d / "config.json").write_text('{"model_type": "llama", ')
    elif damage == "no_config":
        (d / "config.json").unlink()
    elif damage == "no_weights":
        (d / "model.safetensors").unlink()
    else:
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=fragment) as e:
        load_causal_lm(str(d), device="cpu")
    assert str(d.name) in str(e.value)


# --------------------------------------------------------------------------- names that are not directories


def test_missing_paths_and_hub_ids_fail_fast_offline(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a checkout where `make quickstart` ran has runs/quickstart/sft/final
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ConfigError, match="no such directory 'runs/quickstart/sft/final'") as e:
        locate("runs/quickstart/sft/final")
    assert "make quickstart" in str(e.value)
    with pytest.raises(ConfigError, match="no such directory"):
        locate(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="cannot be reached") as e:
        locate("some-org/some-model")
    assert "hf download some-org/some-model" in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        locate("some-org/some-model")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        locate(str(f))


def test_a_missing_path_under_a_local_folder_is_not_fetched_from_the_hub(monkeypatch, tmp_path):
    """'runs/sft' mistyped while ./runs exists must not download the hub repo of a user called 'runs' (a
    stranger's model, trained on silently) even when the hub is reachable."""
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match="no such directory 'runs/sft'") as e:
        locate("runs/sft")
    assert "hf download runs/sft --local-dir runs/sft" in str(e.value)
    assert not locate("some-org/some-model").local  # no such local folder: still a hub id


def test_hub_probe_is_quick_when_the_hub_is_unreachable():
    import time

    t = time.time()
    assert loading.hub_reachable("http://127.0.0.1:9/", timeout=2.0) is False  # the discard port: refused
    assert time.time() - t < 3.0


def test_cli_hub_id_without_network_ends_in_seconds(monkeypatch, capsys, tmp_path):
    import time

    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: False)
    t = time.time()
    code = main(["sft", "model.name_or_path=Qwen/Qwen2.5-0.5B", f"train.output_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be reached" in err and "Traceback" not in err
    assert time.time() - t < 10


def test_builtin_model_still_loads():
    src = locate("builtin:tiny-world-base")
    assert src.local and Path(src.path, "model.safetensors").is_file()
    assert os.path.isdir(src.path)


def test_generation_config_of_a_model_directory_does_not_change_decoding(tmp_path):
    """A directory's generation_config.json (beams, penalties, strategies that need repository
    code) never changes posttrain's greedy decoding, and never makes it fail."""
    import json as _json

    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.rollout.hf import generate

    from .tiny import tiny_model, world_tokenizer

    clean = tmp_path / "clean"
    tiny_model("llama", hidden=32).save_pretrained(clean)
    world_tokenizer().save_pretrained(clean)
    tok = load_tokenizer(str(clean))
    prompts = [tok("Mia has 3 apples.")["input_ids"], tok("Tom has 12 cards and")["input_ids"]]
    want = [g.completion_ids for g in generate(load_causal_lm(str(clean)), tok, prompts, max_new_tokens=12)]
    for i, extra in enumerate([{"num_beams": 4, "repetition_penalty": 5.0, "no_repeat_ngram_size": 2},
                               {"num_beam_groups": 2, "num_beams": 4, "diversity_penalty": 1.0},
                               {"penalty_alpha": 0.6, "top_k": 4}]):
        d = tmp_path / f"gen{i}"
        tiny_model("llama", hidden=32).save_pretrained(d)
        world_tokenizer().save_pretrained(d)
        (d / "generation_config.json").write_text(_json.dumps(extra))
        got = [g.completion_ids for g in generate(load_causal_lm(str(d)), tok, prompts, max_new_tokens=12)]
        assert got == want, extra
