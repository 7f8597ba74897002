"""Simulated users of the tiny world: multi-turn environments without tools.

``world-pieces``
    The user tells a word problem in pieces (records of ``builtin:world-pieces``: the opening
    piece as ``prompt``, the later user turns in ``pieces``, the question last). The policy
    answers every piece; the good behaviour is a running total (``14``, then ``14 + 9 = 23``, ...,
    then ``#### 18`` to the question). The episode ends after the reply to the question, which
    the reward functions (``world_correct`` on the record's ``answer``) score; turns earn no
    reward of their own, so an early turn's value shows only through the final answer. Option
    ``strategy``: ``"train"`` (default) or ``"heldout"``, the user below.

    ``train`` user: says each piece verbatim, one per turn, as ``builtin:world-pieces-sft``'s
    conversations do: 1 + len(pieces) assistant turns.

``world-pieces-heldout-user``
    ``world-pieces`` with ``strategy="heldout"``: a user the policy is not trained with, for
    measuring over-fitting to the training user. It differs in two ways: it gives the story's
    sentences two at a time (the policy must apply two operations in one reply), and it words
    its turns differently (``"Then: "`` before the first group, ``"After that: "`` before later
    ones, ``"Now the question: "`` before the question, which is always a turn of its own). The
    opening piece is the record's prompt, unchanged. Assistant turns: 1 + ceil(story / 2) + 1,
    ``story`` = len(pieces) - 1.

``world-retry``
    Verifier feedback: the record's prompt is asked once; a reply whose answer (the world grader,
    :func:`posttrain.world.grader.is_correct`) differs from the record's ``answer`` gets the user
    turn ``"Incorrect, try again."``, up to ``attempts`` replies in all (option, default 3); a
    correct reply, or the last allowed one, ends the episode. Reward: each wrong reply followed
    by a retry earns ``-attempt_cost`` (option, default 0.1); the last reply earns nothing here
    (the reward functions score it). With ``world_correct`` the episode's return is
    ``correct(final) - attempt_cost * (replies - 1)``: 1.0 on the first try, 0.9 on the second,
    0.8 on the third, -0.2 for three wrong replies (defaults).

A record without the fields an environment needs raises a ValueError, so the runner marks the
episode invalid; an option the environment does not take, or a bad value, is a ConfigError.
"""

from __future__ import annotations

import math

from ..errors import ConfigError
from .base import AssistantTurn, Environment, StepResult

STRATEGIES = ("train", "heldout")
HELDOUT_FIRST, HELDOUT_LATER, HELDOUT_QUESTION = "Then: ", "After that: ", "Now the question: "
RETRY_FEEDBACK = "Incorrect, try again."


def opening(record: dict, env: str) -> list[dict]:
    """The record's prompt as the episode's opening messages (a string is one user turn)."""
    if "prompt" not in record:
        raise ValueError(f"environment {env!r} needs a 'prompt' field; this record has {sorted(record)}")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return [dict(m) for m in prompt]
    raise ValueError(f"environment {env!r}: 'prompt' is {type(prompt).__name__}, not a string or a list of messages")


def user_turns(pieces: list[str], strategy: str) -> list[str]:
    """The user's turns after the opening for the pieces (question last) under ``strategy``."""
    if strategy == "train":
        return list(pieces)
    story, question = pieces[:-1], pieces[-1]
    turns = [(HELDOUT_FIRST if i == 0 else HELDOUT_LATER) + " ".join(story[i:i + 2]) for i in range(0, len(story), 2)]
    return turns + [HELDOUT_QUESTION + question]


class PiecesEnv(Environment):
    """A user who tells the problem in pieces (see the module docstring)."""

    name = "world-pieces"

    def __init__(self, strategy: str = "train", **options):
        super().__init__(**options)
        if strategy not in STRATEGIES:
            raise ConfigError(f"env.options.strategy={strategy!r} is not a user strategy of {self.name!r}.",
                              fix=f"use one of {', '.join(STRATEGIES)}.")
        self.strategy = strategy
        self._turns: list[str] = []

    def reset(self, record: dict) -> list[dict]:
        pieces = record.get("pieces")
        if pieces is None:
            raise ValueError(f"environment {self.name!r} needs a 'pieces' field (the user's later turns, the "
                             f"question last; builtin:world-pieces has it); this record has {sorted(record)}")
        if not isinstance(pieces, list) or not pieces or not all(isinstance(p, str) and p.strip() for p in pieces):
            raise ValueError(f"environment {self.name!r}: 'pieces' must be a non-empty list of non-empty strings, "
                             f"found {pieces!r:.200}")
        messages = opening(record, self.name)
        self._turns = user_turns(pieces, self.strategy)
        return messages

    def step(self, turn: AssistantTurn) -> StepResult:
        if not self._turns:
            return StepResult(done=True)
        return StepResult([{"role": "user", "content": self._turns.pop(0)}])


class HeldoutPiecesEnv(PiecesEnv):
    """``world-pieces`` with the held-out user (``strategy="heldout"``, fixed)."""

    name = "world-pieces-heldout-user"

    def __init__(self, **options):
        if "strategy" in options:
            raise ConfigError(f"environment {self.name!r} takes no 'strategy' option (its user is the held-out one).",
                              fix="remove env.options.strategy, or use world-pieces with strategy=...")
        super().__init__(strategy="heldout", **options)


class RetryEnv(Environment):
    """Verifier feedback and retries (see the module docstring)."""

    name = "world-retry"

    def __init__(self, attempts: int = 3, attempt_cost: float = 0.1, **options):
        super().__init__(**options)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigError(f"env.options.attempts={attempts!r} must be an integer >= 1.",
                              fix="set attempts to the number of replies allowed, e.g. 3.")
        if isinstance(attempt_cost, bool) or not isinstance(attempt_cost, (int, float)) \
                or not math.isfinite(attempt_cost) or attempt_cost < 0:
            raise ConfigError(f"env.options.attempt_cost={attempt_cost!r} must be a finite number >= 0.",
                              fix="set attempt_cost to the penalty per failed attempt, e.g. 0.1.")
        self.attempts = attempts
        self.attempt_cost = float(attempt_cost)
        self._answer: str | None = None
        self._tries = 0

    def reset(self, record: dict) -> list[dict]:
        from ..world.grader import parse_number

        answer = record.get("answer")
        if isinstance(answer, bool) or answer is None or parse_number(str(answer)) is None:
            raise ValueError(f"environment {self.name!r} needs a numeric 'answer' field; found {answer!r:.100} "
                             f"(record keys {sorted(record)})")
        messages = opening(record, self.name)
        self._answer, self._tries = str(answer), 0
        return messages

    def step(self, turn: AssistantTurn) -> StepResult:
        from ..world.grader import is_correct

        self._tries += 1
        correct = is_correct(turn.text, self._answer)
        info = {"attempt": self._tries, "correct": correct}
        if correct or self._tries >= self.attempts:
            return StepResult(done=True, info=info)
        return StepResult([{"role": "user", "content": RETRY_FEEDBACK}], reward=-self.attempt_cost, info=info)


USER_ENVIRONMENTS: dict[str, type] = {
    "world-pieces": PiecesEnv,
    "world-pieces-heldout-user": HeldoutPiecesEnv,
    "world-retry": RetryEnv,
}

__all__ = ["HeldoutPiecesEnv", "PiecesEnv", "RetryEnv", "STRATEGIES", "USER_ENVIRONMENTS", "user_turns"]
