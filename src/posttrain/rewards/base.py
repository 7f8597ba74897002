"""The reward-function contract of the online loop, and the one function that applies it.

A *reward function* scores a batch of ``B`` completions at once::

    fn(prompts, completions, *, completion_ids, finished, max_new_tokens, **record_fields)
        -> list[float | None]          # B values, one per completion

* ``prompts``: the records' prompts as the data holds them (the user's text, not
  chat-rendered; a list of messages for conversational prompts); ``completions``: the
  decoded completion texts (no special tokens).
* ``completion_ids``: ``list[list[int]]`` the generated token ids (with the stop token when the
  model stopped by itself); ``finished``: ``list[bool]``, True when generation ended on a stop
  token, False when it ran out of ``max_new_tokens`` (``int``, the same for the whole batch).
* every field of the data records, as a list aligned with ``prompts`` (``answer=[...]``,
  ``level=[...]``). A function takes ``**kwargs`` and ignores what it does not need.

A value of ``None`` (or NaN / inf) means "cannot score this sample": the sample is excluded
(``valid=False``) and counted per function, never turned into a number. Anything else that is
not ``B`` real numbers is a bug in the function and raises :class:`RewardError` naming it.

**Per-token rewards.** A function may also score every completion token: it then has a
``token_rewards`` method with the same arguments, returning one list per completion (one float
per token of ``completion_ids``, or None: cannot score). :func:`compute_rewards` calls that
method instead of the function, takes the sum of each list as the completion's reward (so
every caller that wants one number per completion gets it), and keeps the lists in
:attr:`RewardResult.per_token` for the loops that place rewards per token (the online loop's
``reinforce_pp`` and ``gae``). ``teacher_logprob`` (:mod:`posttrain.rewards.teacher`) is one.
The loop also passes ``prompt_ids`` (the chat-rendered prompt's token ids).
"""

from __future__ import annotations

import decimal
import math
import numbers
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..errors import DataError, PosttrainError, where

RewardFn = Callable[..., list[float | None]]

# fields the loop passes to every reward function besides the record's own fields
LOOP_FIELDS = ("completion_ids", "finished", "max_new_tokens", "prompt_ids")


class RewardError(PosttrainError):
    """A reward function that raised, or returned something other than one number (or None) per completion."""


@dataclass(frozen=True)
class RewardFunction:
    """One resolved reward function: ``name`` is what is logged (``reward/<name>``), ``weight`` its
    factor in the total, ``needs_fields`` the record fields it reads (checked against the data up
    front by :func:`check_reward_fields`)."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    needs_fields: tuple[str, ...] = ()


@dataclass
class RewardResult:
    """Rewards of one batch of ``B`` completions.

    * ``total`` ``(B,)`` float32: ``Σ_i weight_i · r_i`` over the functions; NaN where invalid.
    * ``valid`` ``(B,)`` bool: False when *any* function gave None or a non-finite value.
    * ``per_function`` name -> ``(B,)`` float32, NaN where that function gave None / non-finite.
    * ``invalid_counts`` name -> how many None / non-finite values that function returned.
    * ``per_token`` name -> one list of per-token rewards per completion (None where invalid), for the
      functions that score tokens (a ``token_rewards`` method); their ``per_function`` value is the sum.
    """

    total: torch.Tensor
    valid: torch.Tensor
    per_function: dict[str, torch.Tensor]
    invalid_counts: dict[str, int]
    per_token: dict[str, list[list[float] | None]] = field(default_factory=dict)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _origin(exc: BaseException) -> str:
    """`` (at file.py:12 in fn)`` for the innermost frame of ``exc``'s traceback, or ''."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename}:{f.lineno} in {f.name})"


_RETURN_FIX = ("return a list with one float per completion, in the order of `completions`, and None for a "
               "completion the function cannot score (it is then excluded from the update and counted).")


def _as_values(name: str, out, n: int) -> list[float]:
    """Check a reward function's output; None / non-finite become NaN."""
    if isinstance(out, (torch.Tensor,)) or type(out).__module__ == "numpy":
        raise RewardError(
            f"Reward function '{name}' returned a {type(out).__module__}.{type(out).__name__} of shape "
            f"{tuple(getattr(out, 'shape', ()))}; expected a list of {n} numbers (or None), one per completion.",
            fix="return out.tolist() (a plain list); " + _RETURN_FIX)
    if not isinstance(out, (list, tuple)):
        raise RewardError(
            f"Reward function '{name}' returned {type(out).__name__} ({_short(out)}); expected a list of {n} numbers "
            "(or None), one per completion.", fix=_RETURN_FIX)
    if len(out) != n:
        raise RewardError(
            f"Reward function '{name}' returned {len(out)} value(s) for a batch of {n} completion(s); expected "
            f"{n} values, one per completion.", fix=_RETURN_FIX)
    values = []
    for i, v in enumerate(out):
        if v is None:
            values.append(math.nan)
        elif isinstance(v, (numbers.Real, decimal.Decimal)):  # bool counts (True -> 1.0)
            try:
                values.append(float(v))
            except (OverflowError, ValueError):  # e.g. Decimal('sNaN'), a huge Fraction
                values.append(math.nan)
        else:
            hint = " (use .item() for a 0-dim tensor)" if isinstance(v, torch.Tensor) else ""
            raise RewardError(
                f"Reward function '{name}' returned {type(v).__name__} {_short(v)} at position {i} of {n}; expected "
                f"a number (int or float) or None for every completion{hint}.", fix=_RETURN_FIX)
    return values


