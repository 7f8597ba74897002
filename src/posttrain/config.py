"""Typed configs: dataclasses with help written once, YAML files plus ``key=value`` overrides.

Each option is a dataclass field whose ``metadata`` carries its help text and its valid range
(``min`` / ``max`` / ``choices``). :func:`load_config` reads a YAML file, applies dotted
overrides such as ``train.lr=1e-4`` (values parsed as YAML, so ``true``, ``3``, ``[1, 2]``
work), converts types and validates; any unknown key, wrong type or out-of-range value
raises :class:`~posttrain.errors.ConfigError` naming the key and value, with the closest
valid key when it looks like a typo. :func:`describe` renders the help for ``--help``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import numpy as np
import yaml

from .errors import ConfigError, PosttrainError

T = TypeVar("T")


class _YAML12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 scalars: only true/false are booleans (``no`` stays a
    string, so ``mixed_precision: no`` means "no"), ``1e-4`` is a float, ``010`` is ten (octal
    is ``0o10``, and ``1:04`` is a string, not sexagesimal 64); a mapping may not repeat a key
    (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges are allowed (explicit keys win)
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a mapping key is not a plain value",
                                                        key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", seen[key], f"the key {key!r} appears twice", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-")
        if digits[:2] in ("0o", "0x"):
            return sign * int(digits[2:], 8 if digits[1] == "o" else 16)
        return sign * int(digits, 10)


_YAML12Loader.yaml_implicit_resolvers = {
    ch: [r for r in resolvers if r[0] not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float",
                                              "tag:yaml.org,2002:int", "tag:yaml.org,2002:timestamp")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d[\d_]*[eE][-+]?\d+"
               r"|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
_YAML12Loader.add_constructor("tag:yaml.org,2002:int", _YAML12Loader.construct_yaml_int)

# what reading a YAML text can raise besides a syntax error: an integer too long to convert,
# nesting deeper than the parser's recursion allows
_YAML_READ_ERRORS = (yaml.YAMLError, ValueError, RecursionError)


MAX_CONFIG_VALUES = 100_000  # a config is a few hundred values; aliases can make a small file expand to billions


def yaml_load(text: str):
    data = yaml.load(text, Loader=_YAML12Loader)
    _check_size(data)
    return data


def _check_size(data: Any) -> None:
    """Refuse YAML whose aliases expand it beyond any real config (a 'billion laughs' file)."""
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise yaml.YAMLError(f"the document expands to more than {MAX_CONFIG_VALUES:,} values (through "
                                 "aliases?), far more than any config")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class OverrideValue:
    """A ``key=value`` override: the YAML-parsed value, and the text as typed. String options take
    the text (so ``train.output_dir=007`` is the directory ``007``, not ``7``), the others the
    parsed value."""

    def __init__(self, parsed: Any, raw: str):
        self.parsed, self.raw = parsed, raw

    def __eq__(self, other: object) -> bool:  # compares as the parsed value
        return self.parsed == (other.parsed if isinstance(other, OverrideValue) else other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self.parsed)


def _takes_text(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) in (typing.Union, types.UnionType):
        return str in get_args(tp)
    return False


def option(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None,
           max: float | None = None, gt: float | None = None, lt: float | None = None,
           choices: tuple | None = None, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with help text and validation bounds: ``min`` / ``max`` inclusive,
    ``gt`` / ``lt`` exclusive. Every number must also be finite (NaN and inf are refused)."""
    meta = {"help": help, "min": min, "max": max, "gt": gt, "lt": lt, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, shortened for messages (a value can be thousands of characters long)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}...{text[-12:]} ({len(text)} characters)"


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``key``."""
    if isinstance(value, OverrideValue):
        value = value.raw if (_takes_text(tp) and value.parsed is not None) else value.parsed
    if isinstance(value, np.generic):  # numpy numbers from code that builds configs
        value = value.item()
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(
            f"Config key '{key}' has value {_show(value)}, which is not of type {_type_name(tp)}.",
            fix=f"give '{key}' a value of type {_type_name(tp)}.",
        )
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(
            f"Config key '{key}' has value {_show(value)}; valid values are "
            f"{', '.join(repr(a) for a in get_args(tp))}.",
            fix=f"set '{key}' to one of those.",
        )
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        # one value given (not a list, nor a comma-separated string): errors name the key itself
        scalar = not isinstance(value, (list, tuple)) and not (isinstance(value, str) and "," in value)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if scalar:
            value = [value]
        items = [_coerce(key if scalar else f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"Config key '{key}' has value {_show(value)}, which is not a mapping.",
                          fix=f"write '{key}' as a mapping, e.g. {key}={{a: b}} or {key}.a=b.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"Config key '{key}' has value {_show(value)}, which is not a boolean.",
                          fix=f"write {key}=true or {key}=false.")
    if tp is int:
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d{100,}", value.strip()):
            raise ConfigError(f"Config key '{key}' has a value of {len(value.strip())} digits, far beyond any "
                              "valid value.", fix=f"give '{key}' a sensible whole number.")
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"Config key '{key}' has value {_show(value)}, which is not an integer.",
                              fix=f"give '{key}' a whole number.")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"Config key '{key}' has value {_show(value)}, which is not a number.",
                              fix=f"give '{key}' a number such as 1e-4.")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"Config key '{key}' has value {_show(value)}, which is not a string.",
                              fix=f"give '{key}' a string value.")
        return value
    return value


def bounds_text(meta: dict) -> str:
    """``"> 0"``, ``"in [0, 1)"``, ... for an option's metadata ("" when unbounded)."""
    lo, hi = meta.get("min"), meta.get("max")
    glo, lhi = meta.get("gt"), meta.get("lt")
    left = f"[{lo}" if lo is not None else (f"({glo}" if glo is not None else None)
    right = f"{hi}]" if hi is not None else (f"{lhi})" if lhi is not None else None)
    if left and right:
        return f"in {left}, {right}"
    if left:
        return (">= " if lo is not None else "> ") + str(lo if lo is not None else glo)
    if right:
        return ("<= " if hi is not None else "< ") + str(hi if hi is not None else lhi)
    return ""


