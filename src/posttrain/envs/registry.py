"""Environments by name: the built-ins (:data:`posttrain.envs.world.WORLD_ENVIRONMENTS`) or a
``package.module:Class`` path."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Environment

ENV_KEY = "env.name"


def _builtins() -> dict[str, type]:
    from .world import WORLD_ENVIRONMENTS

    return dict(WORLD_ENVIRONMENTS)


def environment_names() -> list[str]:
    return sorted(_builtins())


def load_environment(spec: str, options: dict | None = None) -> Environment:
    """The environment ``spec`` names (a built-in, or ``package.module:Class``), built with ``options``."""
    builtins = _builtins()
    if spec in builtins:
        cls = builtins[spec]
    else:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ConfigError(f"{ENV_KEY}={spec!r} is neither a built-in environment ({', '.join(sorted(builtins))}) "
                              "nor a 'package.module:Class' path.",
                              fix="use a built-in name, or the path of your Environment subclass.")
        from ..rewards.registry import import_user_module

        module = import_user_module(module_name, f"Config key '{ENV_KEY}' has value '{spec}'")
        cls = getattr(module, attr, None)
        if cls is None:
            raise ConfigError(f"{ENV_KEY}={spec!r}: module '{module_name}' has no attribute '{attr}'.",
                              fix="check the class name after the colon.")
        if not (isinstance(cls, type) and issubclass(cls, Environment)):
            raise ConfigError(f"{ENV_KEY}={spec!r} is {cls!r}, not a subclass of posttrain.envs.Environment.",
                              fix="subclass posttrain.envs.Environment and override reset and step.")
    try:
        return cls(**dict(options or {}))
    except ConfigError:
        raise
    except TypeError as exc:
        raise ConfigError(f"env.options={options!r}: building environment {spec!r} failed: {exc}.",
                          fix="pass only the options its constructor takes.") from exc
