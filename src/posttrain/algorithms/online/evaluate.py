"""The one evaluator: completions of held-out prompts through the rollout backend (greedy, or
``n`` samples each), scored with the reward functions; accuracy / pass@k, mean rewards and
per-group breakdowns (:func:`evaluate_model`). ``posttrain eval``, the tiny world's evaluation
and the training loops' held-out evaluation (:func:`evaluate_prompts`) all go through it."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...ops import pass_at_k
from ...rollout import SamplingParams
from ...rollout.hf import generate_rollouts
from .prompts import PromptItem
from .scoring import score_rollouts


def evaluate_prompts(model, tokenizer, prompts: list[PromptItem], functions, *, max_new_tokens: int,
                     batch_size: int = 64, backend=None) -> dict[str, float]:
    """The training loops' held-out evaluation: :func:`evaluate_model`'s greedy completions of
    ``prompts`` scored with ``functions``, as ``eval_reward/<name>`` (mean reward per function)
    and ``eval_response_length`` (mean completion tokens). Each process evaluates all prompts."""
    if not prompts:
        return {}
    res = evaluate_model(model, tokenizer, prompts, functions, SamplingParams(max_new_tokens, temperature=0.0),
                         batch_size=batch_size, shared=False, key="rollout.eval_max_new_tokens", backend=backend)
    out = {f"eval_reward/{f.name}": res.metrics[f"reward/{f.name}"] for f in functions}
    out["eval_response_length"] = res.metrics["response_tokens"]
    return out


def prompt_evaluator(tokenizer, eval_prompts: list[PromptItem], functions, *, max_new_tokens: int, extra_eval=None,
                     backend=None):
    """The engine's ``evaluate(model)`` for the sampling methods: greedy held-out completions scored
    with ``functions`` (:func:`evaluate_prompts`), plus ``extra_eval(model)``; None when there is
    nothing to evaluate. A policy trained beside a critic is evaluated alone. ``backend``: the
    run's rollout backend (synced to the evaluated weights first); None: the own sampler."""
    if not eval_prompts and extra_eval is None:
        return None

    def evaluate(m) -> dict:
        m = getattr(m, "policy", m)
        metrics = evaluate_prompts(m, tokenizer, eval_prompts, functions, max_new_tokens=max_new_tokens,
                                   backend=backend) if eval_prompts else {}
        if extra_eval is not None:
            metrics.update(extra_eval(m))
        return metrics

    return evaluate


# --------------------------------------------------------------------------- the evaluator


@dataclass
class EvalResult:
    """What an evaluation measured.

    ``metrics``: over all prompts (``prompts``; greedy: ``accuracy``; sampled: ``pass@1`` and
    ``pass@<n>``; ``reward/<name>`` per function, ``reward`` the weighted total of
    reward.functions, ``response_tokens``, ``finished``; ``invalid/<name>`` where a function could
    not score). ``by_group``: the same per value of the ``group_by`` field (keys as text).
    ``samples``: one record per completion, what ``samples.jsonl`` holds."""

    metrics: dict[str, float]
    by_group: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    group_by: str | None = None
    correct: str | None = None
    functions: dict[str, float] = field(default_factory=dict)   # reward.functions: name -> weight
    gold: list[str] = field(default_factory=list)
    n: int = 1
    greedy: bool = True
    source: str = ""
    dropped: int = 0
    output_dir: Path | None = None


