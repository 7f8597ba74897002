"""The tiny world's calculator environment: word problems with a calculator tool.

An episode opens with the record's ``prompt`` (the question as a user turn, or the record's
messages). Each assistant turn with tool calls, or with calls that could not be parsed, is
answered by one ``tool`` message per call: the calculator's result, or an error observation (an
unknown tool, bad arguments, a malformed call). A turn without calls is the final reply and ends
the episode; the reward functions grade it (``world_correct`` against the record's ``answer``).

Option (``env.options``): ``tool_cost`` (default 0): each turn that calls tools is rewarded
``-tool_cost * (number of calls, malformed ones included)``, so a policy can learn when a call
pays; with 0 the turns carry no reward (``None``).
"""

from __future__ import annotations

import math

from ..errors import ConfigError
from .base import AssistantTurn, Environment, StepResult
from .tools import CALCULATOR


class CalculatorEnv(Environment):
    """Word problems with a calculator tool (see the module docstring)."""

    name = "world-calculator"
    tools = (CALCULATOR,)
    tool_parser = "pythonic"   # the tiny world's template writes calls as calculator(expression="...")

    def __init__(self, tool_cost: float = 0.0, **options):
        super().__init__(**options)
        if isinstance(tool_cost, bool) or not isinstance(tool_cost, (int, float)) or not math.isfinite(tool_cost) \
                or tool_cost < 0:
            raise ConfigError(f"env.options.tool_cost={tool_cost!r} for environment {self.name!r} is not a finite "
                              "number >= 0.", fix="set it to 0 (calls are free) or a small cost such as 0.1.")
        self.tool_cost = float(tool_cost)

    def reset(self, record: dict) -> list[dict]:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        return [dict(m) for m in prompt]

    def step(self, turn: AssistantTurn) -> StepResult:
        n_calls = len(turn.tool_calls) + len(turn.malformed)
        if not n_calls:
            return StepResult(done=True)
        reward = -self.tool_cost * n_calls if self.tool_cost else None
        return StepResult(self.call_tools(turn), reward=reward)
