"""The tiny world's datasets in the standard record formats (see :mod:`posttrain.data.formats`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..data.formats import write_jsonl

from .tasks import Problem, generate_problems


def sft_record(p: Problem, direct: bool = False) -> dict:
    """Conversational SFT record: user question, assistant worked solution (``direct``: only the
    final answer line, ``#### n``)."""
    if direct:
        return {"messages": [{"role": "user", "content": p.question},
                             {"role": "assistant", "content": f"#### {p.answer}"}]}
    return {"messages": p.messages()}


def uses_tool(p: Problem, tool_fraction: float) -> bool:
    """Whether problem ``p`` is solved with the calculator in tool SFT data: a fixed uniform draw
    per question (a hash of its text, salted apart from the split's), below ``tool_fraction``. So a
    problem keeps its choice across seeds, and raising the fraction only adds tool solutions."""
    digest = hashlib.sha256(f"tool-sft:{p.question}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < tool_fraction


def tool_sft_record(p: Problem, use_tool: bool) -> dict:
    """A conversational SFT record with the calculator in ``tools``. With ``use_tool`` the
    assistant calls ``calculator(expression="a op b")`` once per step, each call answered by a
    ``tool`` turn with the result as :func:`posttrain.envs.tools.calculate` gives it, then replies
    ``#### answer``; without, it writes the usual worked solution in one turn. Both kinds carry the
    same ``tools`` (the same rendered prompt): the data teaches the call format, not when a call pays."""
    from ..envs.tools import CALCULATOR, calculate

    messages = [{"role": "user", "content": p.question}]
    if not use_tool:
        messages.append({"role": "assistant", "content": p.solution})
    else:
        for s in p.steps:
            expression = f"{s.a} {s.op} {s.b}"
            result = calculate(expression)
            assert result == str(s.result), (expression, result, s)
            messages += [{"role": "assistant", "content": "", "tool_calls": [
                             {"type": "function", "function": {"name": CALCULATOR.name,
                                                               "arguments": {"expression": expression}}}]},
                         {"role": "tool", "name": CALCULATOR.name, "content": result}]
        messages.append({"role": "assistant", "content": f"#### {p.answer}"})
    return {"messages": messages, "tools": [CALCULATOR.schema()]}


def tool_sft_records(n: int, *, seed: int, split: str = "train", tool_fraction: float = 0.5) -> list[dict]:
    """``n`` tool SFT records (:func:`tool_sft_record`) of the world's ``split``, a ``tool_fraction``
    of them (per problem, :func:`uses_tool`) solved with the calculator."""
    if not 0.0 <= tool_fraction <= 1.0:
        raise ValueError(f"tool_fraction must be in [0, 1], got {tool_fraction!r}")
    return [tool_sft_record(p, uses_tool(p, tool_fraction)) for p in generate_problems(n, seed=seed, split=split)]


def problem_record(p: Problem) -> dict:
    """Prompt-with-answer record (for evaluation and RL with verifiable rewards)."""
    return {"prompt": [{"role": "user", "content": p.question}], "answer": str(p.answer), "level": p.level}


WORLD_DATA_FILES = ("sft_train.jsonl", "sft_heldout.jsonl", "problems_heldout.jsonl")


def write_world_datasets(out: Path, *, n_train: int, n_heldout: int, seed: int = 0, direct_fraction: float = 0.0,
                         direct_levels: tuple[int, ...] = (1, 2, 3, 4)) -> dict[str, Path]:
    """Write ``sft_train.jsonl``, ``sft_heldout.jsonl`` and ``problems_heldout.jsonl`` into ``out``.

    ``direct_fraction``: the share of the train conversations at ``direct_levels`` (drawn with
    ``seed``) whose reply is the bare final answer instead of the worked solution; held-out
    conversations are worked."""
    import random

    train = generate_problems(n_train, seed=seed, split="train")
    heldout = generate_problems(n_heldout, seed=seed, split="heldout")
    rng = random.Random(f"direct-{seed}")
    direct = [rng.random() < direct_fraction and p.level in direct_levels for p in train]
    return {
        "sft_train": write_jsonl(out / "sft_train.jsonl", [sft_record(p, d) for p, d in zip(train, direct)]),
        "sft_heldout": write_jsonl(out / "sft_heldout.jsonl", [sft_record(p) for p in heldout]),
        "problems_heldout": write_jsonl(out / "problems_heldout.jsonl", [problem_record(p) for p in heldout]),
    }
