"""AI feedback: a judge model prompted with a principle, parsed strictly, and constitutions.

The building blocks of RLAIF / Constitutional AI (note 001 §13):

* :class:`Judge` — a causal LM with a chat template, asked (greedily) either to *compare* two
  responses under a principle (answer ``A`` or ``B``) or to *score* one (answer ``Yes`` or
  ``No``). The prompts are templates the user can replace (``str.format`` fields named below).
* :func:`parse_choice` / :func:`parse_verdict` — strict parsers: the whole answer must match
  (after trimming whitespace and a final period); anything else is *unparseable* and counted,
  never guessed.
* :func:`compare_both_orders` — every comparison is asked twice, with the responses swapped;
  a preference counts only when both orders pick the same response (position bias cancels),
  and the agreement rate is reported.
* :func:`load_constitution` — a YAML list of principles, each with a ``critique_request`` and a
  ``revision_request`` (Bai et al. 2022), read with a safe loader.

The ``posttrain cai`` loop (:mod:`posttrain.algorithms.cai`) uses them: generate -> critique ->
revise -> SFT data and AI-labelled pairs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError

#: fields: principle, prompt, response_a, response_b
DEFAULT_COMPARE_TEMPLATE = (
    "Principle: {principle}\n\nQuestion:\n{prompt}\n\nResponse A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
    "Which response follows the principle better? Answer with exactly one letter, A or B."
)
#: fields: principle, prompt, response
DEFAULT_SCORE_TEMPLATE = (
    "Principle: {principle}\n\nQuestion:\n{prompt}\n\nResponse:\n{response}\n\n"
    "Does the response follow the principle? Answer with exactly one word, Yes or No."
)

#: reasoning judges (``Judge(reasoning=True)``) may work the question out first; only the last
#: line of the answer is parsed. fields as above.
REASONING_COMPARE_TEMPLATE = (
    "Principle: {principle}\n\nQuestion:\n{prompt}\n\nResponse A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
    "Which response follows the principle better? Work it out, then write exactly one letter, A or B, on the last line."
)
REASONING_SCORE_TEMPLATE = (
    "Principle: {principle}\n\nQuestion:\n{prompt}\n\nResponse:\n{response}\n\n"
    "Does the response follow the principle? Work it out, then write exactly one word, Yes or No, on the last line."
)

_CHOICE = re.compile(r"^(?:answer\s*:\s*)?\(?([ab])\)?$", re.IGNORECASE)
_VERDICT = re.compile(r"^(?:answer\s*:\s*)?(yes|no)$", re.IGNORECASE)


def _clean(text: str) -> str:
    t = text.strip()
    return t[:-1].rstrip() if t.endswith(".") else t


def parse_choice(text: str) -> str | None:
    """``"A"`` or ``"B"`` when the whole answer is that letter (``A``, ``b``, ``(A)``, ``Answer: B``,
    a final period allowed); otherwise None (unparseable)."""
    m = _CHOICE.match(_clean(text))
    return m.group(1).upper() if m else None


def parse_verdict(text: str) -> bool | None:
    """True for ``Yes``, False for ``No`` (the whole answer, case-insensitive, ``Answer:`` and a
    final period allowed); otherwise None (unparseable)."""
    m = _VERDICT.match(_clean(text))
    return None if m is None else m.group(1).lower() == "yes"


@dataclass
class Comparison:
    """Both-order comparisons of pairs (x_i, y_i): ``preferred[i]`` is 0 (x) or 1 (y) when both
    orders agree, else None. Counts: ``unparseable`` answers, ``inconsistent`` pairs (both parsed,
    different picks: position bias or indifference), ``agreed`` pairs."""

    preferred: list[int | None]
    unparseable: int = 0
    inconsistent: int = 0
    agreed: int = 0
    answers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def agreement_rate(self) -> float:
        """Agreed pairs over pairs whose two answers both parsed."""
        parsed = self.agreed + self.inconsistent
        return self.agreed / parsed if parsed else float("nan")


def compare_both_orders(ask: Callable[[list[str]], list[str]], prompts: Sequence[str], xs: Sequence[str],
                        ys: Sequence[str], *, principle: str, template: str = DEFAULT_COMPARE_TEMPLATE) -> Comparison:
    """Ask the judge (``ask(judge prompts) -> answers``) about every pair in both orders."""
    if not (len(prompts) == len(xs) == len(ys)):
        raise ValueError("prompts, xs and ys must have the same length")
    fwd = [template.format(principle=principle, prompt=p, response_a=x, response_b=y)
           for p, x, y in zip(prompts, xs, ys)]
    rev = [template.format(principle=principle, prompt=p, response_a=y, response_b=x)
           for p, x, y in zip(prompts, xs, ys)]
    answers = ask(fwd + rev)
    if len(answers) != 2 * len(prompts):
        raise ValueError(f"the judge returned {len(answers)} answers for {2 * len(prompts)} questions")
    out = Comparison(preferred=[], answers=list(zip(answers[: len(prompts)], answers[len(prompts):])))
    for a_fwd, a_rev in out.answers:
        c1, c2 = parse_choice(a_fwd), parse_choice(a_rev)
        out.unparseable += (c1 is None) + (c2 is None)
        if c1 is None or c2 is None:
            out.preferred.append(None)
            continue
        pick1 = 0 if c1 == "A" else 1   # forward order: A = x
        pick2 = 1 if c2 == "A" else 0   # swapped order: A = y
        if pick1 == pick2:
            out.agreed += 1
            out.preferred.append(pick1)
        else:
            out.inconsistent += 1
            out.preferred.append(None)
    return out


def check_template(template: str, fields: set[str], key: str) -> None:
    """Refuse a prompt template that names a field we do not fill, or lacks one we need."""
    import string

    named = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    unknown = named - fields
    if unknown:
        raise ConfigError(f"{key} names the field(s) {sorted(unknown)}, which are not filled in; it may use "
                          f"{sorted(fields)}.", fix="remove them, or double the braces ({{ }}) for literal text.")
    missing = fields - named
    if missing:
        raise ConfigError(f"{key} does not use {sorted(missing)}, so the judge would not see them.",
                          fix=f"write the template with every field of {sorted(fields)}.")


def chat_replies(model, tokenizer, conversations: list, *, max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0, batch_size: int = 64) -> list:
    """One reply (a :class:`posttrain.rollout.Rollout`) to each conversation (a message
    list, or a string as one user turn), chat-rendered; None where prompt + ``max_new_tokens``
    would not fit the model's context."""
    from ..data.chat import render_prompt
    from ..models.loading import max_positions
    from ..rollout import HFSampler, SamplingParams, requests

    limit = max_positions(model.config)
    ids = [render_prompt(tokenizer, c) for c in conversations]
    ok = [i for i, x in enumerate(ids) if limit is None or len(x) + max_new_tokens <= limit]
    rolls = HFSampler(model, tokenizer, batch_size=batch_size).generate(
        requests([ids[i] for i in ok]), SamplingParams(max_new_tokens, temperature, seed=seed)) if ok else []
    out = [None] * len(conversations)
    for i, r in zip(ok, rolls):
        out[i] = r
    return out


