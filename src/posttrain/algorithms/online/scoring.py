"""One scoring entry point: rollouts -> rewards, every function seeing the prompt record's fields."""

from __future__ import annotations

from ...rewards import compute_rewards, resolve_reward_functions
from ...rollout import Rollout
from .config import RewardConfig
from .prompts import PromptItem


def score_rollouts(functions, prompts: list[PromptItem], rolls: list[Rollout], *, max_new_tokens: int):
    """Rewards of ``rolls`` (``rolls[i]`` completes ``prompts[i]``): every function sees the prompt
    text, the completion text, ``completion_ids``, ``finished``, ``max_new_tokens``,
    ``prompt_ids`` (the chat-rendered prompt) and the prompt record's other fields. Returns a
    :class:`posttrain.rewards.base.RewardResult`."""
    fields = {name: [p.fields.get(name) for p in prompts] for name in (prompts[0].fields if prompts else ())}
    return compute_rewards(functions, [p.text for p in prompts], [r.text for r in rolls],
                           completion_ids=[r.completion_ids for r in rolls], finished=[r.finished for r in rolls],
                           max_new_tokens=max_new_tokens, prompt_ids=[r.prompt_ids for r in rolls], **fields)


def build_rewards(reward: RewardConfig, tokenizer, device, *, max_new_tokens: int, overlong: bool = False,
                  teacher=None, policy=None, temperature: float = 1.0, attn_implementation: str | None = "sdpa"):
    """The trained reward functions (``reward.functions`` with their weights, plus DAPO's overlong
    punishment when ``overlong``) and the gold functions (logged only). ``teacher`` (the
    ``teacher.*`` section), ``policy`` and the sampling ``temperature``: for ``teacher_logprob``."""
    names, weights = list(reward.functions), list(reward.weights or [1.0] * len(reward.functions))
    if overlong and "overlong" not in names:
        names.append("overlong")
        weights.append(1.0)
    options = {"overlong_buffer": reward.overlong_buffer or max(1, max_new_tokens // 5),
               "reward_model": reward.reward_model, "reward_model_batch_size": reward.reward_model_batch_size,
               "process_reward_model": reward.process_reward_model,
               "process_aggregation": reward.process_aggregation}
    if teacher is not None:
        options.update(teacher_model=teacher.name_or_path, teacher_dtype=teacher.dtype,
                       teacher_batch_size=teacher.batch_size, teacher_temperature=temperature,
                       teacher_attn_implementation=attn_implementation, policy=policy)
    # none: an environment's per-turn rewards are the whole reward (the config checks allow it only then)
    functions = resolve_reward_functions(names, weights, options=options, tokenizer=tokenizer,
                                         device=device) if names else []
    gold = resolve_reward_functions(list(reward.gold), None, options=options, tokenizer=tokenizer,
                                    device=device) if reward.gold else []
    return functions, gold