def _check_bounds(key: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_bounds(f"{key}[{i}]", v, meta)
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"Config key '{key}' has value {_show(value)}; valid values are {', '.join(map(repr, choices))}.",
            fix=f"set '{key}' to one of those.",
        )
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    rng = bounds_text(meta)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"Config key '{key}' has value {_show(value)}, which is not a finite number.",
                          fix=f"give '{key}' a finite number{' ' + rng if rng else ''}.")
    lo, hi, glo, lhi = meta.get("min"), meta.get("max"), meta.get("gt"), meta.get("lt")
    if ((lo is not None and value < lo) or (hi is not None and value > hi)
            or (glo is not None and value <= glo) or (lhi is not None and value >= lhi)):
        raise ConfigError(f"Config key '{key}' has value {_show(value)}, which is out of range: it must be {rng}.",
                          fix=f"set '{key}' to a value {rng}.")


# Option names of peer trainers (TRL / transformers TrainingArguments, OpenRLHF, verl) and the
# posttrain keys that mean the same; the first candidate that the command has is suggested.
PEER_NAMES: dict[str, tuple[str, ...]] = {
    "num_generations": ("rollout.group_size", "sampling.samples_per_prompt", "eval.n"),
    "n_samples_per_prompt": ("rollout.group_size", "sampling.samples_per_prompt", "eval.n"),
    "per_device_train_batch_size": ("train.micro_batch_size",),
    "micro_train_batch_size": ("train.micro_batch_size",),
    "gradient_accumulation_steps": ("train.grad_accum",),
    "max_completion_length": ("rollout.max_new_tokens", "sampling.max_new_tokens", "loss.max_new_tokens"),
    "max_new_tokens": ("rollout.max_new_tokens", "sampling.max_new_tokens", "loss.max_new_tokens",
                       "eval.max_new_tokens"),
    "generate_max_len": ("rollout.max_new_tokens", "sampling.max_new_tokens"),
    "max_prompt_length": ("data.max_prompt_length",),
    "prompt_max_len": ("data.max_prompt_length",),
    "max_seq_length": ("data.max_length",),
    "max_length": ("data.max_length",),
    "beta": ("loss.kl_beta", "loss.beta"),
    "init_kl_coef": ("loss.kl_beta",),
    "kl_coef": ("loss.kl_beta",),
    "learning_rate": ("train.lr",),
    "actor_learning_rate": ("train.lr",),
    "critic_learning_rate": ("critic.lr",),
    "num_train_epochs": ("train.epochs",),
    "num_iterations": ("loss.epochs",),
    "ppo_epochs": ("loss.epochs",),
    "epsilon": ("loss.clip_eps",),
    "eps_clip": ("loss.clip_eps",),
    "cliprange": ("loss.clip_eps",),
    "epsilon_high": ("loss.clip_eps_high",),
    "temperature": ("rollout.temperature", "sampling.temperature", "eval.temperature"),
    "top_p": ("rollout.top_p", "sampling.top_p", "eval.top_p"),
    "top_k": ("rollout.top_k", "sampling.top_k", "eval.top_k"),
    "logging_steps": ("train.log_every",),
    "save_steps": ("train.save_every",),
    "eval_steps": ("train.eval_every",),
    "save_total_limit": ("train.save_total_limit",),
    "warmup_ratio": ("train.warmup_ratio",),
    "weight_decay": ("train.weight_decay",),
    "max_grad_norm": ("train.max_grad_norm",),
    "seed": ("train.seed", "eval.seed"),
    "output_dir": ("train.output_dir",),
    "report_to": ("train.report_to",),
    "resume_from_checkpoint": ("train.resume",),
    "gradient_checkpointing": ("train.gradient_checkpointing",),
    "neftune_noise_alpha": ("train.neftune_alpha",),
    "packing": ("data.packing",),
    "model_name_or_path": ("model.name_or_path",),
    "pretrain": ("model.name_or_path",),
    "dataset_name": ("data.train",),
    "train_dataset": ("data.train",),
    "eval_dataset": ("data.eval",),
    "lora_r": ("model.peft.r",),
    "lora_alpha": ("model.peft.alpha",),
    "lora_dropout": ("model.peft.dropout",),
    "lora_target_modules": ("model.peft.target_modules",),
    "mask_truncated_completions": ("rollout.mask_truncated",),
    "label_smoothing": ("loss.label_smoothing",),
    "rpo_alpha": ("loss.dpop_lambda",),
    "entropy_coeff": ("loss.entropy_coef",),
    "gamma": ("loss.gamma",),
    "lam": ("loss.lam",),
}


