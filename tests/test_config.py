"""Typed configs: YAML + overrides, clear errors naming key and value."""

import pytest

from posttrain.algorithms.sft import SFTConfig
from posttrain.config import describe, load_config, parse_overrides
from posttrain.errors import ConfigError


def test_overrides_are_parsed_as_yaml_and_nested():
    assert parse_overrides(["train.lr=1e-4", "data.packing=false", "train.report_to=[tensorboard]"]) == {
        "train": {"lr": 1e-4, "report_to": ["tensorboard"]},
        "data": {"packing": False},
    }


def test_yaml_file_then_overrides(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("train:\n  lr: 0.001\n  epochs: 2\ndata:\n  max_length: 128\n")
    cfg = load_config(SFTConfig, p, ["train.lr=5e-4"])
    assert cfg.train.lr == 5e-4 and cfg.train.epochs == 2.0 and cfg.data.max_length == 128
    # untouched keys keep the command's defaults (SFT's tiny-world defaults)
    assert cfg.train.micro_batch_size == SFTConfig().train.micro_batch_size


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, ["train.learning_rate=1e-4"])
    msg = str(e.value)
    assert "'train.learning_rate' does not exist" in msg
    with pytest.raises(ConfigError, match="Did you mean 'train.max_steps'"):
        load_config(SFTConfig, None, ["train.max_step=3"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lr=-1", "'train.lr' has value -1.0, which is out of range: it must be in (0.0, 1.0]"),
        ("train.micro_batch_size=0", "'train.micro_batch_size' has value 0, which is out of range: it must be >= 1"),
        ("train.micro_batch_size=2.5", "'train.micro_batch_size' has value 2.5, which is not an integer"),
        ("data.packing=maybe", "'data.packing' has value 'maybe', which is not a boolean"),
        ("data.overlong=cut", "'data.overlong' has value 'cut'; valid values are 'truncate', 'drop'"),
        ("train.report_to=[slack]", "'train.report_to' has value 'slack'"),
        ("loss.normalization=constant", "loss.normalize_constant is not set"),
    ],
)
def test_bad_values_are_named(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, [override])
    assert fragment in str(e.value)
    assert "Fix:" in str(e.value)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, bad)


def test_describe_lists_every_key_with_help():
    text = "\n".join(describe(SFTConfig))
    for key in ("model.name_or_path", "data.packing", "train.lr", "train.neftune_alpha", "loss.normalization"):
        assert key in text
    assert "Peak learning rate" in text


def test_yaml_12_scalars(tmp_path):
    from posttrain.config import yaml_load

    assert yaml_load("a: no\nb: off\nc: true\nd: 1e-4\ne: 2.5\nf: 3\ng: yes") == {
        "a": "no", "b": "off", "c": True, "d": 1e-4, "e": 2.5, "f": 3, "g": "yes"}
    cfg = load_config(SFTConfig, None, ["train.mixed_precision=no", "train.lr=1e-4"])
    assert cfg.train.mixed_precision == "no" and cfg.train.lr == 1e-4


def test_yaml_12_integers_and_duplicate_keys(tmp_path):
    from posttrain.config import yaml_load

    assert yaml_load("a: 010\nb: 0o10\nc: 0x1f\nd: 1:04\ne: -5\nf: 1_000") == {
        "a": 10, "b": 8, "c": 31, "d": "1:04", "e": -5, "f": 1000}
    cfg = load_config(SFTConfig, None, ["train.max_steps=010"])
    assert cfg.train.max_steps == 10  # YAML 1.1 would read octal 8
    f = tmp_path / "dup.yaml"
    f.write_text("train:\n  max_steps: 1\ndata:\n  max_length: 64\ntrain:\n  save_every: 1\n")
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(SFTConfig, f)


def test_nested_section_errors_name_the_full_key():
    from posttrain.quickstart import QuickstartConfig

    with pytest.raises(ConfigError) as e:
        load_config(QuickstartConfig, None, ["sft.loss.normalization=constant"])
    assert "sft.loss.normalize_constant" in str(e.value) and " loss.normalize_constant" not in str(e.value)


def test_yaml_merge_keys_and_dotted_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("defaults: &d {lr: 0.002, max_steps: 3}\n")
    with pytest.raises(ConfigError, match="'defaults' does not exist"):
        load_config(SFTConfig, f)
    f.write_text("train:\n  <<: {lr: 0.002, max_steps: 3}\n  lr: 0.004\ndata.max_length: 64\n")
    cfg = load_config(SFTConfig, f)
    assert cfg.train.lr == 0.004 and cfg.train.max_steps == 3 and cfg.data.max_length == 64


def test_home_is_expanded_for_config_and_data(tmp_path, monkeypatch):
    from posttrain.data import load_records

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.003\n")
    (tmp_path / "d.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    assert load_config(SFTConfig, "~/c.yaml").train.lr == 0.003
    assert len(load_records("~/d.jsonl")) == 1
