"""The one registry of built-in data (posttrain.world.sources): every name loads as its kind, the
held-out variant is another split, and a name of the wrong kind or an unknown one is refused
with the names that fit, the same way from every command's loader."""

from __future__ import annotations

import pytest

from posttrain.algorithms.dpo import PreferenceDataConfig, load_preference_source
from posttrain.algorithms.online import RLDataConfig, load_prompt_source
from posttrain.algorithms.prm import PRMDataConfig, load_step_source
from posttrain.algorithms.sft import SFTDataConfig, load_sft_source
from posttrain.errors import ConfigError
from posttrain.world.sources import BUILTINS, builtin_names, builtin_records, split_builtin

# the record format each kind's records are detected as (None: the loader's own detection)
KIND_FORMATS = {"prompts": {"prompt_answer"}, "sft": {"conversational", "prompt_completion"},
                "paired": {"preference"}, "unpaired": {"unpaired"}, "ranked": {"ranked"}, "steps": {"stepwise"}}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_loads_as_its_kind_and_heldout_is_another_split(name):
    b = BUILTINS[name]
    kw = dict(kinds=(b.kind,), n=3, n_heldout=2, seed=0, key="data.train", what="data")
    train = builtin_records(name, **kw)
    held = builtin_records(name + "-heldout", **kw)
    # data.world_examples / world_eval_examples problems reach the generator (some give several records each)
    assert len(builtin_records(name, **{**kw, "n": 6}).records) > len(train.records) >= 3
    assert len(builtin_records(name + "-heldout", **{**kw, "n_heldout": 4}).records) > len(held.records) >= 2
    assert train.format in KIND_FORMATS[b.kind] and held.format == train.format
    assert train.records[:2] != held.records    # the held-out split is other problems
    assert builtin_records(name, **kw).records == train.records   # seeded: the same records again


def test_split_names():
    assert split_builtin("builtin:world-sft-heldout") == ("builtin:world-sft", "heldout")
    assert split_builtin("builtin:world-sft") == ("builtin:world-sft", "train")


@pytest.mark.parametrize("load, data, fitting", [
    (lambda spec, d: load_prompt_source(spec, d, 0), RLDataConfig(world_examples=2), "builtin:world-problems"),
    (lambda spec, d: load_step_source(spec, d, 0), PRMDataConfig(world_examples=2), "builtin:world-steps"),
    (lambda spec, d: load_sft_source(spec, d, 0), SFTDataConfig(world_examples=2), "builtin:world-sft"),
    (lambda spec, d: load_preference_source(spec, d, "paired", 0), PreferenceDataConfig(world_examples=2),
     "builtin:world-pairs"),
])
def test_every_loader_refuses_other_kinds_and_unknown_names_naming_what_fits(load, data, fitting):
    other = next(n for n in BUILTINS if n not in builtin_names((BUILTINS[fitting].kind,)))
    with pytest.raises(ConfigError) as e:
        load(other, data)
    assert other in str(e.value) and BUILTINS[other].kind in str(e.value) and fitting in e.value.fix
    with pytest.raises(ConfigError, match="Unknown built-in") as e:
        load("builtin:world-nothing", data)
    assert fitting in str(e.value)
    with pytest.raises(ConfigError, match="'data.train' is empty") as e:
        load(" ", data)
    assert fitting in e.value.fix
    assert len(load(fitting, data).records) == 2


@pytest.mark.parametrize("train, expected", [
    ("builtin:world-problems", "builtin:world-problems-heldout"),
    ("builtin:world-pieces", "builtin:world-pieces-heldout"),
])
def test_auto_evaluation_takes_the_builtin_prompt_sets_heldout_split(train, expected):
    from posttrain.algorithms.online import load_prompt_sets

    from .tiny import world_tokenizer

    cfg = RLDataConfig(train=train, world_examples=6, world_eval_examples=5)
    _, heldout, source = load_prompt_sets(cfg, world_tokenizer(), seed=0, log=lambda s: None)
    want = builtin_records(expected, kinds=("prompts",), n=6, n_heldout=5, seed=0, key="data.eval", what="prompts")
    assert [p.fields for p in heldout] == [{k: v for k, v in r.items() if k != "prompt"} for r in want.records]