def _peer_hint(prefix: str, key: str, cls: type | None) -> str | None:
    """``rollout.group_size`` for ``num_generations``: the key of this command (``cls`` is the
    section at ``prefix``) that a peer trainer's option name means."""
    if cls is None:
        return None
    here = set(config_keys(cls))
    for target in PEER_NAMES.get(key, ()):
        rest = target[len(prefix):] if target.startswith(prefix) else None
        if rest is not None and rest in here and target != f"{prefix}{key}":
            return target
    return None


def _unknown_key(prefix: str, key: str, valid: list[str], cls: type | None = None) -> ConfigError:
    full = f"{prefix}{key}"
    peer = _peer_hint(prefix, key, cls)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if peer:
        hint = f" Did you mean '{peer}'? ('{key}' is the name other trainers use for it.)"
    elif close:
        hint = f" Did you mean '{prefix}{close[0]}'?"
    else:
        hint = ""
    return ConfigError(
        f"Config key '{full}' does not exist.{hint} Valid keys here: "
        f"{', '.join(prefix + v for v in valid)}.",
        fix="correct or remove the key (`posttrain <command> --help` lists every key).",
    )


def config_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of config dataclass ``cls`` (sections flattened)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def rerooter(prefix: str, cls: type):
    """A function that names ``cls``'s keys in a text from the top (``loss.beta`` -> ``dpo.loss.beta``)
    when ``cls`` is a section at ``prefix`` of a bigger config (the quickstart's ``sft``, ...)."""
    keys = sorted((k for k in config_keys(cls) if "." in k), key=len, reverse=True)  # dotted only: no prose words
    if not prefix or not keys:
        return lambda text: text
    pattern = re.compile(r"(?<![\w./-])(" + "|".join(re.escape(k) for k in keys) + r")(?![\w])")
    return lambda text: None if text is None else pattern.sub(lambda m: prefix + m.group(1), text)


