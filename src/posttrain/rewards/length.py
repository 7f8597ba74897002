"""DAPO's soft overlong punishment (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement
Learning System at Scale", arXiv:2503.14476, section "Overlong Reward Shaping").

With ``L = len(completion_ids)`` the completion's length in tokens (the stop token included
when the model stopped by itself, as the rollout returns it), ``L_max`` the length budget and
``L_cache`` the punishment buffer::

                 0                              if L <= L_max - L_cache
    R_len(L) =   ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
                 -1                             if L > L_max

so the penalty grows linearly from 0 to -1 over the last ``L_cache`` tokens of the budget
(``R_len(L_max) = -1``; the function is continuous). It is added to the task reward (give it
weight 1.0 next to a 0/1 correctness reward, as DAPO does).

Options: ``overlong_buffer`` (``L_cache``, required, an integer with ``0 < L_cache < L_max``)
and ``overlong_max_length`` (``L_max``; default: the ``max_new_tokens`` of the generation, DAPO's
setting, in which case ``L > L_max`` cannot happen and truncated completions get -1).
"""

from __future__ import annotations

from ..errors import ConfigError


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """``R_len`` above for one completion of ``length`` tokens."""
    threshold = max_length - buffer
    if length <= threshold:
        return 0.0
    if length <= max_length:
        return (threshold - length) / buffer
    return -1.0


def _positive_int(value, key: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"Config key '{key}' has value {value!r}; it must be a positive integer ({what}).",
                          fix=f"set {key} to a number of tokens, e.g. {key}=512.")
    return value


def _check_buffer(buffer: int, max_length: int, *, from_generation: bool) -> None:
    if buffer >= max_length:
        budget = (f"the generation length max_new_tokens={max_length} (L_max, since reward.overlong_max_length is "
                  "unset)" if from_generation else f"reward.overlong_max_length={max_length} (L_max)")
        raise ConfigError(
            f"Config key 'reward.overlong_buffer' is {buffer}, which is not smaller than {budget}; the overlong "
            "punishment would then start at or before length 0.",
            fix=f"set reward.overlong_buffer below {max_length} (DAPO uses about a fifth of L_max, e.g. "
            f"{max(1, max_length // 5)}).")


def overlong_reward(*, overlong_buffer=None, overlong_max_length=None, **_options):
    """Factory of ``overlong`` (see the module docstring)."""
    if overlong_buffer is None:
        raise ConfigError("Reward function 'overlong' needs config key 'reward.overlong_buffer' (L_cache, the "
                          "number of tokens before the length budget over which the penalty grows to -1), "
                          "which is unset.", fix="set reward.overlong_buffer, e.g. to a fifth of max_new_tokens.")
    buffer = _positive_int(overlong_buffer, "reward.overlong_buffer", "L_cache, in tokens")
    fixed = None
    if overlong_max_length is not None:
        fixed = _positive_int(overlong_max_length, "reward.overlong_max_length", "L_max, in tokens")
        _check_buffer(buffer, fixed, from_generation=False)

    def overlong(prompts, completions, *, completion_ids, max_new_tokens, **kwargs):
        max_length = fixed if fixed is not None else int(max_new_tokens)
        if fixed is None:
            _check_buffer(buffer, max_length, from_generation=True)
        return [overlong_penalty(len(ids), max_length, buffer) for ids in completion_ids]

    overlong.needs_fields = ()
    return overlong
