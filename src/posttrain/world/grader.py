"""Answer extraction and grading for the tiny world (and GSM8K-style data).

:func:`extract_answer` finds the final answer in free text, trying in order:

1. the last ``#### 42`` marker (GSM8K style, also the tiny world's own format);
2. the last ``\\boxed{42}``;
3. the last ``answer is 42`` / ``answer: 42`` phrase;
4. the last number anywhere in the text.

Numbers may carry a sign, thousands separators (``1,234``) and a decimal part (``42.0``
equals 42). :func:`is_format_compliant` is the strict check of the world's response format
(solution lines ``a op b = c``, then ``#### n`` as the last line, and the model stopped by
itself rather than running out of tokens).
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUM = r"[-+]?\d[\d,]*(?:\.\d+)?"
_HASH_RE = re.compile(r"####\s*\$?\s*(" + _NUM + ")")
_BOXED_RE = re.compile(r"\\boxed\{\s*\$?\s*(" + _NUM + r")\s*\}")
_PHRASE_RE = re.compile(r"answer\s*(?:is|:|=)\s*\$?\s*(" + _NUM + ")", re.IGNORECASE)
_ANY_NUM_RE = re.compile(_NUM)
_STEP_LINE_RE = re.compile(r"^-?\d+ [-+*/] -?\d+ = -?\d+$")
_FINAL_LINE_RE = re.compile(r"^#### -?\d+$")


def parse_number(text: str) -> int | Fraction | None:
    """``"1,234"`` -> 1234, ``"42.0"`` -> 42, ``"2.5"`` -> Fraction(5, 2); None if not a number."""
    cleaned = text.replace(",", "").strip()
    if not cleaned or cleaned in "+-":
        return None
    try:
        value = Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None
    return int(value) if value.denominator == 1 else value


def extract_answer(text: str) -> int | Fraction | None:
    """The final numeric answer in ``text`` (see module docstring for the order), or None."""
    for pattern in (_HASH_RE, _BOXED_RE, _PHRASE_RE, _ANY_NUM_RE):
        matches = pattern.findall(text)
        for raw in reversed(matches):
            value = parse_number(raw)
            if value is not None:
                return value
    return None


def is_correct(text: str, answer: int | str) -> bool:
    """True iff the answer extracted from ``text`` equals ``answer``."""
    expected = parse_number(str(answer))
    got = extract_answer(text)
    return got is not None and expected is not None and got == expected


def is_format_compliant(text: str, finished: bool = True) -> bool:
    """Strict world format: ``a op b = c`` lines, then ``#### n`` last; stopped on its own."""
    if not finished:
        return False
    lines = [ln.strip() for ln in text.strip().split("\n")]
    if not lines or not _FINAL_LINE_RE.match(lines[-1]):
        return False
    return all(_STEP_LINE_RE.match(ln) for ln in lines[:-1]) and len(lines) >= 2