def reroot(error: PosttrainError, prefix: str, cls: type) -> PosttrainError:
    """The same error with ``cls``'s keys named from the top (see :func:`rerooter`)."""
    if not prefix:
        return error
    fix = rerooter(prefix, cls)
    return type(error)(fix(error.problem), fix=fix(error.fix))


def from_dict(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, validating every key and value."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"Config section '{prefix.rstrip('.')}' must be a mapping, got {data!r}.",
                          fix="write the section's options as key: value lines under it.")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"Config section '{prefix.rstrip('.') or '(top level)'}' has the key {key!r}, which is "
                              "not a name.", fix=f"use option names such as {', '.join(list(fields)[:3])}.")
        if key not in fields:
            raise _unknown_key(prefix, key, list(fields), cls)
    try:
        return _build(cls, data, prefix, hints, fields)
    except PosttrainError as e:  # sections and validate() name keys relative to cls
        raise reroot(e, prefix, cls) from None


def _build(cls, data: dict, prefix: str, hints: dict, fields: dict):
    kwargs = {}
    for name, f in fields.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            sub = data.get(name, {})
            if sub is not None and not isinstance(sub, dict):
                raise ConfigError(f"Config key '{key}' is a section and needs a mapping, got {sub!r}.",
                                  fix=f"write its options as '{key}.<option>=<value>'.")
            # a section's defaults may be overridden by the parent (default_factory)
            base = {}
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                base = dataclasses.asdict(f.default_factory())  # type: ignore[misc]
            kwargs[name] = from_dict(tp, deep_merge(base, sub or {}), prefix=f"{key}.")
            continue
        if name not in data:
            continue
        value = _coerce(key, data[name], tp)
        _check_bounds(key, value, dict(f.metadata))
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required option was not given
        raise ConfigError(f"Config section '{prefix.rstrip('.') or cls.__name__}' is incomplete: {e}.") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def unused_notes(section: Any, prefix: str, names: list[str] | tuple[str, ...], why: str) -> list[str]:
    """``note`` lines for the options ``names`` of ``section`` that differ from their defaults
    although the run will not use them (``why`` says why), so a setting is never ignored silently."""
    defaults = type(section)()
    changed = [n for n in names if getattr(section, n) != getattr(defaults, n)]
    if not changed:
        return []
    shown = ", ".join(f"{prefix}{n}={getattr(section, n)!r}" for n in changed)
    return [f"{shown} {'is' if len(changed) == 1 else 'are'} not used: {why}."]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def validated(cfg: T, cls: type | None = None) -> T:
    """A config built or changed in Python, checked exactly like one read from YAML and the
    command line (types, ranges, cross-key rules, and no attribute that is not an option, such
    as a misspelled ``cfg.train.learning_rate``); paths may be ``pathlib.Path`` objects. The
    ``run_*`` entry points call this first, with the class they take."""
    want = cls.__name__ if cls is not None else "a config object"
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type) or (cls is not None and not isinstance(cfg, cls)):
        raise ConfigError(f"Expected {want} (a dataclass instance), got {type(cfg).__name__}.",
                          fix=f"build it with load_config({cls.__name__ if cls else 'SFTConfig'}, ...) or the class "
                          "itself.")
    _check_attributes(cfg, "")
    return from_dict(type(cfg), _plain(dataclasses.asdict(cfg)))


