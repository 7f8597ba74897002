"""Every numeric key of every command's config refuses NaN, inf and out-of-range values by name;
the values at the edges of the ranges are accepted and do not crash where they are used."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch

from posttrain.algorithms.dpo import DPOConfig
from posttrain.algorithms.rm import RMConfig
from posttrain.algorithms.sft import SFTConfig
from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.quickstart import QuickstartConfig

COMMANDS = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "quickstart": QuickstartConfig}


def _numeric_keys(cls, prefix=""):
    """(dotted key, base type, metadata) of every int / float option, sections included."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _numeric_keys(tp, f"{prefix}{f.name}.")
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        base = args[0]
        if base in (int, float) and not f.metadata.get("choices"):
            out.append((f"{prefix}{f.name}", base, dict(f.metadata)))
    return out


ALL_KEYS = [(cmd, key, base, meta) for cmd, cls in COMMANDS.items() for key, base, meta in _numeric_keys(cls)]


def test_the_walk_covers_the_keys_the_issue_names():
    keys = {(c, k) for c, k, _, _ in ALL_KEYS}
    for key in ("train.lr", "train.warmup_ratio", "train.epochs", "train.neftune_alpha", "train.max_grad_norm",
                "train.min_lr_ratio", "train.adam_beta1", "train.adam_beta2"):
        assert ("sft", key) in keys
    assert ("dpo", "loss.beta") in keys and ("quickstart", "sft.train.lr") in keys
    assert len(ALL_KEYS) > 100


@pytest.mark.parametrize("cmd, key, base, meta", ALL_KEYS, ids=[f"{c}:{k}" for c, k, _, _ in ALL_KEYS])
def test_nonfinite_values_are_refused_by_name(cmd, key, base, meta):
    for raw in (".nan", ".inf", "-.inf", "nan", "inf"):
        with pytest.raises(ConfigError) as e:
            load_config(COMMANDS[cmd], None, [f"{key}={raw}"])
        msg = str(e.value)
        assert f"'{key}'" in msg and "Fix:" in msg, (raw, msg)


def _outside(meta, base):
    """Values just outside the declared range (and the exclusive bounds themselves)."""
    vals = []
    step = 1 if base is int else 1e-9
    if meta.get("min") is not None:
        vals.append(meta["min"] - step)
    if meta.get("max") is not None:
        vals.append(meta["max"] + step)
    if meta.get("gt") is not None:
        vals += [meta["gt"], meta["gt"] - step]
    if meta.get("lt") is not None:
        vals += [meta["lt"], meta["lt"] + step]
    return vals


@pytest.mark.parametrize("cmd, key, base, meta", ALL_KEYS, ids=[f"{c}:{k}" for c, k, _, _ in ALL_KEYS])
def test_out_of_range_values_are_refused_by_name(cmd, key, base, meta):
    for value in _outside(meta, base):
        with pytest.raises(ConfigError) as e:
            load_config(COMMANDS[cmd], None, [f"{key}={value!r}"])
        assert f"'{key}'" in str(e.value) and "out of range" in str(e.value), (value, str(e.value))


@pytest.mark.parametrize("cmd, key, base, meta", ALL_KEYS, ids=[f"{c}:{k}" for c, k, _, _ in ALL_KEYS])
def test_inclusive_edges_are_accepted(cmd, key, base, meta):
    for edge in (meta.get("min"), meta.get("max")):
        if edge is None:
            continue
        extra = []
        if key.endswith("normalize_constant") or key.endswith("epochs"):
            extra = [key.rsplit(".", 1)[0] + (".max_steps=1" if key.endswith("epochs") else ".normalization=constant")]
        if key.endswith(".max_steps") and edge == 0:
            continue  # 0 means "derive from epochs", tested elsewhere
        try:
            load_config(COMMANDS[cmd], None, [f"{key}={edge!r}"] + extra)
        except ConfigError as e:  # a cross-key rule may still refuse it, but never as out of range
            assert "out of range" not in str(e), str(e)


def test_every_bounded_key_has_a_range_in_its_help():
    from posttrain.config import describe

    text = "\n".join(describe(SFTConfig))
    assert "train.adam_beta1 = 0.9  (float, in [0.0, 1.0))" in text
    assert "train.lr = 0.001  (float, in (0.0, 1.0])" in text


@pytest.mark.parametrize("override", ["loss.beta=0", "loss.beta=-0.1"])
def test_zero_beta_is_refused_before_the_loss_sees_it(override):
    with pytest.raises(ConfigError, match="'loss.beta'"):
        load_config(DPOConfig, None, [override])


def test_adam_betas_near_one_work_in_torch():
    """The largest accepted betas run an AdamW step without error (1.0 itself is refused)."""
    from posttrain.train.optim import build_optimizer

    cfg = load_config(SFTConfig, None, ["train.adam_beta1=0.999999", "train.adam_beta2=0.999999", "train.adam_eps=1e-30"])
    p = torch.nn.Linear(3, 3)
    opt = build_optimizer(p, lr=1e-3, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps)
    p(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert all(torch.isfinite(t).all() for t in p.parameters())
    for bad in ("train.adam_beta1=1.0", "train.adam_beta2=1", "train.adam_eps=0"):
        with pytest.raises(ConfigError, match="out of range"):
            load_config(SFTConfig, None, [bad])


def test_huge_plans_are_refused_before_they_are_built():
    from posttrain.train.plan import MAX_PLAN_STEPS, StepPlan

    with pytest.raises(ConfigError, match="train.epochs"):
        StepPlan(n_items=10, epoch_units=lambda e, rng: list(range(10)), collate=lambda u: {}, content=lambda: [],
                 micro_batch_size=1, grad_accum=1, epochs=MAX_PLAN_STEPS, max_steps=0, seed=0, tag="t")
    assert math.isfinite(MAX_PLAN_STEPS)
