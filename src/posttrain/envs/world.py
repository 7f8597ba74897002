"""The tiny world's environments, by name (``env.name``)."""

from __future__ import annotations

from .calculator import CalculatorEnv
from .users import USER_ENVIRONMENTS

WORLD_ENVIRONMENTS: dict[str, type] = {"world-calculator": CalculatorEnv, **USER_ENVIRONMENTS}
