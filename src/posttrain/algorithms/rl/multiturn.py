"""Multi-turn episodes in online RL: sampling them, their rewards, and turn-level credit.

An episode is trained like a completion whose environment tokens carry no label
(:class:`posttrain.algorithms.online.episodes.Episode`): the samples' per-token tensors (mask,
advantages, old / reference log-probs, values) run over the policy's tokens only, so the loss,
the KL, the entropy and GAE's steps skip environment tokens without any special case.

Credit (``env.credit``):

* ``episode``: the episode's reward (the reward functions' score of the final reply plus the
  per-turn rewards) goes through the advantage estimator like a completion's; every policy token
  gets that advantage (token-level estimators: the whole reward at the last token).
* ``turn``: turn ``t`` gets the return from ``t`` on, ``G_t = r_t + gamma * G_(t+1)``
  (:func:`posttrain.algorithms.online.episodes.turn_returns`). Group estimators compare the
  returns turn by turn: the advantage of turn ``t`` is the estimator applied to the group's
  ``G_t`` over the episodes that reached turn ``t`` (one that alone reached it gets 0). With no
  per-turn reward and ``gamma = 1`` every ``G_t`` is the episode reward, so episodes of equal
  length get exactly the ``episode`` advantages. Token-level estimators (gae, reinforce_pp) get
  each turn's reward at the turn's last token and the final reward at the last token; their own
  per-token discount (``loss.gamma``) applies.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..online.episodes import EpisodeLimits, env_reward, episode_record, run_episodes, turn_returns
from ...envs import load_environment


class EpisodeSampler:
    """The environment of an RL run and how its episodes are sampled and credited."""

    def __init__(self, cfg):
        self.env = load_environment(cfg.env.name, cfg.env.options)
        self.parser = cfg.env.tool_parser or getattr(self.env, "tool_parser", "hermes")
        self.limits = EpisodeLimits(cfg.env.max_turns, cfg.env.max_total_tokens, cfg.rollout.max_new_tokens)
        self.credit, self.gamma = cfg.env.credit, cfg.env.gamma
        self.stop = tuple(cfg.env.stop)

    def sample(self, backend, tokenizer, items, sampling, group_ids, model=None):
        if self.stop:
            sampling = dataclasses.replace(sampling, stop=tuple(sampling.stop) + self.stop)
        return run_episodes(self.env, backend, tokenizer, [episode_record(p) for p in items], sampling, self.limits,
                            parser=self.parser, group_ids=group_ids, model=model)

    @staticmethod
    def add_scores(out: dict, episodes) -> None:
        """Add the environment's per-turn rewards to the scores (``env_reward``, ``fn/env``; ``total``
        includes them) and mark invalid episodes invalid."""
        env = torch.tensor([env_reward(e) for e in episodes], dtype=out["total"].dtype)
        invalid = torch.tensor([e.invalid for e in episodes])
        out["valid"] = out["valid"] & ~invalid
        out["total"] = torch.where(out["valid"], out["total"] + env, torch.full_like(env, math.nan))
        out["env_reward"] = env
        out["fn/env"] = torch.where(out["valid"], env, torch.full_like(env, math.nan))
        if "seq_total" in out:
            out["seq_total"] = torch.where(out["valid"], out["seq_total"], torch.full_like(env, math.nan))
        n_invalid = int(invalid.sum())
        if n_invalid:
            out["invalid_counts"]["env"] = out["invalid_counts"].get("env", 0) + n_invalid

    def turn_token_rewards(self, episode) -> list[float]:
        """Per policy token: each turn's reward at the turn's last token (env.credit=turn, token-level
        estimators)."""
        out = [0.0] * len(episode.log_probs)
        for end, r in zip(episode.turn_ends, episode.turn_rewards):
            if r is not None and end > 0:
                out[end - 1] += float(r)
        return out

    def turn_advantages(self, estimator, hparams: dict, episodes, final: torch.Tensor, valid: torch.Tensor,
                        group_size: int) -> tuple[list[list[float]], dict]:
        """Per policy token of each episode: its turn's advantage (see the module docstring), and the
        estimator's metrics of the first turn. ``final``: each episode's reward-function score (and
        any reward-placed KL penalty), credited to its last turn."""
        returns = [turn_returns(e.turn_rewards, float(final[i]) if bool(valid[i]) else 0.0, self.gamma)
                   for i, e in enumerate(episodes)]
        per_turn: list[list[float]] = [[] for _ in episodes]
        metrics: dict = {}
        for t in range(max(len(r) for r in returns)):
            has = torch.tensor([len(r) > t for r in returns])
            rt = torch.tensor([r[t] if len(r) > t else math.nan for r in returns], dtype=torch.float32)
            adv, m = estimator.fn(rt, valid & has, group_size=group_size, **hparams)
            if t == 0:
                metrics = m
            for i in range(len(episodes)):
                if len(returns[i]) > t:
                    per_turn[i].append(float(adv[i]))
        tokens = []
        for e, advs in zip(episodes, per_turn):
            row, start = [], 0
            for end, a in zip(e.turn_ends, advs):
                row += [a] * (end - start)
                start = end
            row += [0.0] * (len(e.log_probs) - len(row))
            tokens.append(row)
        return tokens, metrics


@torch.no_grad()
def evaluate_episodes(model, tokenizer, sampler: EpisodeSampler, prompts, functions, *, batch_size: int = 64,
                      group_by: str | None = "level", backend=None) -> tuple[dict[str, float], list[dict]]:
    """Greedy episodes of every held-out prompt, scored like training episodes: ``eval_reward/<fn>``
    per reward function, ``eval_reward/env`` (per-turn rewards), ``eval_reward`` (the total), the
    episode diagnostics as ``eval_episode/*``, and per value of the prompts' ``group_by`` field
    ``eval_reward_<value>``. Returns the metrics and one record per episode (the conversation, its
    rewards, how it ended). Each process evaluates all prompts. ``backend``: the rollout backend
    (synced to ``model`` first; None: the own sampler)."""
    from ...rollout import HFSampler, SamplingParams
    from ..online.episodes import episode_metrics
    from ..online.evaluate import finite_mean, finite_or_none
    from ..online.scoring import score_rollouts

    if not prompts:
        return {}, []
    if backend is None:
        backend = HFSampler(model, tokenizer, batch_size=batch_size)
    else:
        backend.sync_weights(model)
    eps = sampler.sample(backend, tokenizer, prompts, SamplingParams(sampler.limits.max_turn_tokens, temperature=0.0),
                         list(range(len(prompts))), model=model)
    res = score_rollouts(list(functions), list(prompts), eps, max_new_tokens=sampler.limits.max_turn_tokens)
    out = {"total": res.total, "valid": res.valid, "invalid_counts": dict(res.invalid_counts)}
    EpisodeSampler.add_scores(out, eps)
    metrics = {f"eval_reward/{f.name}": finite_mean(res.per_function[f.name]) for f in functions}
    metrics["eval_reward/env"] = finite_mean(out["env_reward"])
    metrics["eval_reward"] = finite_mean(out["total"])
    metrics.update(episode_metrics(eps, prefix="eval_episode/"))
    records = []
    for i, (p, e) in enumerate(zip(prompts, eps)):
        total = float(out["total"][i])
        records.append({"index": i, "messages": e.messages, "end": e.end, "error": e.error, "turns": e.n_turns,
                        "tool_calls": e.tool_calls, "malformed_calls": e.malformed_calls,
                        "reward": total if math.isfinite(total) else None,
                        "rewards": {f.name: finite_or_none(res.per_function[f.name][i]) for f in functions},
                        **({group_by: p.fields.get(group_by)} if group_by and group_by in p.fields else {})})
    if group_by:
        values = sorted({str(r[group_by]) for r in records if group_by in r})
        for v in values:
            rows = [i for i, r in enumerate(records) if str(r.get(group_by)) == v]
            metrics[f"eval_reward_{group_by}{v}"] = finite_mean(out["total"][rows])
    return metrics, records


def episode_evaluator(sampler: EpisodeSampler, tokenizer, eval_prompts, functions, *, extra_eval=None, backend=None):
    """The engine's ``evaluate(model)`` of an RL run with an environment (None without held-out prompts)."""
    if not eval_prompts and extra_eval is None:
        return None

    def evaluate(m) -> dict:
        m = getattr(m, "policy", m)
        metrics = evaluate_episodes(m, tokenizer, sampler, eval_prompts, functions,
                                    backend=backend)[0] if eval_prompts else {}
        if extra_eval is not None:
            metrics.update(extra_eval(m))
        return metrics

    return evaluate

