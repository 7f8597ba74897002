"""AI feedback in the tiny world: its constitution, and data to train a small judge and reviser.

The tiny model cannot critique in open prose, so the world makes the Constitutional AI roles
real but small (note 001 §13): a **judge** that answers whether a worked solution follows a
principle (or which of two follows it better), and a **reviser** that names the first wrong
step and rewrites the solution. Both are trained with ``posttrain sft`` on records built here by
construction, in exactly the prompt layout ``posttrain cai`` uses (the judge templates of
:mod:`posttrain.rewards.judge`, and the critique / revision conversation of Bai et al. 2022), so
the same loop runs with the world's models or with any instruct model.

The world's constitution (:data:`WORLD_CONSTITUTION`) has two principles:

* ``arithmetic`` — every step of the solution is right. Critique: ``Step k is wrong.`` (the
  first wrong step, 1-based) or ``Every step is right.``; revision: the steps recomputed from
  the question (the worked solution's steps), the answer line kept as it was (present or not).
* ``answer-line`` — the solution ends with ``#### N``. Critique: ``The answer line is
  missing.`` or ``The answer line is there.``; revision: the same steps, ending with
  ``#### <last step's result>``.

Responses in the records are the worked solution or a one-slip solution
(:func:`posttrain.world.preferences.wrong_solution`), with the answer line dropped at a rate.
"""

from __future__ import annotations

import random
import re

from ..rewards.judge import (
    DEFAULT_COMPARE_TEMPLATE,
    DEFAULT_SCORE_TEMPLATE,
    REASONING_COMPARE_TEMPLATE,
    REASONING_SCORE_TEMPLATE,
    Principle,
)
from ..rewards.judge import load_constitution as load_constitution_file
from .preferences import wrong_solution
from .tasks import Problem, generate_problems

WORLD_CONSTITUTION: tuple[Principle, ...] = (
    Principle(name="arithmetic",
              critique_request="Which step of your solution is wrong, if any?",
              revision_request="Rewrite your solution so that every step is right.",
              principle="Every step of the solution is right."),
    Principle(name="answer-line",
              critique_request="Does your solution end with the answer line #### N?",
              revision_request="Rewrite your solution so that it ends with the answer line #### N.",
              principle="The solution ends with the answer line #### N."),
)
BUILTIN_CONSTITUTION = "builtin:world"


def load_constitution(spec) -> list[Principle]:
    """``builtin:world`` (:data:`WORLD_CONSTITUTION`), or a YAML file of principles
    (:func:`posttrain.rewards.judge.load_constitution`, which refuses other ``builtin:`` names)."""
    if str(spec) == BUILTIN_CONSTITUTION:
        return list(WORLD_CONSTITUTION)
    return load_constitution_file(spec)


_ANSWER_LINE = re.compile(r"^####\s*\S+$")


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.strip().splitlines() if ln.strip()]


def has_answer_line(text: str) -> bool:
    lines = _lines(text)
    return bool(lines) and bool(_ANSWER_LINE.match(lines[-1]))


def step_lines(text: str) -> list[str]:
    """The solution's lines without a final ``#### N`` line."""
    lines = _lines(text)
    return lines[:-1] if lines and _ANSWER_LINE.match(lines[-1]) else lines


def first_wrong_step(p: Problem, text: str) -> int | None:
    """0-based index of the first step line that differs from the worked solution's (a missing or
    extra step counts), or None when every step is right."""
    ref = [s.text() for s in p.steps]
    got = step_lines(text)
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            return i
    return None if len(ref) == len(got) else min(len(ref), len(got))


def follows(principle: str, p: Problem, text: str) -> bool:
    """Gold verdict: does ``text`` follow the named world principle for problem ``p``?"""
    if principle == "arithmetic":
        return first_wrong_step(p, text) is None
    if principle == "answer-line":
        return has_answer_line(text)
    raise ValueError(f"unknown world principle {principle!r}")


def critique(principle: str, p: Problem, text: str) -> str:
    """The world's gold critique of ``text`` under a principle."""
    if principle == "arithmetic":
        k = first_wrong_step(p, text)
        return "Every step is right." if k is None else f"Step {k + 1} is wrong."
    if principle == "answer-line":
        return "The answer line is there." if has_answer_line(text) else "The answer line is missing."
    raise ValueError(f"unknown world principle {principle!r}")


def revision(principle: str, p: Problem, text: str) -> str:
    """The world's gold revision of ``text`` under a principle (see the module docstring)."""
    if principle == "arithmetic":
        steps = [s.text() for s in p.steps]
        return "\n".join(steps + ([f"#### {p.answer}"] if has_answer_line(text) else []))
    if principle == "answer-line":
        steps = step_lines(text)
        if has_answer_line(text) or not steps:
            return text.strip()
        last = steps[-1].rsplit("=", 1)[-1].strip()
        return "\n".join(steps + [f"#### {last}"])
    raise ValueError(f"unknown world principle {principle!r}")