@torch.no_grad()
def evaluate_model(model, tokenizer, prompts: Sequence[PromptItem], functions, sampling: SamplingParams, *,
                   gold=(), correct: str | None = None, threshold: float = 1.0, group_by: str | None = None,
                   batch_size: int = 64, progress: bool = False, shared: bool = True,
                   key: str = "eval.max_new_tokens", backend=None) -> EvalResult:
    """``sampling.n`` completions of every prompt (greedy at temperature 0), scored with
    ``functions`` (weighted: the total) and ``gold`` (scored beside), summarized overall and per
    value of the prompts' ``group_by`` field. ``correct`` names the function read as correctness
    (``>= threshold``). ``shared``: the processes split the generation (all must call this).
    ``key`` names the token budget in the position-limit error."""
    prompts = list(prompts)
    n = sampling.n
    rolls = generate_rollouts(model, tokenizer, [p.ids for p in prompts], sampling, batch_size=batch_size,
                              progress=progress, desc="evaluating", key=key, shared=shared, backend=backend)
    per_sample = [p for p in prompts for _ in range(n)]
    res = score_rollouts(list(functions), per_sample, rolls, max_new_tokens=sampling.max_new_tokens)
    values = dict(res.per_function)
    if gold:
        beside = score_rollouts(list(gold), per_sample, rolls, max_new_tokens=sampling.max_new_tokens)
        values.update(beside.per_function)
    total = res.total
    ok = None
    if correct is not None:
        v = values[correct]
        ok = torch.where(torch.isfinite(v), (v >= threshold).float(), math.nan)
    tokens = torch.tensor([len(r.completion_ids) for r in rolls], dtype=torch.float64)
    finished = torch.tensor([float(r.finished) for r in rolls], dtype=torch.float64)
    greedy = sampling.temperature == 0
    shape = (len(prompts), n)

    def summary(rows: list[int]) -> dict[str, float]:
        idx = torch.tensor(rows, dtype=torch.long)
        pick = lambda t: t.view(shape)[idx]  # noqa: E731  (the rows' samples, (R, n))
        out: dict[str, float] = {"prompts": len(rows)}
        if ok is not None:
            c = pick(ok)
            if greedy:
                out["accuracy"] = finite_mean(c)
            else:
                full = torch.isfinite(c).all(-1)
                counts = c[full].sum(-1)
                for k in sorted({1, n}):
                    out[f"pass@{k}"] = float(pass_at_k(counts, n, k).mean()) if full.any() else math.nan
        for name, v in values.items():
            out[f"reward/{name}"] = finite_mean(pick(v))
        out["reward"] = finite_mean(pick(total))
        out["response_tokens"] = finite_mean(pick(tokens))
        out["finished"] = finite_mean(pick(finished))
        for name, v in values.items():
            bad = int((~torch.isfinite(pick(v))).sum())
            if bad:
                out[f"invalid/{name}"] = bad
        return out

    groups: dict = {}
    if group_by is not None:
        for i, p in enumerate(prompts):
            groups.setdefault(_group_key(p.fields.get(group_by)), []).append(i)
    by_group = {str(g): summary(groups[g]) for g in sorted(groups, key=_sort_key)}
    samples = []
    for s, (p, r) in enumerate(zip(per_sample, rolls)):
        rec = {"index": s // n, "sample": s % n, "prompt": p.prompt if p.prompt is not None else p.text,
               "completion": r.text,
               "rewards": {name: finite_or_none(v[s]) for name, v in values.items()}, "reward": finite_or_none(total[s]),
               "gold": p.fields.get("answer"), "correct": None if ok is None or math.isnan(ok[s]) else bool(ok[s]),
               "finished": r.finished, "completion_tokens": len(r.completion_ids)}
        if group_by is not None:
            rec[group_by] = p.fields.get(group_by)
        samples.append(rec)
    return EvalResult(metrics=summary(list(range(len(prompts)))), by_group=by_group, samples=samples,
                      group_by=group_by, correct=correct, functions={f.name: float(f.weight) for f in functions},
                      gold=[f.name for f in gold], n=n, greedy=greedy)


def finite_mean(t: torch.Tensor) -> float:
    """The mean of the finite entries (NaN when there is none)."""
    t = t.reshape(-1).double()
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else math.nan


def finite_or_none(v) -> float | None:
    """``v`` as a float, or None when it is not finite."""
    v = float(v)
    return v if math.isfinite(v) else None


def _group_key(value):
    """A record's group value as a dict key (numbers and text as they are; anything else as JSON)."""
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value, sort_keys=True)


def _sort_key(value):
    return (value is None, isinstance(value, str), value if value is not None else 0)
