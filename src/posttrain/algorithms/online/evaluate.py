"""Held-out evaluation of the sampling methods: greedy completions through the rollout backend,
scored with the reward functions."""

from __future__ import annotations

import torch

from ...rollout import HFSampler, SamplingParams, requests
from .prompts import PromptItem
from .scoring import score_rollouts


@torch.no_grad()
def evaluate_prompts(model, tokenizer, prompts: list[PromptItem], functions, *, max_new_tokens: int,
                     batch_size: int = 64) -> dict[str, float]:
    """Greedy completions of held-out prompts, scored with ``functions``: mean reward per function
    (``eval_reward/<name>``) and the mean completion length."""
    if not prompts:
        return {}
    rolls = HFSampler(model, tokenizer, batch_size=batch_size).generate(
        requests([p.ids for p in prompts]), SamplingParams(max_new_tokens, temperature=0.0))
    res = score_rollouts(functions, prompts, rolls, max_new_tokens=max_new_tokens)
    out = {}
    for name, v in res.per_function.items():
        ok = torch.isfinite(v)
        out[f"eval_reward/{name}"] = float(v[ok].mean()) if ok.any() else float("nan")
    out["eval_response_length"] = sum(len(r.completion_ids) for r in rolls) / len(rolls)
    return out


def prompt_evaluator(tokenizer, eval_prompts: list[PromptItem], functions, *, max_new_tokens: int, extra_eval=None):
    """The engine's ``evaluate(model)`` for the sampling methods: greedy held-out completions scored
    with ``functions`` (:func:`evaluate_prompts`), plus ``extra_eval(model)``; None when there is
    nothing to evaluate. A policy trained beside a critic is evaluated alone."""
    if not eval_prompts and extra_eval is None:
        return None

    def evaluate(m) -> dict:
        m = getattr(m, "policy", m)
        metrics = evaluate_prompts(m, tokenizer, eval_prompts, functions,
                                   max_new_tokens=max_new_tokens) if eval_prompts else {}
        if extra_eval is not None:
            metrics.update(extra_eval(m))
        return metrics

    return evaluate

