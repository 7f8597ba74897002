"""Verifiable rewards: the tiny world's verifier, a format reward and a GSM8K-style answer grader.

``world_correct``
    :func:`posttrain.world.grader.is_correct` as a reward: 1.0 when the final answer the world's
    grader extracts from the completion (last ``#### n``, else last ``\\boxed{n}``, else last
    "answer is n", else the last number) equals the record's ``answer``, else 0.0. It is the
    same verifier as the world's evaluation (``posttrain.world.evaluate``); it does not look at
    ``finished``. None (sample excluded and counted) when the record's answer is not a number.

``format``
    1.0 when the generation *finished* (stopped on a stop token, ``finished=True``) **and** the
    last non-empty line of the completion is a final-answer line ``#### <number>``, else 0.0.
    ``<number>`` is what the grader reads: an optional sign, digits with optional thousands
    commas and an optional decimal part (``#### 18``, ``#### -3``, ``#### 1,000``,
    ``#### 2.5``); spaces around it are allowed, nothing else on the line (no ``$``, units or
    trailing period). That is the last line of every SFT target of the tiny world (see
    :attr:`posttrain.world.tasks.Problem.solution`) and of GSM8K solutions. The correctness of
    the number is not checked (that is ``world_correct`` / ``math_answer``).
    With the option ``format_strict=True`` the world's strict format is required instead
    (:func:`posttrain.world.grader.is_format_compliant`, what the world's evaluation reports as
    ``format_ok``): every line before ``#### n`` is a step ``a op b = c``, ``n`` an integer.

``math_answer``
    A GSM8K-style grader of the record's ``answer``: 1.0 when the completion's final answer
    equals it numerically, else 0.0. The final answer is, in order: the number after the last
    ``####``; the content of the last ``\\boxed{...}``; the number after the last "answer is" /
    "answer:"; the last number in the text. Numbers are normalized: thousands commas
    (``1,000``), a leading ``$`` / ``\\$``, a trailing period, ``42.0 == 42``, exact fractions
    and decimals (``3/4 == 0.75``, ``\\frac{3}{4}``), unicode minus. The record's ``answer`` may
    be a number or a string, including a whole GSM8K solution ending in ``#### 42`` (its final
    answer is extracted the same way). None (excluded and counted) when the record's answer
    holds no number.

Each factory returns a plain function with a ``needs_fields`` attribute (the record fields it
reads), which :func:`posttrain.rewards.resolve_reward_functions` copies into the
:class:`~posttrain.rewards.RewardFunction`.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from ..errors import ConfigError
from ..world.grader import is_correct, is_format_compliant, parse_number

# -------------------------------------------------------------------------- number parsing

# A number: thousands groups (1,000,000) or plain digits, optional decimal part; or .5
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
# A sign counts only when it does not follow a word character or ')' ("10-5" is 10 and 5).
_SIGNED = r"(?:(?<![\w)])[-+])?(?:" + _UNSIGNED + r")"
# One number expression: \frac{a}{b} (also \dfrac, \tfrac, with a leading sign), a/b, or a number.
_EXPR_RE = re.compile(
    r"(?P<fsign>(?<![\w)])[-+])?\\[dt]?frac\{\s*(?P<fnum>" + _SIGNED + r")\s*\}\{\s*(?P<fden>" + _SIGNED + r")\s*\}"
    r"|(?<![\d/.])(?P<num>" + _SIGNED + r")\s*/\s*(?P<den>" + _UNSIGNED + r")(?![\d/])"
    r"|(?P<plain>" + _SIGNED + r")"
)
_HASH_RE = re.compile(r"####")
_PHRASE_RE = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)
_BOXED = "\\boxed"
_FINAL_LINE_RE = re.compile(r"^####\s*[-+]?\d[\d,]*(?:\.\d+)?$")


def _number(text: str) -> Fraction | None:
    value = parse_number(text)  # the world grader's normalization: commas, 42.0 == 42, exact decimals
    return None if value is None else Fraction(value)


def _expr_value(m: re.Match) -> Fraction | None:
    if m.group("plain") is not None:
        return _number(m.group("plain"))
    if m.group("num") is not None:
        a, b = _number(m.group("num")), _number(m.group("den"))
    else:
        a, b = _number(m.group("fnum")), _number(m.group("fden"))
        if a is not None and m.group("fsign") == "-":
            a = -a
    if a is None or b is None or b == 0:
        return None
    return a / b


def _clean(text: str) -> str:
    """Unicode minus, ``\\$`` / ``$`` and LaTeX thin spaces out of the way of the number pattern."""
    return (text.replace("\u2212", "-").replace("\\$", "").replace("$", "").replace("\\!", "")
            .replace("\\,", "").replace("{,}", ","))


def _first_number(text: str) -> Fraction | None:
    for m in _EXPR_RE.finditer(_clean(text)):
        value = _expr_value(m)
        if value is not None:
            return value
    return None


def _last_number(text: str) -> Fraction | None:
    for m in reversed(list(_EXPR_RE.finditer(_clean(text)))):
        value = _expr_value(m)
        if value is not None:
            return value
    return None


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces matched), or None."""
    start = text.rfind(_BOXED + "{")
    while start >= 0:
        i, depth = start + len(_BOXED) + 1, 1
        j = i
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            return text[i : j - 1]
        start = text.rfind(_BOXED + "{", 0, start)
    return None


