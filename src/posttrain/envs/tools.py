"""Tools the policy can call, the parsers that find its calls, and the built-in calculator.

A :class:`Tool` is a Python function the user registers with a name, a description and a JSON
schema of its parameters; the chat template renders the schemas (``tools=``), the policy writes
calls in the model family's format, a parser (:data:`TOOL_PARSERS`) extracts them, and the
environment runs them and appends the results as ``tool`` messages. Nothing here evaluates
model text as code: the parsers read JSON (``json.loads``) or Python *literals* (``ast``,
literals only), and the calculator walks an arithmetic syntax tree of numbers and ``+ - * /``.

Parsers (``env.tool_parser``):

* ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen 2.5 / 3
  and many others);
* ``pythonic``: ``<tool_call>name(key="value", ...)</tool_call>`` (keyword or positional
  literals, Python's or JSON's ``true`` / ``false`` / ``null``; the tiny world's compact form,
  which its chat template writes with JSON-encoded values).

Each returns ``(calls, problems)``: the well-formed calls in order and a message per malformed
one (an unclosed tag, bad JSON, a missing name, non-literal arguments), which the environment
answers with an error observation and the run counts.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the tool's name and its arguments."""

    name: str
    arguments: dict


@dataclass
class Tool:
    """A function the policy may call. ``parameters``: a JSON schema (``{"type": "object",
    "properties": {...}, "required": [...]}``) of ``fn``'s keyword arguments. ``fn`` returns a
    string (anything else is ``str()``-ed); an exception it raises becomes an error observation."""

    name: str
    fn: Callable[..., object]
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def schema(self) -> dict:
        """The OpenAI-style function schema chat templates take as ``tools=``."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def parameter_names(self) -> list[str]:
        return list(self.parameters.get("properties", {}))

    def run(self, arguments: dict) -> str:
        """The tool's answer to ``arguments``, or ``"error: ..."`` (missing / unknown arguments, or
        the function raised)."""
        names = self.parameter_names()
        unknown = [k for k in arguments if names and k not in names]
        missing = [k for k in self.parameters.get("required", []) if k not in arguments]
        if unknown or missing:
            what = [f"unknown argument(s) {unknown}"] * bool(unknown) + [f"missing argument(s) {missing}"] * bool(missing)
            return f"error: {self.name}: {' and '.join(what)}; takes {names}"
        try:
            return str(self.fn(**arguments))
        except Exception as exc:  # the observation tells the policy what went wrong
            return f"error: {self.name}: {exc}"


def _blocks(text: str) -> tuple[list[str], list[str]]:
    """The bodies of the ``<tool_call>...</tool_call>`` blocks in ``text``, and a problem for an
    unclosed block."""
    bodies, problems = [], []
    pos = 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            break
        end = text.find(CLOSE, start + len(OPEN))
        if end < 0:
            problems.append(f"unclosed {OPEN} (no {CLOSE} after it)")
            break
        bodies.append(text[start + len(OPEN):end].strip())
        pos = end + len(CLOSE)
    return bodies, problems


def parse_hermes(text: str) -> tuple[list[ToolCall], list[str]]:
    """Calls written as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""
    bodies, problems = _blocks(text)
    calls = []
    for body in bodies:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as exc:
            problems.append(f"tool call is not valid JSON ({exc.msg} at character {exc.pos}): {body[:80]!r}")
            continue
        except RecursionError:
            problems.append(f"tool call is nested too deeply: {body[:80]!r}")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            problems.append(f"tool call needs a string 'name': {body[:80]!r}")
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except (json.JSONDecodeError, RecursionError):
                problems.append(f"tool call arguments are not a JSON object: {body[:80]!r}")
                continue
        if not isinstance(args, dict):
            problems.append(f"tool call arguments are not an object: {body[:80]!r}")
            continue
        calls.append(ToolCall(obj["name"], args))
    return calls, problems


_JSON_NAMES = {"true": True, "false": False, "null": None}


class _JSONLiterals(ast.NodeTransformer):
    """JSON's ``true`` / ``false`` / ``null`` as the Python constants (chat templates write values
    with ``tojson``); every other name stays a name, which ``ast.literal_eval`` refuses."""

    def visit_Name(self, node: ast.Name):
        return ast.Constant(_JSON_NAMES[node.id]) if node.id in _JSON_NAMES else node


def _literal(node):
    return ast.literal_eval(_JSONLiterals().visit(node))


