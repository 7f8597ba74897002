"""Arithmetic word problems with verifiable integer answers: the tasks of the tiny world.

A problem is a short story about a quantity that changes through 1 to 3 operations
(``+ - * /``, divisions always exact, every intermediate value a non-negative integer), a
question, and a worked solution written one step per line::

    Mia has 14 shells. She finds 9 more. Then she gives away 5.
    How many shells does Mia have now?

    14 + 9 = 23
    23 - 5 = 18
    #### 18

Difficulty levels:

====  ==============================================================
1     one addition or subtraction (numbers up to 60)
2     one multiplication or exact division (tables up to 12 x 12)
3     two steps, any operations
4     three steps, any operations
====  ==============================================================

Everything is deterministic given a seed. Train and held-out problems never overlap: a
problem belongs to the held-out split iff a hash of its text falls in a fixed 10% bucket, and
every generator (SFT data, the pre-training corpus, later preference and RL data) filters on
that same rule, so no held-out question is ever seen in training.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

HELDOUT_PERCENT = 10
LEVELS = (1, 2, 3, 4)
MAX_VALUE = 999

NAMES = [
    ("Mia", "she"), ("Tom", "he"), ("Ava", "she"), ("Leo", "he"), ("Zoe", "she"),
    ("Sam", "he"), ("Ivy", "she"), ("Max", "he"), ("Lily", "she"), ("Ben", "he"),
    ("Emma", "she"), ("Noah", "he"), ("Ruby", "she"), ("Owen", "he"), ("Nora", "she"),
    ("Jack", "he"), ("Ella", "she"), ("Liam", "he"), ("Anna", "she"), ("Eli", "he"),
    ("Rosa", "she"), ("Omar", "he"), ("Kate", "she"), ("Hugo", "he"), ("Maya", "she"),
    ("Finn", "he"), ("Lucy", "she"), ("Adam", "he"), ("Iris", "she"), ("Ravi", "he"),
]
ITEMS = [
    "apples", "shells", "stickers", "marbles", "pencils", "cookies", "stamps", "coins",
    "books", "cards", "flowers", "eggs", "beads", "candles", "buttons", "rocks", "toys",
    "pears", "plums", "cupcakes", "balloons", "feathers", "crayons", "tickets", "nuts",
    "ribbons", "magnets", "blocks", "leaves", "lemons",
]
CONTAINERS = ["boxes", "bags", "jars", "baskets", "packs", "bowls", "crates", "trays"]

OPS = ("+", "-", "*", "/")


@dataclass(frozen=True)
class Step:
    """One line of a worked solution: ``a op b = result``."""

    a: int
    op: str
    b: int
    result: int

    def text(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.result}"


@dataclass(frozen=True)
class Problem:
    """A word problem, its worked solution and its integer answer."""

    question: str
    steps: tuple[Step, ...]
    level: int
    answer: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "answer", self.steps[-1].result)

    @property
    def solution(self) -> str:
        """The target response format: one step per line, then ``#### answer``."""
        return "\n".join(s.text() for s in self.steps) + f"\n#### {self.answer}"

    @property
    def split(self) -> str:
        return split_of(self.question)

    def messages(self) -> list[dict]:
        """A conversational SFT record: the question as the user turn, the solution as the reply."""
        return [
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": self.solution},
        ]