def final_line(text: str) -> str:
    """The last non-empty line of a reasoning judge's answer (what is parsed)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class Judge:
    """A causal LM judging under a principle (greedy answers of at most ``max_new_tokens``).

    With ``reasoning=True`` the judge may work the question out before answering (a generative
    verifier); only its answer's last non-empty line is parsed, as strictly as a whole answer,
    and the full answers of the last call are kept in ``last_answers``."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 8, batch_size: int = 64,
                 compare_template: str = DEFAULT_COMPARE_TEMPLATE, score_template: str = DEFAULT_SCORE_TEMPLATE,
                 reasoning: bool = False):
        check_template(compare_template, {"principle", "prompt", "response_a", "response_b"}, "judge.compare_template")
        check_template(score_template, {"principle", "prompt", "response"}, "judge.score_template")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.compare_template, self.score_template = compare_template, score_template
        self.too_long = 0   # questions longer than the judge's context (answered "", so unparseable)
        self.reasoning = reasoning
        self.last_answers: list[str] = []

    def ask(self, questions: list[str]) -> list[str]:
        """Greedy answers; a question that does not fit the judge's context gets "" (unparseable)
        and is counted in ``too_long``."""
        rolls = chat_replies(self.model, self.tokenizer, questions, max_new_tokens=self.max_new_tokens,
                             batch_size=self.batch_size)
        self.too_long += sum(r is None for r in rolls)
        answers = ["" if r is None else r.text for r in rolls]
        self.last_answers = answers
        return [final_line(a) for a in answers] if self.reasoning else answers

    def compare(self, prompts, xs, ys, *, principle: str) -> Comparison:
        return compare_both_orders(self.ask, prompts, xs, ys, principle=principle, template=self.compare_template)

    def score(self, prompts, responses, *, principle: str) -> tuple[list[bool | None], int]:
        """Yes / No per response (None: unparseable) and the number unparseable."""
        qs = [self.score_template.format(principle=principle, prompt=p, response=r) for p, r in zip(prompts, responses)]
        verdicts = [parse_verdict(a) for a in self.ask(qs)]
        return verdicts, sum(v is None for v in verdicts)


