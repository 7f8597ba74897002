"""Evaluating a model on the tiny world's held-out problems.

The model sees each question as a chat prompt (the tokenizer's template with the generation
prompt) and answers greedily. Reported: accuracy (the extracted final answer equals the true
one), mean response length in tokens, format compliance (the strict world format, stopped on
its own), and accuracy per difficulty level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..data.chat import render_prompt
from ..errors import TokenizerError
from ..rollout.hf import generate
from .grader import is_correct, is_format_compliant
from .tasks import Problem


@dataclass
class EvalResult:
    accuracy: float
    mean_response_tokens: float
    format_compliance: float
    per_level: dict[int, float] = field(default_factory=dict)
    n: int = 0
    samples: list[dict] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        out = {
            "accuracy": self.accuracy,
            "mean_response_tokens": self.mean_response_tokens,
            "format_compliance": self.format_compliance,
        }
        out.update({f"accuracy_level{k}": v for k, v in sorted(self.per_level.items())})
        return out


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """The chat-format prompt for ``question`` (user turn + generation prompt) as token ids."""
    ids = render_prompt(tokenizer, question)
    if not ids:
        raise TokenizerError("the chat template renders a user question as an empty prompt.",
                             fix="correct the template (model.chat_template, or the tokenizer's chat_template).")
    return ids


def evaluate_problems(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int = 96,
    batch_size: int = 64,
    progress: bool = False,
    prompts: Sequence[Sequence[int]] | None = None,
) -> EvalResult:
    """Greedy chat-format evaluation of ``model`` on ``problems``.

    ``prompts`` overrides the chat rendering (e.g. a plain-text prompt for probing a base model).
    """
    if prompts is None:
        prompts = [chat_prompt_ids(tokenizer, p.question) for p in problems]
    gens = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        progress=progress, desc="evaluating",
    )
    correct = fmt = 0
    tokens = 0
    by_level: dict[int, list[int]] = {}
    samples = []
    for p, g in zip(problems, gens):
        ok = is_correct(g.text, p.answer)
        good_format = is_format_compliant(g.text, g.finished)
        correct += ok
        fmt += good_format
        tokens += len(g.completion_ids)
        by_level.setdefault(p.level, []).append(int(ok))
        samples.append(
            {"question": p.question, "answer": p.answer, "response": g.text,
             "correct": ok, "format_ok": good_format, "finished": g.finished, "level": p.level}
        )
    n = max(1, len(problems))
    return EvalResult(
        accuracy=correct / n,
        mean_response_tokens=tokens / n,
        format_compliance=fmt / n,
        per_level={k: sum(v) / len(v) for k, v in sorted(by_level.items())},
        n=len(problems),
        samples=samples,
    )
