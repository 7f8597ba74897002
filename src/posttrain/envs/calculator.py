"""The tiny world's calculator environment (placeholder module: filled in by the calculator slice)."""

from __future__ import annotations

from .base import AssistantTurn, Environment, StepResult
from .tools import CALCULATOR


class CalculatorEnv(Environment):
    """Word problems with a calculator tool: each turn's tool calls are answered with their results;
    a turn without calls is the final answer (scored by the reward functions, e.g. world_correct)."""

    name = "world-calculator"
    tools = (CALCULATOR,)
    tool_parser = "pythonic"   # the tiny world's template writes calls as calculator(expression="...")

    def reset(self, record: dict) -> list[dict]:
        prompt = record["prompt"]
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    def step(self, turn: AssistantTurn) -> StepResult:
        if turn.tool_calls or turn.malformed:
            return StepResult(self.call_tools(turn))
        return StepResult(done=True)