def call_reward_function(f: RewardFunction, prompts: list, completions: list[str], **fields) -> list[float]:
    """``f.fn`` on the batch, checked: ``B`` floats, NaN for None / non-finite. Raises RewardError
    (or the PosttrainError the function raised, with the function's name added)."""
    return _as_values(f.name, _call(f, f.fn, prompts, completions, fields), len(prompts))


def token_level(f: RewardFunction) -> bool:
    """Whether ``f`` scores every completion token (it has a ``token_rewards`` method)."""
    return callable(getattr(f.fn, "token_rewards", None))


def call_token_reward_function(f: RewardFunction, prompts: list, completions: list[str],
                               **fields) -> tuple[list[float], list[list[float] | None]]:
    """``f.fn.token_rewards`` on the batch, checked: one list of per-token floats per completion
    (as long as its ``completion_ids``) or None. Returns ``(sums, lists)``: each list's sum (float64
    ``math.fsum``; NaN for None or a non-finite token value, whose list becomes None)."""
    out = _call(f, f.fn.token_rewards, prompts, completions, fields)
    n = len(prompts)
    if not isinstance(out, (list, tuple)) or len(out) != n:
        got = f"{len(out)} value(s)" if isinstance(out, (list, tuple)) else type(out).__name__
        raise RewardError(f"Reward function '{f.name}' returned {got} from token_rewards for a batch of {n} "
                          "completion(s); expected one list of per-token rewards (or None) per completion.",
                          fix="return a list with, for each completion, a list of one float per completion token.")
    ids = fields.get("completion_ids")
    sums: list[float] = []
    lists: list[list[float] | None] = []
    for i, row in enumerate(out):
        if row is not None:
            if not isinstance(row, (list, tuple)) or (ids is not None and len(row) != len(ids[i])):
                got = f"{len(row)} value(s)" if isinstance(row, (list, tuple)) else type(row).__name__
                raise RewardError(
                    f"Reward function '{f.name}' returned {got} from token_rewards for completion {i}, which has "
                    f"{len(ids[i]) if ids is not None else '?'} token(s); expected one float per completion token.",
                    fix="return, for each completion, a list as long as its completion_ids (or None).")
            row = _as_values(f.name, row, len(row))
        if row is None or not all(math.isfinite(v) for v in row):
            sums.append(math.nan)
            lists.append(None)
        else:
            sums.append(math.fsum(row))
            lists.append(row)
    return sums, lists


def _call(f: RewardFunction, fn, prompts: list, completions: list[str], fields: dict):
    try:
        return fn(prompts, completions, **fields)
    except PosttrainError as exc:  # already a user-facing message (e.g. a ConfigError of a built-in)
        raise type(exc)(f"Reward function '{f.name}': {exc.problem}", fix=exc.fix) from exc
    except Exception as exc:
        raise RewardError(
            f"Reward function '{f.name}' raised {type(exc).__name__}: {exc}{_origin(exc)}.",
            fix="correct the function (the original traceback is chained to this error), or remove it from "
            "reward.functions. A function may return None for a completion it cannot score: that sample is then "
            "excluded and counted instead of stopping the run.") from exc


def compute_rewards(functions: list[RewardFunction], prompts: list, completions: list[str], **fields) -> RewardResult:
    """Call every function once on the whole batch and combine the results (see :class:`RewardResult`).

    ``fields`` are passed to every function as keyword arguments (``completion_ids``, ``finished``,
    ``max_new_tokens`` and the record fields). The weighted sum is accumulated in float64 and
    stored as float32; a value that is finite in float64 but not in float32 counts as invalid.
    A per-token function (:func:`token_level`) contributes the sum of its token rewards and
    leaves its lists in ``per_token``.
    """
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"compute_rewards got {n} prompts but {len(completions)} completions")
    total = torch.zeros(n, dtype=torch.float64)
    valid = torch.ones(n, dtype=torch.bool)
    per_function: dict[str, torch.Tensor] = {}
    invalid_counts: dict[str, int] = {}
    per_token: dict[str, list[list[float] | None]] = {}
    for f in functions:
        if token_level(f):
            sums, per_token[f.name] = call_token_reward_function(f, prompts, completions, **fields)
            values = torch.tensor(sums, dtype=torch.float64)
        else:
            values = torch.tensor(call_reward_function(f, prompts, completions, **fields), dtype=torch.float64)
        ok = torch.isfinite(values.float())
        per_function[f.name] = torch.where(ok, values, math.nan).float()
        invalid_counts[f.name] = int((~ok).sum())
        total += float(f.weight) * torch.where(ok, values, 0.0)
        valid &= ok
    return RewardResult(total=torch.where(valid, total, math.nan).float(), valid=valid,
                        per_function=per_function, invalid_counts=invalid_counts, per_token=per_token)


def check_reward_fields(functions: Iterable[RewardFunction], available_fields: set[str], source: str | None) -> None:
    """Refuse, before any generation, a reward function that needs a record field the data lacks.

    ``available_fields`` are the fields present in every record of ``source`` (the data file);
    the loop's own fields (:data:`LOOP_FIELDS`) always count as available.
    """
    have = set(available_fields) | set(LOOP_FIELDS)
    for f in functions:
        missing = [k for k in f.needs_fields if k not in have]
        if missing:
            shown = ", ".join(repr(k) for k in sorted(available_fields)) or "none"
            raise DataError(
                f"{where(source)}: reward function '{f.name}' needs the record field(s) "
                f"{', '.join(repr(k) for k in missing)}, which the records do not have (their fields besides the "
                f"prompt: {shown}).",
                fix=f"add {' and '.join(repr(k) for k in missing)} to every record of {source or 'the data'} (for "
                f"example the reference answer as \"answer\"), or remove '{f.name}' from reward.functions.")