def _check_attributes(obj: Any, prefix: str) -> None:
    names = [f.name for f in dataclasses.fields(obj)]
    for attr in vars(obj):
        if attr not in names:
            raise _unknown_key(prefix, attr, names)
    for name in names:
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _check_attributes(value, f"{prefix}{name}.")


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-4", "data.packing=false"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form key=value.",
                              fix="write overrides like train.lr=1e-4.")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml_load(raw) if raw.strip() != "" else ""
        except _YAML_READ_ERRORS:
            value = raw
        if not isinstance(value, (dict, list)):
            value = OverrideValue(value, raw)
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                parent = ".".join(parts[: i + 1])
                raise ConfigError(f"Override '{item}' sets a sub-key of '{parent}', which another override sets "
                                  "to a value.", fix=f"give '{parent}' either a value or sub-keys, not both.")
        node[parts[-1]] = value
    return out


def _nest_dotted(mapping: dict) -> dict:
    """``{"train.lr": 0.1}`` in a YAML file means ``{"train": {"lr": 0.1}}``, as on the command line."""
    out: dict = {}
    for k, v in mapping.items():
        v = _nest_dotted(v) if isinstance(v, dict) else v
        if isinstance(k, str) and "." in k:
            head, rest = k.split(".", 1)
            v, k = {rest: v}, head
            v = _nest_dotted(v)
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(cls: type[T], path: str | Path | list | tuple | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """YAML file(s) (optional; later files override earlier ones) + ``key=value`` overrides ->
    validated ``cls`` instance."""
    data: dict = dict(base or {})
    paths = [] if path is None else list(path) if isinstance(path, (list, tuple)) else [path]
    for one in paths:
        data = deep_merge(data, _read_config_file(one))
    data = deep_merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def _read_config_file(path: str | Path) -> dict:
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"Config file '{p}' is a directory.", fix="give --config the path of a .yaml file.")
    if not p.is_file():
        raise ConfigError(f"Config file '{p}' does not exist.", fix="check the path given to --config.")
    try:
        loaded = yaml_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"Config file '{p}' is not UTF-8 text (is it a YAML file?).",
                          fix="save the config as UTF-8 YAML.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file '{p}' is not valid YAML: {e}", fix="correct the YAML syntax.") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"Config file '{p}' cannot be read: {type(e).__name__}: {str(e)[:200]}",
                          fix="simplify the YAML (no integers of thousands of digits, no deep nesting).") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"Config file '{p}' must hold a mapping of options at the top level.",
                          fix="write one 'key: value' (or 'section:' with indented options) per line.")
    return _nest_dotted(loaded)


def describe(cls: type, prefix: str = "", instance: Any = None) -> list[str]:
    """One line per option: ``key (type, default): help``; used by ``--help``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines.append("")
            lines.append(f"[{key}]  {(tp.__doc__ or '').strip().splitlines()[0]}")
            sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            lines.extend(describe(tp, prefix=f"{key}.", instance=sub))
            continue
        if instance is not None:
            default = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "required"
        rng = bounds_text(dict(f.metadata))
        kind = _type_name(tp) + (f", {rng}" if rng else "")
        lines.append(f"  {key} = {default!r}  ({kind})  {f.metadata.get('help', '')}")
    return lines


# --------------------------------------------------------------------------- shared sections


PEFT_METHODS = ("none", "lora")
LORA_INITS = ("default", "gaussian", "pissa", "olora")


@dataclasses.dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (``model.peft``): LoRA adapters through peft."""

    method: str = option("none", "none (train every weight) or lora (train low-rank adapters only).",
                         choices=PEFT_METHODS)
    r: int = option(16, "LoRA rank.", min=1, max=65536)
    alpha: float = option(32.0, "LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rslora).",
                          gt=0.0)
    dropout: float = option(0.0, "Dropout on the adapter's input.", min=0.0, lt=1.0)
    target_modules: list[str] = option(default_factory=lambda: ["all-linear"],
                                       help="Module names to adapt (e.g. [q_proj,v_proj]), or [all-linear]: every "
                                            "linear layer except the output head.")
    rslora: bool = option(False, "Rank-stabilized LoRA: scale by alpha / sqrt(r).")
    dora: bool = option(False, "DoRA: weight-decomposed LoRA (magnitude and direction).")
    init: str = option("default", "Adapter initialization: default (A Kaiming-uniform, B zero), gaussian, pissa, "
                                  "olora (pissa and olora change the base weights: the reference is then the "
                                  "model with the adapter disabled, which differs from the loaded model).",
                       choices=LORA_INITS)
    quantize: str = option("none", "QLoRA: nf4 loads the base model's linear layers in 4-bit NF4 with double "
                                   "quantization (bitsandbytes: pip install 'posttrain[qlora]'); needs method=lora.",
                           choices=("none", "nf4"))
    compute_dtype: str = option("float32", "QLoRA: dtype the 4-bit layers compute in (bfloat16 on GPUs).",
                                choices=("float32", "bfloat16", "float16"))

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def validate(self) -> None:
        if self.quantize != "none" and self.method != "lora":
            raise ConfigError(f"model.peft.quantize={self.quantize} quantizes the frozen base weights for QLoRA, but "
                              f"model.peft.method is {self.method}: quantized weights cannot be trained.",
                              fix="set model.peft.method=lora, or model.peft.quantize=none.")


