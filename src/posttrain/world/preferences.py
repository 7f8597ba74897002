"""Preference data for the tiny world: pairs, unpaired labels and reward-scored K-sets.

Wrong answers are *plausible*: a worked solution with exactly one slip, propagated through
the remaining steps the way a model's mistake would be:

* ``copy``: an operand copied wrongly from the question (one digit changed: 18 -> 15),
* ``arith``: one step's result off by a small amount (23 -> 24, 23 -> 33),
* ``operator``: one step uses the wrong operation (+ instead of -, * instead of /).

Every record uses the standard formats of :mod:`posttrain.data.formats` with chat messages,
and only questions of the requested split, so held-out questions never reach training.

:func:`score_solution` is the scalar reward of the K-set generator: 1.0 for a correct,
well-formed solution; otherwise 0.5 x the fraction of leading steps that are correct.
"""

from __future__ import annotations

import random

from .grader import extract_answer, is_format_compliant
from .tasks import Problem, Step, apply_op, generate_problems

SLIP_KINDS = ("copy", "arith", "operator")


def _solution_text(steps: list[Step]) -> str:
    return "\n".join(s.text() for s in steps) + f"\n#### {steps[-1].result}"


def _replay(first: list[Step], rest: list[Step], value: int) -> list[Step] | None:
    """Re-run the remaining steps starting from a (possibly wrong) value; None if it breaks."""
    out = list(first)
    for s in rest:
        try:
            r = apply_op(value, s.op, s.b)
        except ValueError:
            return None
        if r < 0:
            return None
        out.append(Step(value, s.op, s.b, r))
        value = r
    return out


def _change_digit(rng: random.Random, n: int) -> int:
    digits = list(str(n))
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0" and len(digits) > 1)]
    digits[i] = rng.choice(choices)
    return int("".join(digits))


def slipped_solution(p: Problem, rng: random.Random, kind: str | None = None) -> str | None:
    """A worked solution for ``p`` with one slip of the given kind (random if None).

    Returns None when that kind of slip cannot produce a valid, different answer here.
    """
    kind = kind or rng.choice(SLIP_KINDS)
    steps = list(p.steps)
    k = rng.randrange(len(steps))
    s = steps[k]
    if kind == "copy":
        b = _change_digit(rng, s.b)
        if s.op == "/" and (b == 0 or s.a % b):
            return None
        try:
            r = apply_op(s.a, s.op, b)
        except ValueError:
            return None
        if r < 0:
            return None
        new = _replay(steps[:k] + [Step(s.a, s.op, b, r)], steps[k + 1 :], r)
    elif kind == "arith":
        r = s.result + rng.choice([-10, -2, -1, 1, 2, 10])
        if r < 0:
            return None
        new = _replay(steps[:k] + [Step(s.a, s.op, s.b, r)], steps[k + 1 :], r)
    elif kind == "operator":
        swaps = {"+": "-", "-": "+", "*": "+", "/": "*"}
        op = swaps[s.op]
        try:
            r = apply_op(s.a, op, s.b)
        except ValueError:
            return None
        if r < 0 or r > 999:
            return None
        new = _replay(steps[:k] + [Step(s.a, op, s.b, r)], steps[k + 1 :], r)
    else:
        raise ValueError(f"unknown slip kind {kind!r}; valid: {SLIP_KINDS}")
    if new is None or new[-1].result == p.answer:
        return None
    return _solution_text(new)


def wrong_solution(p: Problem, rng: random.Random) -> str:
    """A plausible wrong solution (some slip kind always works for world problems)."""
    for _ in range(50):
        text = slipped_solution(p, rng)
        if text is not None:
            return text
    # fall back to an arithmetic slip in the last step, which is always possible
    last = p.steps[-1]
    wrong = last.result + 1
    return _solution_text(list(p.steps[:-1]) + [Step(last.a, last.op, last.b, wrong)])