def _rest_of_line(text: str, pos: int) -> str:
    end = text.find("\n", pos)
    return text[pos:] if end < 0 else text[pos:end]


def extract_final_answer(text: str) -> Fraction | None:
    """The final numeric answer of a GSM8K/MATH-style solution (see the module docstring), or None."""
    if not isinstance(text, str):
        return None
    hashes = list(_HASH_RE.finditer(text))
    if hashes:
        value = _first_number(_rest_of_line(text, hashes[-1].end()))
        if value is not None:
            return value
    boxed = _last_boxed(text)
    if boxed is not None:
        value = _first_number(boxed)
        if value is not None:
            return value
    phrases = list(_PHRASE_RE.finditer(text))
    if phrases:
        value = _first_number(_rest_of_line(text, phrases[-1].end()))
        if value is not None:
            return value
    return _last_number(text)


def reference_answer(answer) -> Fraction | None:
    """A record's ``answer`` as an exact number: an int / float, or a string holding a number,
    a fraction or a whole solution (its final answer). None when there is none."""
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, int):
        return Fraction(answer)
    if isinstance(answer, float):
        return Fraction(repr(answer)) if math.isfinite(answer) else None  # 0.1 -> 1/10, not the binary value
    if isinstance(answer, str):
        return extract_final_answer(answer)
    return None


def answers_match(completion: str, answer) -> bool | None:
    """True / False when the completion's final answer equals the reference; None when the
    reference holds no number."""
    expected = reference_answer(answer)
    if expected is None:
        return None
    got = extract_final_answer(completion)
    return got is not None and got == expected


def has_final_answer_line(text: str) -> bool:
    """Whether the last non-empty line of ``text`` is ``#### <number>`` (see the module docstring)."""
    lines = [ln.strip() for ln in text.strip().split("\n")]
    return bool(lines) and bool(_FINAL_LINE_RE.match(lines[-1]))


# -------------------------------------------------------------------------- reward functions


def world_correct_reward(**_options):
    """Factory of ``world_correct`` (no options)."""

    def world_correct(prompts, completions, *, answer, **kwargs):
        out: list[float | None] = []
        for text, ref in zip(completions, answer, strict=True):
            if isinstance(ref, bool) or parse_number(str(ref)) is None:
                out.append(None)  # a reference the world grader cannot read: excluded and counted
            else:
                out.append(1.0 if is_correct(text, ref) else 0.0)
        return out

    world_correct.needs_fields = ("answer",)
    return world_correct


def format_reward(*, format_strict: bool = False, **_options):
    """Factory of ``format``; ``format_strict`` selects the world's strict step format."""
    if not isinstance(format_strict, bool):
        raise ConfigError(f"Config key 'reward.format_strict' has value {format_strict!r}; expected true or false.",
                          fix="set reward.format_strict=true (the world's step format) or false (a final "
                          "'#### <number>' line).")

    def format_ok(prompts, completions, *, finished, **kwargs):
        if format_strict:
            return [1.0 if is_format_compliant(t, bool(f)) else 0.0 for t, f in zip(completions, finished, strict=True)]
        return [1.0 if (f and has_final_answer_line(t)) else 0.0 for t, f in zip(completions, finished, strict=True)]

    format_ok.needs_fields = ()
    return format_ok


def math_answer_reward(**_options):
    """Factory of ``math_answer`` (no options)."""

    def math_answer(prompts, completions, *, answer, **kwargs):
        out: list[float | None] = []
        for text, ref in zip(completions, answer, strict=True):
            ok = answers_match(text, ref)
            out.append(None if ok is None else float(ok))
        return out

    math_answer.needs_fields = ("answer",)
    return math_answer
