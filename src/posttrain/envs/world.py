"""The tiny world's environments, by name (``env.name``)."""

from __future__ import annotations

WORLD_ENVIRONMENTS: dict[str, type] = {}


def _register() -> None:
    from .calculator import CalculatorEnv

    WORLD_ENVIRONMENTS.update({"world-calculator": CalculatorEnv})
    try:
        from .users import USER_ENVIRONMENTS
    except ImportError:  # pragma: no cover (the simulated users land separately)
        return
    WORLD_ENVIRONMENTS.update(USER_ENVIRONMENTS)


_register()
