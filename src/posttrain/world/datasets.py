"""The tiny world's datasets in the standard record formats (see :mod:`posttrain.data.formats`)."""

from __future__ import annotations

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
