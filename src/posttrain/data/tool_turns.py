"""Validation of tool use in conversational records (the Hugging Face convention).

A conversational record may carry the tools its assistant could call and the turns that call
them::

    {"tools": [{"type": "function", "function": {"name": "calculator", "description": "...",
                "parameters": {"type": "object", "properties": {"expression": {...}}}}}],
     "messages": [
        {"role": "user", "content": "Mia has 14 shells. She finds 9 more. ..."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "14 + 9"}}}]},
        {"role": "tool", "name": "calculator", "content": "23"},
        {"role": "assistant", "content": "#### 23"}]}

``tools`` is passed to the chat template as ``tools=``; every assistant turn (a tool-calling one
included) is trained, tool results are not. The checks here are called by
:mod:`posttrain.data.formats` with its per-record checker (``chk.fail`` names file, line and
field). Normalization: a tool call is ``{"type": "function", "function": {"name", "arguments"}}``
(plus its ``id`` if given) with ``arguments`` an object (a JSON string is parsed; a bare
``{"name", "arguments"}`` call is wrapped); a tool-calling turn's null content becomes ``""``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

#: keys a message of each role may carry besides role and content (with tool turns allowed)
TOOL_MESSAGE_KEYS = {"assistant": ("tool_calls",), "tool": ("name", "tool_call_id")}

_SCHEMA_FIX = ('write \'tools\' as a list of function schemas such as {"type": "function", "function": '
               '{"name": "calculator", "description": "...", "parameters": {"type": "object", '
               '"properties": {"expression": {"type": "string"}}}}}.')


def check_tools(chk, value: Any, field: str = "tools") -> list[dict]:
    """The record's ``tools``: a list of function schemas, OpenAI-style (``{"type": "function",
    "function": {...}}``) or bare (``{"name": ..., "parameters": ...}``), each with a string name
    and, if given, an object of parameters. Returned as given (copied)."""
    if not isinstance(value, (list, tuple)):
        raise chk.fail(field, f"expected a list of tool schemas, found {chk.kind(value)}.", _SCHEMA_FIX)
    out = []
    for i, tool in enumerate(value):
        path = f"{field}[{i}]"
        if not isinstance(tool, Mapping):
            raise chk.fail(path, f"expected a tool schema (an object), found {chk.kind(tool)}.", _SCHEMA_FIX)
        fn, fn_path = _function_part(chk, tool, path, "tool", "the function's schema", _SCHEMA_FIX)
        params = fn.get("parameters")
        if params is not None and not (isinstance(params, Mapping)
                                       and isinstance(params.get("properties", {}), Mapping)):
            raise chk.fail(f"{fn_path}.parameters", "expected a JSON schema object whose 'properties' is an "
                           f"object, found {chk.kind(params)}.", _SCHEMA_FIX)
        out.append(dict(tool))
    return out


def _function_part(chk, obj: Mapping, path: str, what: str, inner: str, fix: str) -> tuple[Mapping, str]:
    """The function part of a tool schema or call (``{"type": "function", "function": {...}}`` or the
    bare function object) and its field path; it must have a non-empty ``name``."""
    fn, fn_path = obj, path
    if "function" in obj:
        if obj.get("type", "function") != "function":
            raise chk.fail(f"{path}.type", f"unsupported {what} type {obj['type']!r}; only 'function'.", fix)
        fn, fn_path = obj["function"], f"{path}.function"
        if not isinstance(fn, Mapping):
            raise chk.fail(fn_path, f"expected {inner} (an object), found {chk.kind(fn)}.", fix)
    if not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise chk.fail(f"{fn_path}.name", f"the {what} has no name (a non-empty string).", fix)
    return fn, fn_path


_CALL_FIX = ('write each call as {"type": "function", "function": {"name": "calculator", "arguments": '
             '{"expression": "14 + 9"}}}.')


def check_tool_calls(chk, value: Any, field: str) -> list[dict]:
    """An assistant message's ``tool_calls``, normalized (see the module docstring)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise chk.fail(field, f"expected a non-empty list of tool calls, found {chk.kind(value)}.", _CALL_FIX)
    out = []
    for i, call in enumerate(value):
        path = f"{field}[{i}]"
        if not isinstance(call, Mapping):
            raise chk.fail(path, f"expected a tool call (an object), found {chk.kind(call)}.", _CALL_FIX)
        fn, fn_path = _function_part(chk, call, path, "tool call", "the called function", _CALL_FIX)
        args = fn.get("arguments", {})
        if args is None:
            args = {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as exc:
                raise chk.fail(f"{fn_path}.arguments", f"the arguments string is not valid JSON ({exc.msg}).",
                               _CALL_FIX) from None
        if not isinstance(args, Mapping):
            raise chk.fail(f"{fn_path}.arguments", f"expected the arguments as an object, found {chk.kind(args)}.",
                           _CALL_FIX)
        normalized = {"type": "function", "function": {"name": fn["name"], "arguments": dict(args)}}
        if call.get("id") is not None:
            normalized["id"] = call["id"]
        out.append(normalized)
    return out


def next_roles(previous: Mapping | None, first: str) -> tuple[str, ...]:
    """The roles that may follow message ``previous`` in a conversation with tool turns (``first``:
    the role that opens it). After an assistant turn with tool calls come its results (``tool``);
    after results, more results or the assistant's next turn; after a plain assistant turn, the user."""
    if previous is None:
        return (first,)
    role = previous["role"]
    if role == "user":
        return ("assistant",)
    if role == "tool":
        return ("tool", "assistant")
    return ("tool",) if previous.get("tool_calls") else ("user",)
