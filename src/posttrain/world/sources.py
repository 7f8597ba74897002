"""The one registry of built-in data: every ``builtin:`` name a data key accepts, what kind of
records it generates and from which generator. Each name also has a ``-heldout`` variant (the
world's held-out split, ``data.world_eval_examples`` records instead of ``data.world_examples``).

A command asks for the kinds it can train on; a built-in name of another kind, or one that does
not exist, is refused with the names that would fit. Constitutions (``builtin:world``) are not
data records and are resolved by :func:`posttrain.world.feedback.load_constitution`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError

HELDOUT = "-heldout"


def _problems(n: int, *, split: str, seed: int) -> list[dict]:
    from .datasets import problem_record
    from .tasks import generate_problems

    return [problem_record(p) for p in generate_problems(n, seed=seed, split=split)]


def _sft(n: int, *, split: str, seed: int) -> list[dict]:
    from .tasks import generate_problems

    return [{"messages": p.messages()} for p in generate_problems(n, seed=seed, split=split)]


def _tool_sft(n: int, *, split: str, seed: int, world_tool_fraction: float = 0.5) -> list[dict]:
    from .datasets import tool_sft_records

    return tool_sft_records(n, seed=seed, split=split, tool_fraction=world_tool_fraction)


def _feedback(which: str):
    def records(n: int, *, split: str, seed: int) -> list[dict]:
        from . import feedback

        if which == "revise":
            return feedback.revise_records(n, seed=seed, split=split)
        return feedback.judge_records(n, reasoning=which == "judge-reasoning", seed=seed, split=split)

    return records


def _preferences(which: str):
    def records(n: int, *, split: str, seed: int, world_k: int = 4) -> list[dict]:
        from . import preferences as wp

        if which == "ranked":
            return wp.ranked_records(n, seed=seed, split=split, k=world_k)
        fn = wp.preference_records if which == "paired" else wp.unpaired_records
        return fn(n, seed=seed, split=split)

    return records


def _pieces(sft: bool):
    def records(n: int, *, split: str, seed: int) -> list[dict]:
        from . import pieces

        return (pieces.pieces_sft_records if sft else pieces.pieces_records)(n, split=split, seed=seed)

    return records


def _steps(n: int, *, split: str, seed: int) -> list[dict]:
    from .preferences import step_records

    return step_records(n, seed=seed, split=split)


@dataclass(frozen=True)
class BuiltinData:
    name: str
    kind: str        # prompts | sft | paired | unpaired | ranked | steps
    format: str | None
    generate: Callable[..., list[dict]]
    what: str        # a few words for messages
    options: tuple[str, ...] = ()   # data.* keys the generator takes


BUILTINS: dict[str, BuiltinData] = {b.name: b for b in (
    BuiltinData("builtin:world-problems", "prompts", "prompt_answer", _problems, "word problems with answers"),
    BuiltinData("builtin:world-sft", "sft", "conversational", _sft, "worked solutions as conversations"),
    BuiltinData("builtin:world-tool-sft", "sft", "conversational", _tool_sft,
                "worked solutions and calculator calls as conversations with tools", ("world_tool_fraction",)),
    BuiltinData("builtin:world-judge", "sft", "prompt_completion", _feedback("judge"), "judge training data"),
    BuiltinData("builtin:world-judge-reasoning", "sft", "prompt_completion", _feedback("judge-reasoning"),
                "judge training data with reasoning"),
    BuiltinData("builtin:world-revise", "sft", "prompt_completion", _feedback("revise"), "reviser training data"),
    BuiltinData("builtin:world-pairs", "paired", None, _preferences("paired"), "preference pairs"),
    BuiltinData("builtin:world-unpaired", "unpaired", None, _preferences("unpaired"), "KTO-style labelled samples"),
    BuiltinData("builtin:world-ranked", "ranked", None, _preferences("ranked"), "scored K-sets", ("world_k",)),
    BuiltinData("builtin:world-steps", "steps", "stepwise", _steps, "step-labelled solutions"),
    BuiltinData("builtin:world-pieces", "prompts", "prompt_answer", _pieces(False),
                "word problems told in pieces (env world-pieces)"),
    BuiltinData("builtin:world-pieces-sft", "sft", "conversational", _pieces(True),
                "word problems told in pieces with running-total replies"),
)}


def builtin_names(kinds: tuple[str, ...]) -> list[str]:
    return [b.name for b in BUILTINS.values() if b.kind in kinds]


def is_builtin(spec) -> bool:
    return str(spec).startswith("builtin:")


def split_builtin(spec: str) -> tuple[str, str]:
    """``(registry name, split)`` of a built-in data name (``-heldout``: the held-out split)."""
    return (spec[: -len(HELDOUT)], "heldout") if spec.endswith(HELDOUT) else (spec, "train")


def builtin_records(spec: str, *, kinds: tuple[str, ...], n: int, n_heldout: int, seed: int, key: str,
                    what: str, **options):
    """The records of built-in data ``spec`` as a loaded dataset, ``n`` of them (``n_heldout`` for
    the ``-heldout`` variant); ``options``: ``data.*`` values, passed to the generators that name them. ``kinds``: what the
    caller trains on; ``what``: its name for that data in the messages."""
    from ..data import load_records

    name, split = split_builtin(spec)
    b = BUILTINS.get(name)
    fitting = builtin_names(kinds)
    listing = ", ".join(f"{x} (and {x}{HELDOUT})" for x in fitting)
    if b is None:
        raise ConfigError(f"Unknown built-in {what} '{spec}' in {key}; built-in {what}: {listing}.",
                          fix="use one of those or a file path.")
    if b.kind not in kinds:
        raise ConfigError(f"{key}={spec} holds {b.what} ({b.kind} data), but this needs {what}.",
                          fix=f"use {listing}, or a file in the matching format.")
    records = b.generate(n if split == "train" else n_heldout, split=split, seed=seed,
                         **{k: options[k] for k in b.options if k in options})
    return load_records(records, b.format or "auto")


def check_source(spec, data, *, kinds: tuple[str, ...], key: str) -> None:
    """A data key's value before anything is read: not empty, and no field map on built-in data."""
    from ..data.fields import check_builtin

    check_builtin(spec, data.fields, key)
    if not str(spec).strip():
        names = builtin_names(kinds)
        raise ConfigError(f"Config key '{key}' is empty.",
                          fix=f"set {key} to a JSONL / Parquet file or {' / '.join(names) if names else 'a file'}.")


def load_source(spec, data, *, kinds: tuple[str, ...], seed: int, key: str, what: str, format: str = "auto"):
    """The records a data key names: built-in data of one of ``kinds`` (``data.world_examples`` /
    ``data.world_eval_examples`` of them, with the ``data.*`` options its generator takes), or a
    JSONL / Parquet file read with ``data.fields``. ``what``: the caller's name for that data."""
    from ..data import load_records

    check_source(spec, data, kinds=kinds, key=key)
    if is_builtin(spec):
        options = {k: getattr(data, k) for b in BUILTINS.values() for k in b.options if hasattr(data, k)}
        return builtin_records(spec, kinds=kinds, n=data.world_examples, n_heldout=data.world_eval_examples,
                               seed=seed, key=key, what=what, **options)
    return load_records(spec, format, fields=data.fields)


__all__ = ["BUILTINS", "BuiltinData", "builtin_names", "builtin_records", "check_source", "is_builtin", "load_source",
           "split_builtin"]
