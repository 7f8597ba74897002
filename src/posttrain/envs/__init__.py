"""Environments for multi-turn episodes: the interface (:mod:`.base`), tools and their parsers
(:mod:`.tools`), and the tiny world's environments (:mod:`.world`)."""

from .base import AssistantTurn, Environment, StepResult
from .registry import environment_names, load_environment
from .tools import CALCULATOR, TOOL_PARSERS, Tool, ToolCall, calculate, parse_tool_calls

__all__ = ["AssistantTurn", "CALCULATOR", "Environment", "StepResult", "TOOL_PARSERS", "Tool", "ToolCall",
           "calculate", "environment_names", "load_environment", "parse_tool_calls"]