def split_of(question: str) -> str:
    """``"heldout"`` for a fixed 10% of all possible question texts, else ``"train"``."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def apply_op(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0 or a % b:
            raise ValueError(f"{a} / {b} is not an exact division")
        return a // b
    raise ValueError(f"unknown operator {op!r}")


# --------------------------------------------------------------------------- sentences
# Each operation on the running quantity has several phrasings; the quantity always
# belongs to the story's main character so a single question fits every story.


def _add_sentence(rng: random.Random, who: str, pron: str, item: str, b: int) -> str:
    friend = rng.choice([n for n, _ in NAMES if n != who])
    return rng.choice([
        f"{pron.capitalize()} buys {b} more.",
        f"{pron.capitalize()} finds {b} more {item}.",
        f"{friend} gives {'her' if pron == 'she' else 'him'} {b} more {item}.",
        f"Then {pron} gets {b} more {item}.",
    ])


def _sub_sentence(rng: random.Random, who: str, pron: str, item: str, b: int) -> str:
    friend = rng.choice([n for n, _ in NAMES if n != who])
    return rng.choice([
        f"{pron.capitalize()} gives {b} {item} to {friend}.",
        f"{pron.capitalize()} loses {b} of them.",
        f"Then {pron} gives away {b}.",
        f"{pron.capitalize()} sells {b} {item}.",
    ])


def _mul_sentence(rng: random.Random, who: str, pron: str, item: str, b: int) -> str:
    return rng.choice([
        f"Then the number of {item} becomes {b} times as large.",
        f"{pron.capitalize()} ends up with {b} times as many {item}.",
        f"After a trade {pron} has {b} times as many.",
    ])


def _div_sentence(rng: random.Random, who: str, pron: str, item: str, b: int) -> str:
    return rng.choice([
        f"{pron.capitalize()} shares them equally among {b} friends and keeps one share.",
        f"{pron.capitalize()} puts them into {b} equal groups and keeps one group.",
        f"{pron.capitalize()} splits them into {b} equal piles and keeps one pile.",
    ])


_SENTENCES = {"+": _add_sentence, "-": _sub_sentence, "*": _mul_sentence, "/": _div_sentence}


def _question(rng: random.Random, who: str, item: str) -> str:
    return rng.choice([
        f"How many {item} does {who} have now?",
        f"How many {item} does {who} have at the end?",
        f"How many {item} are left with {who}?",
    ])


# --------------------------------------------------------------------------- operands


def _pick_operand(rng: random.Random, value: int, op: str, small: bool) -> int | None:
    """An operand ``b`` such that ``value op b`` is a non-negative integer <= MAX_VALUE."""
    if op == "+":
        hi = min(60 if small else 99, MAX_VALUE - value)
        return rng.randint(2, hi) if hi >= 2 else None
    if op == "-":
        hi = min(value - 1, 60 if small else 99)
        return rng.randint(1, hi) if hi >= 1 else None
    if op == "*":
        hi = min(12, MAX_VALUE // max(value, 1))
        return rng.randint(2, hi) if hi >= 2 and value <= 99 else None
    if op == "/":
        divisors = [d for d in range(2, 13) if value % d == 0 and value // d >= 1]
        return rng.choice(divisors) if divisors else None
    raise ValueError(op)


def _one_step_problem(rng: random.Random, level: int) -> Problem:
    who, pron = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    if level == 1:
        op = rng.choice("+-")
        if op == "+":
            a, b = rng.randint(2, 60), rng.randint(2, 60)
        else:
            a = rng.randint(5, 60)
            b = rng.randint(1, a - 1)
        start = f"{who} has {a} {item}."
        question = f"{start} {_SENTENCES[op](rng, who, pron, item, b)} {_question(rng, who, item)}"
        return Problem(question, (Step(a, op, b, apply_op(a, op, b)),), level)
    # level 2: one multiplication or exact division
    op = rng.choice("*/")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        box = rng.choice(CONTAINERS)
        question = rng.choice([
            f"{who} has {a} {box} with {b} {item} in each. How many {item} does {who} have?",
            f"There are {a} {box}. Each holds {b} {item}. How many {item} are there in all?",
        ])
        return Problem(question, (Step(a, op, b, a * b),), level)
    b, q = rng.randint(2, 12), rng.randint(2, 12)
    a = b * q
    question = rng.choice([
        f"{who} has {a} {item} and shares them equally among {b} friends. "
        f"How many {item} does each friend get?",
        f"{who} puts {a} {item} into {b} equal groups. How many {item} are in each group?",
    ])
    return Problem(question, (Step(a, op, b, q),), level)


def _multi_step_problem(rng: random.Random, n_steps: int, level: int) -> Problem:
    while True:
        who, pron = rng.choice(NAMES)
        item = rng.choice(ITEMS)
        steps: list[Step] = []
        sentences: list[str] = []
        # The first step may be a "boxes of items" multiplication that sets the start value.
        if rng.random() < 0.3:
            a, b = rng.randint(2, 9), rng.randint(2, 12)
            box = rng.choice(CONTAINERS)
            sentences.append(f"{who} has {a} {box} with {b} {item} in each.")
            steps.append(Step(a, "*", b, a * b))
            value = a * b
        else:
            value = rng.randint(2, 60)
            sentences.append(f"{who} has {value} {item}.")
        ok = True
        while len(steps) < n_steps:
            op = rng.choice(OPS)
            b = _pick_operand(rng, value, op, small=False)
            if b is None:
                ok = False
                break
            result = apply_op(value, op, b)
            steps.append(Step(value, op, b, result))
            sentences.append(_SENTENCES[op](rng, who, pron, item, b))
            value = result
        if not ok or len({s.op for s in steps}) < 2:
            continue
        question = " ".join(sentences) + " " + _question(rng, who, item)
        return Problem(question, tuple(steps), level)


def make_problem(rng: random.Random, level: int) -> Problem:
    """One random problem of the given difficulty level (1-4)."""
    if level in (1, 2):
        return _one_step_problem(rng, level)
    if level in (3, 4):
        return _multi_step_problem(rng, level - 1, level)
    raise ValueError(f"level must be one of {LEVELS}, got {level}")


def generate_problems(
    n: int,
    *,
    seed: int,
    split: str = "train",
    levels: tuple[int, ...] = LEVELS,
    weights: tuple[float, ...] | None = None,
    unique: bool = True,
) -> list[Problem]:
    """``n`` problems of the given split (``"train"`` or ``"heldout"``), deterministic in ``seed``.

    Levels are drawn round-robin (or with ``weights``); problems of the other split are
    rejected, so the two splits never share a question text. With ``unique`` no question
    repeats within the returned list.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"posttrain-world-{split}-{seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise RuntimeError(f"could not generate {n} unique {split} problems")
        if weights is None:
            level = levels[len(out) % len(levels)]
        else:
            level = rng.choices(levels, weights=weights)[0]
        p = make_problem(rng, level)
        if p.split != split or (unique and p.question in seen):
            continue
        seen.add(p.question)
        out.append(p)
    return out