def world_response(p: Problem, rng: random.Random, *, wrong_fraction: float = 0.5,
                   drop_answer_fraction: float = 0.2) -> str:
    """The worked solution or a one-slip one, with the ``#### N`` line dropped at a rate."""
    text = wrong_solution(p, rng) if rng.random() < wrong_fraction else p.solution
    if rng.random() < drop_answer_fraction:
        text = "\n".join(step_lines(text))
    return text


def conversation(question: str, response: str, principle: Principle, critique_text: str | None = None,
                 revision_text: str | None = None) -> list[dict]:
    """The critique / revision conversation of Bai et al.: question, response, critique request,
    critique, revision request, revision (as far as the texts given)."""
    msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": response},
            {"role": "user", "content": principle.critique_request}]
    if critique_text is None:
        return msgs
    msgs += [{"role": "assistant", "content": critique_text},
             {"role": "user", "content": principle.revision_request}]
    if revision_text is not None:
        msgs.append({"role": "assistant", "content": revision_text})
    return msgs


def revise_records(n: int, *, seed: int, split: str = "train") -> list[dict]:
    """Prompt/completion records for the reviser: for each problem, one response and a principle,
    giving two records (the critique after the critique request; the revision after the revision
    request), so only the reviser's own turns carry loss."""
    rng = random.Random(f"world-revise-{split}-{seed}")
    out = []
    for p in generate_problems(n, seed=seed + 5000, split=split):
        text = world_response(p, rng)
        pr = rng.choice(WORLD_CONSTITUTION)
        crit, rev = critique(pr.name, p, text), revision(pr.name, p, text)
        out.append({"prompt": conversation(p.question, text, pr),
                    "completion": [{"role": "assistant", "content": crit}]})
        out.append({"prompt": conversation(p.question, text, pr, crit),
                    "completion": [{"role": "assistant", "content": rev}]})
    return out


def judge_records(n: int, *, seed: int, split: str = "train", compare_fraction: float = 0.5,
                  reasoning: bool = False, score_template: str | None = None,
                  compare_template: str | None = None) -> list[dict]:
    """Prompt/completion records for the judge, in the judge templates' layout: *score* records
    (one response, answer ``Yes`` / ``No``: does it follow the principle) and *compare* records
    (two responses of which exactly one follows the principle, in random order, answer ``A`` /
    ``B``). With ``reasoning`` (the reasoning templates) the judge first writes the worked
    solution of the question, then its answer on the last line: it re-solves the problem and
    compares, instead of verifying arithmetic in one token."""
    score_template = score_template or (REASONING_SCORE_TEMPLATE if reasoning else DEFAULT_SCORE_TEMPLATE)
    compare_template = compare_template or (REASONING_COMPARE_TEMPLATE if reasoning else DEFAULT_COMPARE_TEMPLATE)
    rng = random.Random(f"world-judge-{split}-{seed}")
    out = []
    for p in generate_problems(n, seed=seed + 6000, split=split):
        pr = rng.choice(WORLD_CONSTITUTION)
        if rng.random() < compare_fraction:
            good = revision(pr.name, p, world_response(p, rng))
            bad = None
            for _ in range(50):
                cand = world_response(p, rng, wrong_fraction=1.0 if pr.name == "arithmetic" else 0.5,
                                      drop_answer_fraction=1.0 if pr.name == "answer-line" else 0.2)
                if not follows(pr.name, p, cand):
                    bad = cand
                    break
            if bad is None or not follows(pr.name, p, good):
                continue
            first_good = rng.random() < 0.5
            a, b = (good, bad) if first_good else (bad, good)
            q = compare_template.format(principle=pr.principle, prompt=p.question, response_a=a, response_b=b)
            answer = "A" if first_good else "B"
        else:
            text = world_response(p, rng)
            q = score_template.format(principle=pr.principle, prompt=p.question, response=text)
            answer = "Yes" if follows(pr.name, p, text) else "No"
        if reasoning:
            answer = p.solution + "\n" + answer
        out.append({"prompt": [{"role": "user", "content": q}],
                    "completion": [{"role": "assistant", "content": answer}]})
    return out


__all__ = ["BUILTIN_CONSTITUTION", "WORLD_CONSTITUTION", "conversation", "critique", "first_wrong_step", "follows",
           "has_answer_line", "judge_records", "load_constitution", "revise_records", "revision", "step_lines",
           "world_response"]
