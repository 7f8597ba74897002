"""posttrain.envs.tools: the hermes and pythonic parsers, the safe calculator and Tool.run."""

from __future__ import annotations

import pytest

from posttrain.envs.tools import (CALCULATOR, Tool, ToolCall, calculate, parse_hermes, parse_pythonic,
                                  parse_tool_calls)

POS = {"calculator": ["expression"]}


# --------------------------------------------------------------------------- hermes


def test_hermes_reads_every_call_in_order_around_text():
    text = ('Let me add.\n<tool_call>{"name": "calculator", "arguments": {"expression": "14 + 9"}}</tool_call>\n'
            'and <tool_call> {"name": "lookup", "arguments": "{\\"key\\": 3}"} </tool_call> done')
    assert parse_hermes(text) == ([ToolCall("calculator", {"expression": "14 + 9"}), ToolCall("lookup", {"key": 3})],
                                  [])


def test_hermes_without_arguments_and_without_calls():
    assert parse_hermes('<tool_call>{"name": "now"}</tool_call>') == ([ToolCall("now", {})], [])
    assert parse_hermes("#### 23") == ([], [])
    assert parse_hermes("a stray </tool_call> close") == ([], [])


def test_hermes_problems_keep_the_good_calls():
    text = ('<tool_call>{"name": "calculator", "arguments": {"expression": "1 + 1"}}</tool_call>'
            '<tool_call>{"name": "calculator", "arguments": {"expression": }</tool_call>'
            '<tool_call>["calculator"]</tool_call>'
            '<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>'
            '<tool_call>{"name": "calculator", "arguments": "not json"}</tool_call>'
            '<tool_call>{"name": "calculator"')
    calls, problems = parse_hermes(text)
    assert calls == [ToolCall("calculator", {"expression": "1 + 1"})]
    assert problems == [
        "unclosed <tool_call> (no </tool_call> after it)",
        "tool call is not valid JSON (Expecting value at character 51): "
        "'{\"name\": \"calculator\", \"arguments\": {\"expression\": }'",
        "tool call needs a string 'name': '[\"calculator\"]'",
        "tool call arguments are not an object: '{\"name\": \"calculator\", \"arguments\": [1]}'",
        "tool call arguments are not a JSON object: '{\"name\": \"calculator\", \"arguments\": \"not json\"}'",
    ]


def test_hermes_refuses_deep_nesting_without_raising():
    calls, problems = parse_hermes("<tool_call>" + "[" * 100_000 + "</tool_call>")
    assert calls == [] and problems[0].startswith("tool call is nested too deeply")


# --------------------------------------------------------------------------- pythonic


def test_pythonic_keyword_positional_and_json_literals():
    text = ('<tool_call>calculator(expression="14 + 9")</tool_call> then '
            "<tool_call>calculator('3 * 4')</tool_call>"
            "<tool_call>lookup(key=[1, 2.5, {'a': None}], exact=true, limit=null, neg=-3)</tool_call>")
    calls, problems = parse_pythonic(text, POS)
    assert problems == []
    assert calls == [ToolCall("calculator", {"expression": "14 + 9"}), ToolCall("calculator", {"expression": "3 * 4"}),
                     ToolCall("lookup", {"key": [1, 2.5, {"a": None}], "exact": True, "limit": None, "neg": -3})]


def test_pythonic_positional_arguments_take_the_parameter_names_in_order():
    calls, problems = parse_pythonic('<tool_call>search("cats", k=3)</tool_call>', {"search": ["query", "k"]})
    assert calls == [ToolCall("search", {"query": "cats", "k": 3})] and problems == []
    assert list(calls[0].arguments) == ["query", "k"]
    # through parse_tool_calls the names come from the tools' schemas
    assert parse_tool_calls('<tool_call>calculator("2 / 4")</tool_call>', "pythonic", [CALCULATOR]) == \
        ([ToolCall("calculator", {"expression": "2 / 4"})], [])


@pytest.mark.parametrize("body, problem", [
    ('calculator(os.system("x"))', "tool call arguments must be literals (strings, numbers): "
                                   "'calculator(os.system(\"x\"))'"),
    ('calculator(expression=open("f").read())', "tool call arguments must be literals (strings, numbers): "
                                                "'calculator(expression=open(\"f\").read())'"),
    ("calculator(expression=x)", "tool call arguments must be literals (strings, numbers): "
                                 "'calculator(expression=x)'"),
    ("calculator(expression=14 * 9)", "tool call arguments must be literals (strings, numbers): "
                                      "'calculator(expression=14 * 9)'"),
    ("calculator(**{'expression': '1'})", "tool call arguments must be literals (no **): "
                                          "\"calculator(**{'expression': '1'})\""),
    ("os.system('x')", "tool call is not name(arguments): \"os.system('x')\""),
    ("__import__('os')('x')", "tool call is not name(arguments): \"__import__('os')('x')\""),
    ("calculator", "tool call is not name(arguments): 'calculator'"),
    ('calculator("1", "2")', "tool call calculator has 2 positional argument(s); it takes ['expression']"),
    ('unknown("1")', "tool call unknown has 1 positional argument(s); it takes []"),
    ('calculator("1", expression="2")', "tool call calculator gives argument(s) ['expression'] more than once: "
                                        "'calculator(\"1\", expression=\"2\")'"),
    ('calculator(expression="1", expression="2")', "tool call calculator gives argument(s) ['expression'] more "
                                                   "than once: 'calculator(expression=\"1\", expression=\"2\")'"),
    ('calculator(expression="1"', "tool call is not name(arguments): '(' was never closed: "
                                  "'calculator(expression=\"1\"'"),
])
def test_pythonic_refuses_what_is_not_a_literal_call(body, problem):
    assert parse_pythonic(f"<tool_call>{body}</tool_call>", POS) == ([], [problem])