def parse_pythonic(text: str, positional: dict[str, list[str]] | None = None) -> tuple[list[ToolCall], list[str]]:
    """Calls written as ``<tool_call>name(key=literal, ...)</tool_call>``. Arguments must be Python
    literals (``ast.literal_eval``: strings, numbers, lists, dicts, and JSON's ``true`` / ``false`` /
    ``null``; never evaluated as code). Positional arguments take the tool's parameter names in
    order (``positional``: name -> names); an argument given twice is a problem."""
    bodies, problems = _blocks(text)
    calls = []
    for body in bodies:
        try:
            node = ast.parse(body, mode="eval").body
        except (SyntaxError, ValueError) as exc:
            problems.append(f"tool call is not name(arguments): {getattr(exc, 'msg', exc)}: {body[:80]!r}")
            continue
        except (MemoryError, RecursionError):   # the parser's own limits on nesting
            problems.append(f"tool call is nested too deeply: {body[:80]!r}")
            continue
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            problems.append(f"tool call is not name(arguments): {body[:80]!r}")
            continue
        name = node.func.id
        if any(kw.arg is None for kw in node.keywords):
            problems.append(f"tool call arguments must be literals (no **): {body[:80]!r}")
            continue
        try:
            args = {kw.arg: _literal(kw.value) for kw in node.keywords}
            values = [_literal(a) for a in node.args]
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            problems.append(f"tool call arguments must be literals (strings, numbers): {body[:80]!r}")
            continue
        keywords = [kw.arg for kw in node.keywords]
        names = (positional or {}).get(name, [])
        if len(values) > len(names):
            problems.append(f"tool call {name} has {len(values)} positional argument(s); it takes {names}")
            continue
        twice = sorted({k for k in keywords if keywords.count(k) > 1} | set(names[:len(values)]) & set(keywords))
        if twice:
            problems.append(f"tool call {name} gives argument(s) {twice} more than once: {body[:80]!r}")
            continue
        calls.append(ToolCall(name, {**dict(zip(names, values)), **args}))
    return calls, problems


TOOL_PARSERS = {"hermes": parse_hermes, "pythonic": parse_pythonic}


def parse_tool_calls(text: str, parser: str, tools=()) -> tuple[list[ToolCall], list[str]]:
    """``(calls, problems)`` of ``text`` with the parser called ``parser`` (see the module docstring)."""
    if parser not in TOOL_PARSERS:
        raise ValueError(f"unknown tool parser {parser!r}; known: {', '.join(sorted(TOOL_PARSERS))}")
    if parser == "pythonic":
        return parse_pythonic(text, {t.name: t.parameter_names() for t in tools})
    return TOOL_PARSERS[parser](text)


# --------------------------------------------------------------------------- the calculator

MAX_DIGITS = 30  # operands and results beyond this many digits are refused (no 9**9**9 blow-ups)


def _value(node) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if node.value in (float("inf"), float("-inf")):   # a literal such as 1e999
            raise ValueError("number too large")
        v = Fraction(node.value) if isinstance(node.value, int) else Fraction(str(node.value))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _value(node.operand)
        v = -v if isinstance(node.op, ast.USub) else v
    elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Add):
            v = a + b
        elif isinstance(node.op, ast.Sub):
            v = a - b
        elif isinstance(node.op, ast.Mult):
            v = a * b
        else:
            if b == 0:
                raise ValueError("division by zero")
            v = a / b
    else:
        raise ValueError("only numbers, + - * / and parentheses are allowed")
    if len(str(abs(v.numerator))) > MAX_DIGITS or len(str(v.denominator)) > MAX_DIGITS:
        raise ValueError("number too large")
    return v


def calculate(expression: str) -> str:
    """The value of an arithmetic ``expression`` (numbers, ``+ - * /``, parentheses): an integer
    as ``"23"``, a fraction as a decimal rounded to 6 places (trailing zeros dropped: ``"3.5"``;
    a value that rounds to zero is ``"0"``). Raises ValueError for anything else.
    It parses the text into a syntax tree and walks it: no ``eval``."""
    if not isinstance(expression, str):
        raise ValueError(f"expression must be a string, not {type(expression).__name__}")
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    try:
        tree = ast.parse(expression.replace("×", "*").replace("÷", "/").strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None
    v = _value(tree.body)
    if v.denominator == 1:
        return str(v.numerator)
    text = f"{float(v):.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


CALCULATOR = Tool(
    name="calculator", fn=calculate, description="Evaluate an arithmetic expression (+ - * / and parentheses).",
    parameters={"type": "object", "properties": {"expression": {"type": "string",
                                                                "description": "e.g. 14 + 9"}},
                "required": ["expression"]})
