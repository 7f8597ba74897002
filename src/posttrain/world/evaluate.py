"""Evaluating a model on the tiny world's held-out problems.

The model sees each question as a chat prompt (the tokenizer's template with the generation
prompt) and answers greedily. Reported: accuracy (the extracted final answer equals the true
one), mean response length in tokens, format compliance (the strict world format, stopped on
its own), and accuracy per difficulty level.

This is the one evaluator (:func:`posttrain.algorithms.online.evaluate.evaluate_model`, behind
``posttrain eval``) with the world's verifier (``world_correct``) as correctness and its strict
format (``format`` with ``format_strict``) scored beside, grouped by level; each process
evaluates every problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..algorithms.online import PromptItem
from ..algorithms.online.evaluate import evaluate_model
from ..data.chat import render_prompt
from ..errors import TokenizerError
from ..rewards import resolve_reward_functions
from ..rollout import SamplingParams
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
    if not problems:
        return EvalResult(accuracy=0.0, mean_response_tokens=0.0, format_compliance=0.0)
    if prompts is None:
        prompts = [chat_prompt_ids(tokenizer, p.question) for p in problems]
    items = [PromptItem(ids=list(ids), text=p.question, fields={"answer": p.answer, "level": p.level},
                        prompt=p.question) for p, ids in zip(problems, prompts, strict=True)]
    functions = resolve_reward_functions(["world_correct", "format"], None, options={"format_strict": True}, log=None)
    res = evaluate_model(model, tokenizer, items, functions, SamplingParams(max_new_tokens, temperature=0.0),
                         correct="world_correct", group_by="level", batch_size=batch_size, progress=progress,
                         shared=False, key="max_new_tokens")
    samples = [{"question": p.question, "answer": p.answer, "response": s["completion"], "correct": bool(s["correct"]),
                "format_ok": s["rewards"]["format"] == 1.0, "finished": s["finished"], "level": p.level}
               for p, s in zip(problems, res.samples)]
    return EvalResult(
        accuracy=res.metrics["accuracy"],
        mean_response_tokens=res.metrics["response_tokens"],
        format_compliance=res.metrics["reward/format"],
        per_level={int(k): v["accuracy"] for k, v in res.by_group.items()},
        n=len(problems),
        samples=samples,
    )