@dataclass(frozen=True)
class Principle:
    """One principle of a constitution: the critique and revision requests put to the reviser,
    and (optionally) the principle as a statement for the judge (default: the critique request)."""

    name: str
    critique_request: str
    revision_request: str
    principle: str | None = None

    @property
    def statement(self) -> str:
        """What the judge is asked about (the ``{principle}`` field of its templates)."""
        return self.principle or self.critique_request


_FIELDS = ("name", "critique_request", "revision_request")


def load_constitution(path: str | Path) -> list[Principle]:
    """A YAML list of principles (``name``, ``critique_request``, ``revision_request``, optional
    ``principle``), safe-loaded; errors name the file, the entry and the field. Built-in
    constitutions (``builtin:world``) are the world's: :func:`posttrain.world.feedback.load_constitution`
    resolves them and hands files to this function."""
    import yaml

    if str(path).startswith("builtin:"):
        raise ConfigError(f"Unknown built-in constitution '{path}'.", fix="use builtin:world or a YAML file.")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"The constitution file '{path}' does not exist.", fix="check the path.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{p}: not valid YAML ({str(e).splitlines()[0]}).",
                        fix="fix the syntax (python tags are not allowed).") from None
    if isinstance(data, dict) and "principles" in data:
        data = data["principles"]
    if not isinstance(data, list) or not data:
        raise DataError(f"{p}: a constitution is a non-empty list of principles (or a mapping with 'principles').",
                        fix="write e.g. - {name: ..., critique_request: ..., revision_request: ...}")
    out = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataError(f"{p}, principle {i}: expected a mapping, found {type(entry).__name__}.",
                            fix="give every principle name, critique_request and revision_request.")
        for key in _FIELDS + ("principle",):
            value = entry.get(key)
            if (key in _FIELDS or key in entry) and (not isinstance(value, str) or not value.strip()):
                raise DataError(f"{p}, principle {i}, field '{key}': missing or empty.",
                                fix=f"give principle {i} a non-empty '{key}' string.")
        extra = sorted(set(entry) - set(_FIELDS) - {"principle"})
        if extra:
            raise DataError(f"{p}, principle {i}: unknown field(s) {extra}.",
                            fix="a principle has name, critique_request, revision_request and optionally principle.")
        out.append(Principle(entry["name"], entry["critique_request"], entry["revision_request"],
                             entry.get("principle")))
    names = [q.name for q in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{p}: principle name(s) {dup} appear more than once.", fix="give every principle its own name.")
    return out


__all__ = ["DEFAULT_COMPARE_TEMPLATE", "DEFAULT_SCORE_TEMPLATE", "REASONING_COMPARE_TEMPLATE", "REASONING_SCORE_TEMPLATE",
           "Comparison", "Judge", "Principle", "chat_replies", "final_line",
           "check_template", "compare_both_orders", "load_constitution", "parse_choice", "parse_verdict"]
