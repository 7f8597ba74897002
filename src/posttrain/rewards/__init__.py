"""Reward functions of the online RL loop (GRPO, PPO, RLOO, ...).

    functions = resolve_reward_functions(["world_correct", "format"], [1.0, 0.2],
                                         options={}, tokenizer=tok, device="cpu")
    check_reward_fields(functions, fields_of_every_record, source="data/rl.jsonl")
    result = compute_rewards(functions, prompts, completions, completion_ids=ids, finished=finished,
                             max_new_tokens=256, answer=answers)
    result.total, result.valid, result.per_function, result.invalid_counts

The contract of a reward function is in :mod:`posttrain.rewards.base`; the built-ins are
``world_correct``, ``format``, ``math_answer`` (:mod:`~posttrain.rewards.answers`),
``overlong`` (:mod:`~posttrain.rewards.length`, DAPO), ``reward_model``
(:mod:`~posttrain.rewards.reward_model`), ``prm`` (:mod:`~posttrain.rewards.process`) and
``teacher_logprob`` (:mod:`~posttrain.rewards.teacher`: on-policy distillation, per-token
rewards); :mod:`~posttrain.rewards.registry` resolves names and
``package.module:function`` paths (which imports, i.e. runs, the named module).
"""

from .answers import answers_match, extract_final_answer, has_final_answer_line, reference_answer
from .base import (
    LOOP_FIELDS,
    RewardError,
    RewardFn,
    RewardFunction,
    RewardResult,
    call_reward_function,
    check_reward_fields,
    compute_rewards,
)
from .length import overlong_penalty
from .registry import REWARD_REGISTRY, resolve_reward_functions
from .reward_model import RewardModelScorer

__all__ = [
    "LOOP_FIELDS",
    "REWARD_REGISTRY",
    "RewardError",
    "RewardFn",
    "RewardFunction",
    "RewardModelScorer",
    "RewardResult",
    "answers_match",
    "call_reward_function",
    "check_reward_fields",
    "compute_rewards",
    "extract_final_answer",
    "has_final_answer_line",
    "overlong_penalty",
    "reference_answer",
    "resolve_reward_functions",
]
