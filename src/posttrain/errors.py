"""User-facing errors.

Every error a user can cause by what they pass in (a data file, a config value, a
checkpoint directory, a tokenizer) is raised as a :class:`PosttrainError` subclass with a
one-paragraph message that names *where* the problem is (file, line, field or config key)
and *how to fix it*. The command-line entry point prints these messages without a stack
trace; anything else escaping is a bug in posttrain.
"""

from __future__ import annotations


class PosttrainError(Exception):
    """Base class for errors caused by user input; the message is shown as-is."""

    def __init__(self, message: str, *, fix: str | None = None):
        self.problem = message
        self.fix = fix
        full = message if fix is None else f"{message} Fix: {fix}"
        super().__init__(full)


class ConfigError(PosttrainError):
    """A config key that does not exist, or a value of the wrong type or out of range."""


class DataError(PosttrainError):
    """A dataset record that is malformed; the message names file, line and field."""


class TokenizerError(PosttrainError):
    """A tokenizer that cannot be used as asked (no chat template, no pad/eos token, ...)."""


class CheckpointError(PosttrainError):
    """A checkpoint that is partial, corrupt, or written by a different model/config."""


class TrainingError(PosttrainError):
    """Training cannot continue (e.g. too many non-finite steps)."""


def setting(key: str) -> str:
    """How a message names a setting: ``Config key 'train.lr'`` or ``Option '--model'`` (command-line flags)."""
    return f"Option '{key}'" if key.startswith("-") else f"Config key '{key}'"


def where(source: str | None, line: int | None = None, field: str | None = None) -> str:
    """Format a location prefix such as ``data/train.jsonl, line 12, field 'messages[2].role'``."""
    parts = [source or "<in-memory data>"]
    if line is not None:
        parts.append(f"line {line}")
    if field is not None:
        parts.append(f"field '{field}'")
    return ", ".join(parts)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: carries where the run stopped and what it can resume from."""

    def __init__(self, *, step: int, total_steps: int, output_dir, checkpoint=None):
        self.step = step
        self.total_steps = total_steps
        self.output_dir = output_dir
        self.checkpoint = checkpoint
        super().__init__(f"interrupted after step {step}/{total_steps}")