@dataclasses.dataclass
class ModelConfig:
    """The model to train and its tokenizer."""

    name_or_path: str = option("builtin:tiny-world-base",
                               "Hugging Face model directory or hub id, or builtin:tiny-world-base.")
    tokenizer: str | None = option(None, "Tokenizer directory/id (default: same as name_or_path).")
    dtype: str = option("auto", "Weight dtype: auto (= float32, with train.mixed_precision=bf16 for bf16 compute on GPUs), "
                        "float32, bfloat16, float16.",
                        choices=("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"))
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    attn_implementation: str = option("sdpa", "sdpa, eager or flash_attention_2 (packing works with all three).",
                                      choices=("sdpa", "eager", "flash_attention_2", "flex_attention"))
    pad_token: str | None = option(None, "Set the tokenizer's pad token (e.g. its EOS token) when it has none.")
    chat_template: str | None = option(None, "A Jinja chat template (file path or string) to use instead of "
                                             "the tokenizer's own.")
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)


@dataclasses.dataclass
class TrainConfig:
    """The optimization loop (AdamW, warmup + cosine schedule, accumulation, checkpoints)."""

    output_dir: str = option("runs/sft", "Run directory: metrics.jsonl, config.yaml, checkpoints/, final/.")
    seed: int = option(0, "Seed for data order, initialization noise and NEFTune.", min=0, max=2**32 - 1)
    epochs: float = option(1.0, "Passes over the training data (fractions allowed).", min=0.0)
    max_steps: int = option(0, "Optimizer steps; 0 means derive from epochs.", min=0)
    micro_batch_size: int = option(8, "What one forward pass takes: sft, distill: rows (packed rows of "
                                      "data.max_length when packing, examples otherwise); rft, cai: packed rows "
                                      "of their fine-tuning step; rm, dpo: units (pairs, "
                                      "KTO examples or K-sets; packed into rows when packing); online-dpo: pairs; "
                                      "prm: solutions; rl and its presets: prompt groups (rollout.group_size "
                                      "completions each).", min=1)
    grad_accum: int = option(1, "Micro-batches per optimizer step.", min=1)
    lr: float = option(2e-5, "Peak learning rate.", gt=0.0, max=1.0)
    min_lr_ratio: float = option(0.1, "Cosine floor as a fraction of the peak.", min=0.0, max=1.0)
    warmup_ratio: float = option(0.03, "Fraction of steps with linear warmup.", min=0.0, max=1.0)
    weight_decay: float = option(0.1, "Decoupled weight decay on weight matrices (not biases/norms).", min=0.0)
    adam_beta1: float = option(0.9, "AdamW beta1.", min=0.0, lt=1.0)
    adam_beta2: float = option(0.95, "AdamW beta2.", min=0.0, lt=1.0)
    adam_eps: float = option(1e-8, "AdamW epsilon.", gt=0.0)
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this (the pre-clip norm is logged).",
                                  gt=0.0)
    neftune_alpha: float | None = option(None, "NEFTune noise alpha (e.g. 5); null disables it.", gt=0.0)
    max_bad_steps: int = option(10, "Abort after this many steps with a non-finite loss or gradient.", min=0)
    mixed_precision: str = option("no", "no, or bf16: bf16 autocast over fp32 weights and optimizer (GPUs, and "
                                  "CPUs with bf16 matrix units; the LM head's log-softmax stays fp32).",
                                  choices=("no", "bf16"))
    gradient_checkpointing: bool = option(False, "Recompute each decoder layer's forward pass in the backward pass "
                                                 "instead of keeping its activations: activation memory drops to "
                                                 "each layer's input plus one layer's set (instead of every "
                                                 "layer's), for about 30% more compute per step; losses and "
                                                 "gradients are the same. Every command (LoRA, a PPO critic and "
                                                 "sharding included); sampling and evaluation are unaffected.")
    sharding: str = option("none", "Under several processes: none (data parallel, a whole model per process), "
                                   "fsdp2 (FSDP2: parameters, gradients and optimizer state sharded by decoder "
                                   "layer), zero2 / zero3 (DeepSpeed ZeRO: optimizer state and gradients, and with "
                                   "zero3 the parameters, partitioned); sft, rm, dpo family, prm, distill. "
                                   "accelerate launch with an FSDP2 or DeepSpeed config sets it.",
                           choices=("none", "fsdp2", "zero2", "zero3"))
    fsdp_reshard_after_forward: bool = option(True, "fsdp2: free each layer's gathered weights after its forward "
                                                    "(ZeRO-3-like); false keeps them until the backward (ZeRO-2-like).")
    log_every: int = option(1, "Write a metrics line every N steps.", min=1)
    eval_every: int = option(0, "Evaluate every N steps (0: only at the end).", min=0)
    save_every: int = option(0, "Checkpoint every N steps (0: only at the end).", min=0)
    save_total_limit: int | None = option(None, "Keep at most this many checkpoints (the oldest are deleted "
                                                 "after a newer one is complete); null keeps all.", min=1)
    resume: str | None = option(None, "Resume from a checkpoint directory, or 'auto' for the latest "
                                      "complete, intact one in output_dir/checkpoints (corrupt ones are "
                                      "skipped with a warning). The config must match the stopped run's.")
    overwrite_output_dir: bool = option(False, "Let a fresh run delete the checkpoints/ and final/ of an "
                                               "earlier run in output_dir (otherwise it is refused).")
    progress: bool = option(True, "Show a progress bar.")
    report_to: list[str] = option(default_factory=list, help="Extra metric sinks, written by rank 0: tensorboard "
                                  "(event files in output_dir/tensorboard), wandb (project 'posttrain' or "
                                  "$WANDB_PROJECT, files in output_dir/wandb; WANDB_MODE=offline needs no account), "
                                  "trackio (local: project 'posttrain' under $TRACKIO_DIR, default "
                                  "~/.cache/huggingface/trackio; `trackio show`). Runs are named after output_dir. "
                                  "Each needs its extra, pip install 'posttrain[tensorboard]' / '[wandb]' / "
                                  "'[trackio]'; a missing one is refused at start.")

    def validate(self) -> None:
        from .train.logging import check_report_to

        check_report_to(self.report_to, "train.report_to")  # unknown sinks, and missing packages (cheap)
        if self.lr * self.weight_decay >= 1:
            raise ConfigError(
                f"train.lr * train.weight_decay is {self.lr * self.weight_decay:.3g}; AdamW's decoupled decay multiplies "
                "every weight by (1 - lr * weight_decay) each step, which is 0 or negative here.",
                fix="keep train.lr * train.weight_decay well below 1 (e.g. weight_decay=0.1).")
        if self.overwrite_output_dir and self.resume:
            raise ConfigError("train.overwrite_output_dir=true and train.resume are both set: a resumed run continues "
                              "in its directory and deletes nothing.", fix="set only one of them.")
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError("train.epochs and train.max_steps are both 0, so there is nothing to train.",
                              fix="set train.epochs > 0 or train.max_steps > 0.")