def test_pythonic_unclosed_tag_and_deep_nesting():
    text = '<tool_call>calculator(expression="1 + 1")</tool_call><tool_call>calculator(expression="2'
    assert parse_pythonic(text) == ([ToolCall("calculator", {"expression": "1 + 1"})],
                                    ["unclosed <tool_call> (no </tool_call> after it)"])
    calls, problems = parse_pythonic("<tool_call>f(x=" + "-" * 100_000 + "1)</tool_call>")
    assert calls == [] and problems[0].startswith("tool call is nested too deeply")


def test_parse_tool_calls_names_the_known_parsers():
    with pytest.raises(ValueError, match="unknown tool parser 'xml'; known: hermes, pythonic"):
        parse_tool_calls("", "xml")


# --------------------------------------------------------------------------- the calculator


@pytest.mark.parametrize("expression, value", [
    ("14 + 9", "23"), ("23 - 5", "18"), ("6 * 7", "42"), ("84 / 7", "12"), ("2 - 9", "-7"),
    ("(2 + 3) * 4", "20"), ("2 + 3 * 4", "14"), ("-(3)", "-3"), ("+5", "5"), (" 7 ", "7"),
    ("7 / 2", "3.5"), ("1 / 3", "0.333333"), ("2 / 3", "0.666667"), ("-1 / 8", "-0.125"),
    ("0.1 + 0.2", "0.3"), ("1.5 * 4", "6"), ("1 / 10000000", "0"), ("-1 / 10000000", "0"),
    ("12 × 3 ÷ 4", "9"), ("1_000 + 1", "1001"), ("10 / 4 * 2", "5"),
])
def test_calculate_values(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("1 / 0", "division by zero"),
    ("5 / (3 - 3)", "division by zero"),
    ("2**3", "only numbers, + - * / and parentheses are allowed"),
    ("2 ** 3", "only numbers, + - * / and parentheses are allowed"),
    ("7 // 2", "only numbers, + - * / and parentheses are allowed"),
    ("7 % 2", "only numbers, + - * / and parentheses are allowed"),
    ("__import__('os').system('x')", "only numbers, + - * / and parentheses are allowed"),
    ("x + 1", "only numbers, + - * / and parentheses are allowed"),
    ("True + 1", "only numbers, + - * / and parentheses are allowed"),
    ("1j * 2", "only numbers, + - * / and parentheses are allowed"),
    ("'a' + 'b'", "only numbers, + - * / and parentheses are allowed"),
    ("9" * 31, "number too large"),
    ("9" * 16 + " * " + "9" * 15, "number too large"),
    ("1e999", "number too large"),
    ("1 / " + "7" * 31, "number too large"),
    ("14 + 9 = 23", "cannot parse '14 + 9 = 23'"),
    ("", "cannot parse ''"),
    ("1 + " * 50 + "1", "expression longer than 200 characters"),
])
def test_calculate_refuses(expression, message):
    with pytest.raises(ValueError) as info:
        calculate(expression)
    assert str(info.value) == message


def test_calculate_limits_are_exact():
    assert calculate("9" * 30) == "9" * 30                  # 30 digits pass
    assert calculate("1" + " + 1" * 49 + "   ") == "50"    # 200 characters pass
    with pytest.raises(ValueError, match="expression must be a string, not int"):
        calculate(14)


# --------------------------------------------------------------------------- Tool.run


def test_tool_run_results_and_errors():
    assert CALCULATOR.run({"expression": "14 + 9"}) == "23"
    assert CALCULATOR.run({"expression": "1 / 0"}) == "error: calculator: division by zero"
    assert CALCULATOR.run({"expression": 14}) == "error: calculator: expression must be a string, not int"
    assert CALCULATOR.run({}) == "error: calculator: missing argument(s) ['expression']; takes ['expression']"
    assert CALCULATOR.run({"expr": "1"}) == ("error: calculator: unknown argument(s) ['expr'] and missing "
                                             "argument(s) ['expression']; takes ['expression']")
    assert CALCULATOR.run({"expression": "1", "x": 2}) == \
        "error: calculator: unknown argument(s) ['x']; takes ['expression']"


def test_tool_run_stringifies_and_catches_any_exception():
    def boom(n):
        raise KeyError(n)

    adder = Tool("add", lambda a, b: a + b, parameters={"type": "object", "properties": {"a": {}, "b": {}}})
    assert adder.run({"a": 2, "b": 3}) == "5"
    assert Tool("boom", boom).run({"n": 1}) == "error: boom: 1"   # no declared parameters: passed through


def test_the_calculator_schema():
    assert CALCULATOR.schema() == {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression (+ - * / and parentheses).",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 14 + 9"}},
                       "required": ["expression"]}}}
    assert CALCULATOR.parameter_names() == ["expression"]