def score_solution(p: Problem, text: str) -> float:
    """1.0 if correct and well formed; else 0.5 x the fraction of leading steps that are right."""
    if is_format_compliant(text) and extract_answer(text) == p.answer:
        return 1.0
    lines = [ln.strip() for ln in text.strip().splitlines()]
    good = 0
    for expected, line in zip(p.steps, lines):
        if line != expected.text():
            break
        good += 1
    return 0.5 * good / len(p.steps)


def _user(p: Problem) -> list[dict]:
    return [{"role": "user", "content": p.question}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def preference_records(n: int, *, seed: int, split: str = "train") -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` pairs: the worked solution vs a one-slip solution."""
    rng = random.Random(f"world-pairs-{split}-{seed}")
    return [
        {"prompt": _user(p), "chosen": _assistant(p.solution), "rejected": _assistant(wrong_solution(p, rng))}
        for p in generate_problems(n, seed=seed + 1000, split=split)
    ]


def unpaired_records(n: int, *, seed: int, split: str = "train", desirable_fraction: float = 0.5) -> list[dict]:
    """``{"prompt", "completion", "label"}`` KTO examples: correct (true) or one-slip (false)."""
    rng = random.Random(f"world-unpaired-{split}-{seed}")
    out = []
    for p in generate_problems(n, seed=seed + 2000, split=split):
        good = rng.random() < desirable_fraction
        text = p.solution if good else wrong_solution(p, rng)
        out.append({"prompt": _user(p), "completion": _assistant(text), "label": good})
    return out


def ranked_records(n: int, *, k: int = 4, seed: int, split: str = "train") -> list[dict]:
    """``{"prompt", "responses", "rewards"}`` K-sets: the correct solution plus K-1 slipped ones,
    scored by :func:`score_solution`, in random order."""
    if k < 2:
        raise ValueError("a ranked set needs at least 2 responses")
    rng = random.Random(f"world-ranked-{split}-{seed}")
    out = []
    for p in generate_problems(n, seed=seed + 3000, split=split):
        texts = [p.solution]
        for _ in range(100 * k):  # distinct wrong answers where the problem allows that many
            if len(texts) == k:
                break
            t = wrong_solution(p, rng)
            if t not in texts:
                texts.append(t)
        while len(texts) < k:
            texts.append(wrong_solution(p, rng))
        rng.shuffle(texts)
        out.append({"prompt": _user(p), "responses": [_assistant(t) for t in texts],
                    "rewards": [score_solution(p, t) for t in texts]})
    return out


def first_wrong_line(p: Problem, text: str) -> int | None:
    """The index of the first line of ``text`` that differs from ``p``'s worked solution (one line
    per step, then ``#### answer``), or None when the solution is the worked one."""
    ref = p.solution.splitlines()
    lines = text.splitlines()
    for i, (a, b) in enumerate(zip(ref, lines)):
        if a.strip() != b.strip():
            return i
    return None if len(ref) == len(lines) else min(len(ref), len(lines))


def step_records(n: int, *, seed: int, split: str = "train", correct_fraction: float = 0.5) -> list[dict]:
    """``{"prompt", "completions", "labels", "answer", "first_error"}`` stepwise records: the worked
    solution (every step right) or a one-slip solution, whose steps are right up to the slip and
    wrong from it on (the slip propagates to the answer). ``labels`` are these gold step labels,
    known by construction; ``first_error`` is the slipped step's index (None when correct)."""
    rng = random.Random(f"world-steps-{split}-{seed}")
    out = []
    for p in generate_problems(n, seed=seed + 4000, split=split):
        text = p.solution if rng.random() < correct_fraction else wrong_solution(p, rng)
        steps = text.splitlines()
        first = first_wrong_line(p, text)
        labels = [first is None or i < first for i in range(len(steps))]
        out.append({"prompt": _user(p), "completions": steps, "labels": labels, "answer": str(p.answer),
                    "first_error": first})
    return out
