"""The environment interface of multi-turn episodes.

An episode starts from a data record: :meth:`Environment.reset` returns the conversation's
opening messages (a system / user turn). The policy then writes an assistant turn; the episode
runner (:mod:`posttrain.algorithms.online.episodes`) parses its tool calls and hands it to
:meth:`Environment.step`, which answers with a :class:`StepResult`: the messages to append (tool
results, the user's next turn), an optional reward for that turn, and whether the episode is
over. The runner owns the tokens: it samples the assistant turns through the rollout backend,
tokenizes each environment turn once with the chat template's own framing and appends it, so
an environment only ever sees and returns messages.

An environment object serves one episode at a time (the runner makes one per episode with
:meth:`Environment.fresh`; the default is a shallow copy). What it raises, or a malformed
result, marks the episode invalid (counted and named in the log), never a crashed run.

Environments are named by ``env.name`` (:mod:`.registry`): a built-in or a
``package.module:Class`` path to a subclass of :class:`Environment` (importing it runs that
module, like a reward function's path).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError
from .tools import Tool, ToolCall


@dataclass
class AssistantTurn:
    """What the policy wrote in one turn: the decoded text (special tokens removed), the tool calls
    parsed from it, the calls that could not be parsed (one message each), whether the turn ended by
    itself (``False``: cut at ``rollout.max_new_tokens``) and its index in the episode (0, 1, ...)."""

    text: str
    tool_calls: list[ToolCall]
    malformed: list[str]
    finished: bool
    index: int


@dataclass
class StepResult:
    """An environment's answer to one assistant turn: the messages to append (each ``{"role",
    "content"}``; roles ``tool`` / ``user`` / ``system``), this turn's reward (``None``: none;
    the reward functions score the final reply), and whether the episode is over."""

    messages: list[dict] = field(default_factory=list)
    reward: float | None = None
    done: bool = False
    info: dict = field(default_factory=dict)


class EnvironmentError_(Exception):
    """An environment broke its contract (raised, or returned something malformed)."""


class Environment:
    """Subclass and override :meth:`reset` and :meth:`step` (see the module docstring).

    ``tools``: the tools the policy may call; the chat template renders them (``tools=``) in the
    prompt, and :meth:`call_tools` runs a turn's calls. ``options`` come from ``env.options``.
    """

    name: str = "?"
    tools: Sequence[Tool] = ()
    tool_parser: str = "hermes"   # how this environment's tool calls are written (env.tool_parser overrides)

    def __init__(self, **options):
        if options:
            raise ConfigError(f"env.options has keys {sorted(options)} that environment {self.name!r} does not take.",
                              fix="remove them, or name an environment that takes them.")

    def fresh(self) -> Environment:
        """An instance for one new episode (default: a shallow copy of this one)."""
        return copy.copy(self)

    def reset(self, record: dict) -> list[dict]:
        """The opening messages of the episode for data record ``record``."""
        raise NotImplementedError

    def step(self, turn: AssistantTurn) -> StepResult:
        """The environment's answer to the policy's turn."""
        raise NotImplementedError

    # -- helpers for tool environments
    def tool_schemas(self) -> list[dict] | None:
        """The ``tools=`` argument of the chat template (JSON schemas), or None without tools."""
        return [t.schema() for t in self.tools] or None

    def call_tools(self, turn: AssistantTurn) -> list[dict]:
        """``tool`` messages answering ``turn``'s calls in order: each registered tool's result, or an
        error observation for an unknown tool, bad arguments, a tool that raised, or a call that
        could not be parsed."""
        by_name = {t.name: t for t in self.tools}
        out = []
        for call in turn.tool_calls:
            tool = by_name.get(call.name)
            if tool is None:
                content = f"error: unknown tool {call.name!r}; tools: {', '.join(by_name) or 'none'}"
            else:
                content = tool.run(call.arguments)
            out.append({"role": "tool", "name": call.name, "content": content})
        for problem in turn.malformed:
            out.append({"role": "tool", "content": f"error: {problem}"})
        return out


def check_messages(messages, what: str) -> list[dict]:
    """``messages`` as a list of ``{"role": str, "content": str}`` dicts, or an EnvironmentError_
    saying what is wrong (``what`` names the method)."""
    if not isinstance(messages, list):
        raise EnvironmentError_(f"{what} returned {type(messages).__name__}, not a list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise EnvironmentError_(f"{what} returned a malformed message at position {i}: {m!r:.200} (each needs a "
                                    "string 'role' and a string 'content')")
        if m["role"] == "assistant":
            raise EnvironmentError_(f"{what} returned an assistant message at position {i}: only the policy writes "
                                    "assistant turns")
    return messages


def check_step(result) -> StepResult:
    """``result`` if it is a well-formed :class:`StepResult`, else an EnvironmentError_."""
    if not isinstance(result, StepResult):
        raise EnvironmentError_(f"step returned {type(result).__name__}, not a StepResult")
    check_messages(result.messages, "step")
    if result.reward is not None:
        try:
            r = float(result.reward)
        except (TypeError, ValueError):
            raise EnvironmentError_(f"step returned reward {result.reward!r}, not a number") from None
        if r != r or r in (float("inf"), float("-inf")):
            raise EnvironmentError_(f"step returned reward {r}")
        result.reward = r
    if not result.done and not result.messages:
        raise EnvironmentError_("step returned no messages and done=False: the policy would have nothing to answer")
    return result
