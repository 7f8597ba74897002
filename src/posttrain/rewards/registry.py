"""Reward functions by name: the built-ins, and a user's own functions by import path.

``reward.functions`` lists names; each is either

* a key of :data:`REWARD_REGISTRY` (``world_correct``, ``format``, ``math_answer``, ``overlong``,
  ``reward_model``, ``prm``, ``teacher_logprob``), whose factory is called once with the built-ins'
  settings (``options``: ``overlong_buffer``, ``overlong_max_length``, ``format_strict``,
  ``reward_model``, ``reward_model_batch_size``, ``reward_model_dtype``, ``reward_model_format``,
  ``process_reward_model``, ``process_aggregation``, ``teacher_model``, ``teacher_dtype``,
  ``teacher_batch_size``, ``teacher_temperature``, ``policy`` (the model being trained); each
  factory reads its own and ignores the rest), or
* a ``package.module:function`` path to a reward function of the user's (the function itself,
  not a factory). **Resolving it imports that module, which runs its top-level code like any
  Python import**: naming it in the config is the user's explicit choice, as with ``python -c
  "import package.module"``. Modules are found on ``sys.path``, then in the current working
  directory (appended to ``sys.path``, and kept there when the module was found in it). The
  function must accept ``(prompts, completions, **kwargs)``; it may declare the record fields
  it reads as an attribute, ``my_fn.needs_fields = ("answer",)``.

Registering a built-in of one's own is adding a factory to :data:`REWARD_REGISTRY`
(``factory(*, tokenizer=None, device=None, log=print, **options) -> RewardFn``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable

from ..errors import ConfigError
from .answers import format_reward, math_answer_reward, world_correct_reward
from .base import RewardFn, RewardFunction
from .length import overlong_reward
from .process import prm_reward
from .reward_model import reward_model_reward
from .teacher import teacher_logprob_reward

REWARD_REGISTRY: dict[str, Callable[..., RewardFn]] = {
    "world_correct": world_correct_reward,
    "format": format_reward,
    "math_answer": math_answer_reward,
    "overlong": overlong_reward,
    "reward_model": reward_model_reward,
    "prm": prm_reward,
    "teacher_logprob": teacher_logprob_reward,
}

_FUNCTIONS_KEY = "reward.functions"
_WEIGHTS_KEY = "reward.weights"


def _valid_names() -> str:
    return ", ".join(sorted(REWARD_REGISTRY))


def _is_module(exc: ModuleNotFoundError, module_name: str) -> bool:
    """Whether the missing module is ``module_name`` itself (or a parent package), not something it imports."""
    return exc.name is None or module_name == exc.name or module_name.startswith(exc.name + ".")


def _import_module(module_name: str, spec: str):
    return import_user_module(module_name, _setting_value(spec), f"Built-in reward functions: {_valid_names()}.")


def import_user_module(module_name: str, setting: str, known: str = ""):
    """Import the user's ``module_name`` (named by ``setting``, e.g. "Config key 'k' has value 'v'";
    ``known`` lists the built-in alternatives for the error message); when it is not on ``sys.path``, once more with the working directory
    appended to ``sys.path`` (where it then stays, lowest priority, so the module's own later
    imports of its neighbours work too; a console script's ``sys.path`` lacks the working
    directory, unlike ``python -m``)."""
    cwd = os.getcwd()
    added = False
    try:
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not _is_module(exc, module_name) or cwd in sys.path:
                raise
            sys.path.append(cwd)
            added = True
            module = importlib.import_module(module_name)
            added = False  # found thanks to it: keep it
            return module
    except ModuleNotFoundError as exc:
        if _is_module(exc, module_name):
            raise ConfigError(
                f"{setting}, but no module '{module_name}' can be imported (looked on sys.path and in "
                f"the working directory {cwd}). {known}".rstrip(),
                fix="use a built-in name, or a 'package.module:name' path of a module that Python can import "
                "(run from the directory that holds it, or add that directory to PYTHONPATH).") from None
        raise ConfigError(
            f"{setting}: importing module '{module_name}' failed: {exc}.",
            fix=f"install the missing package ('{exc.name}') or fix the import in '{module_name}'.") from exc
    except Exception as exc:  # the user's module raised while running its top-level code
        raise ConfigError(
            f"{setting}: importing module '{module_name}' raised {type(exc).__name__}: {exc}",
            fix=f"fix the error in '{module_name}' (the traceback is chained to this error).") from exc
    finally:
        if added:
            sys.path.remove(cwd)


def _setting_value(spec: str) -> str:
    return f"Config key '{_FUNCTIONS_KEY}' has value '{spec}'"


def _check_signature(fn, spec: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C callables: nothing to check
        return
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_positional = any(p.kind == p.VAR_POSITIONAL for p in params)
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in params)
    if (len(positional) < 2 and not var_positional) or not var_keyword:
        raise ConfigError(
            f"{_setting_value(spec)}, a function with signature {getattr(fn, '__name__', 'fn')}{sig}; a reward "
            "function must accept (prompts, completions, **kwargs): it receives completion_ids, finished, "
            "max_new_tokens and every record field as keyword arguments.",
            fix="define it as def my_reward(prompts, completions, **kwargs) -> list[float | None].")


def _resolve_path(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ConfigError(
            f"{_setting_value(spec)}, which is neither a built-in reward function ({_valid_names()}) nor a "
            "'package.module:function' path.", fix="use one of the built-in names or a path like "
            "my_rewards:length_penalty.")
    module = _import_module(module_name, spec)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                            and getattr(v, "__module__", None) == module.__name__)
            close = difflib.get_close_matches(part, public, n=3)
            shown = ", ".join(public[:10]) + (", ..." if len(public) > 10 else "") or "none"
            raise ConfigError(
                f"{_setting_value(spec)}, but module '{module_name}' has no attribute '{attr}' ("
                + (f"did you mean {', '.join(close)}?" if close else f"functions defined there: {shown}") + ").",
                fix="check the spelling of the function name after the ':'.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{_setting_value(spec)}, but '{attr}' in module '{module_name}' is a "
                          f"{type(obj).__name__}, not a function.", fix="name a function after the ':'.")
    _check_signature(obj, spec)
    return obj


def _needs_fields(fn, name: str) -> tuple[str, ...]:
    needs = getattr(fn, "needs_fields", ())
    if isinstance(needs, str):
        needs = (needs,)
    try:
        needs = tuple(needs)
    except TypeError:
        needs = None
    if needs is None or not all(isinstance(k, str) for k in needs):
        raise ConfigError(f"Reward function '{name}' declares needs_fields={getattr(fn, 'needs_fields', None)!r}; "
                          "expected a tuple of record field names.", fix="set fn.needs_fields = (\"answer\",) or "
                          "leave it unset.")
    return needs


def _weights(names: list[str], weights) -> list[float]:
    if weights is None:
        return [1.0] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ConfigError(
            f"Config key '{_WEIGHTS_KEY}' has {len(weights)} value(s) {weights} for {len(names)} reward function(s) "
            f"{names}; it needs one weight per function, in the same order.",
            fix=f"give {len(names)} weights, or leave {_WEIGHTS_KEY} unset (every weight 1.0).")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
            raise ConfigError(f"Config key '{_WEIGHTS_KEY}' has value {w!r} at position {i} (for '{names[i]}'); "
                              "a weight must be a finite number.", fix="use a number such as 1.0 (0 logs the "
                              "function without using it).")
    return [float(w) for w in weights]


def resolve_reward_functions(names: list[str], weights: list[float] | None, *, options: dict | None = None,
                             tokenizer=None, device=None, log: Callable[[str], None] | None = print
                             ) -> list[RewardFunction]:
    """The configured reward functions, resolved and built (a reward model is loaded here).

    ``names``: registry keys or ``package.module:function`` paths (see the module docstring);
    ``weights``: one per name (default 1.0 each); ``options``: the built-ins' settings;
    ``tokenizer``: the policy's (the reward model notes a difference); ``device``: where a reward
    model runs; ``log``: where notes go. Raises ConfigError naming ``reward.functions`` /
    ``reward.weights`` (or the option's key) for anything that cannot be resolved.
    """
    if isinstance(names, str):
        names = [names]
    names = list(names or [])
    if not names:
        raise ConfigError(f"Config key '{_FUNCTIONS_KEY}' is empty: the online loop needs at least one reward "
                          "function.", fix=f"set {_FUNCTIONS_KEY}, e.g. [world_correct] or [math_answer, format]; "
                          f"built-ins: {_valid_names()}.")
    ws = _weights(names, weights)
    options = dict(options or {})
    reserved = {"tokenizer", "device", "log"} & set(options)
    if reserved:
        raise ConfigError(f"reward options may not be named {sorted(reserved)}.", fix="rename them.")
    out: list[RewardFunction] = []
    seen: set[str] = set()
    for spec, w in zip(names, ws):
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"Config key '{_FUNCTIONS_KEY}' holds {spec!r}; every entry must be a built-in name or "
                              "a 'package.module:function' path.", fix=f"built-ins: {_valid_names()}.")
        name = spec.strip()
        if name in seen:
            raise ConfigError(f"Config key '{_FUNCTIONS_KEY}' names '{name}' twice; each reward function is logged "
                              f"as reward/<name>, so names must be unique.",
                              fix="list it once and set its weight in reward.weights.")
        seen.add(name)
        if name in REWARD_REGISTRY:
            fn = REWARD_REGISTRY[name](**options, tokenizer=tokenizer, device=device, log=log)
        elif ":" in name:
            fn = _resolve_path(name)
        else:
            raise ConfigError(
                f"{_setting_value(name)}, which is neither a built-in reward function nor a "
                f"'package.module:function' path. Built-in reward functions: {_valid_names()}.",
                fix="use one of those names, or the import path of your own function, e.g. "
                "my_rewards:length_penalty.")
        out.append(RewardFunction(name=name, fn=fn, weight=w, needs_fields=_needs_fields(fn, name)))
    return out
