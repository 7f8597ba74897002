"""The world's calculator environment, driven by hand-built assistant turns."""

from __future__ import annotations

import pytest

from posttrain.envs import AssistantTurn, StepResult, ToolCall, load_environment
from posttrain.envs.base import check_messages, check_step
from posttrain.envs.calculator import CalculatorEnv
from posttrain.envs.tools import CALCULATOR
from posttrain.errors import ConfigError

QUESTION = "Mia has 14 shells. She finds 9 more. How many shells does Mia have now?"


def turn(text="", calls=(), malformed=(), index=0):
    return AssistantTurn(text=text, tool_calls=list(calls), malformed=list(malformed), finished=True, index=index)


def calc(expression):
    return ToolCall("calculator", {"expression": expression})


def test_reset_opens_with_the_prompt():
    env = CalculatorEnv()
    assert env.reset({"prompt": QUESTION, "answer": "23"}) == [{"role": "user", "content": QUESTION}]
    prompt = [{"role": "system", "content": "Use the calculator."}, {"role": "user", "content": QUESTION}]
    opened = env.reset({"prompt": prompt, "answer": "23"})
    assert opened == prompt and opened[0] is not prompt[0]   # copies: the record is never edited
    assert check_messages(opened, "reset") == prompt
    assert env.tool_schemas() == [CALCULATOR.schema()]


def test_a_call_is_answered_and_the_episode_goes_on():
    result = CalculatorEnv().step(turn('<tool_call>calculator(expression="14 + 9")</tool_call>', [calc("14 + 9")]))
    assert result == StepResult(messages=[{"role": "tool", "name": "calculator", "content": "23"}], reward=None,
                                done=False)
    assert check_step(result) is result


def test_several_calls_then_malformed_ones_in_order():
    result = CalculatorEnv().step(turn(calls=[calc("6 * 7"), calc("7 / 2")],
                                       malformed=["unclosed <tool_call> (no </tool_call> after it)"]))
    assert result.messages == [
        {"role": "tool", "name": "calculator", "content": "42"},
        {"role": "tool", "name": "calculator", "content": "3.5"},
        {"role": "tool", "content": "error: unclosed <tool_call> (no </tool_call> after it)"},
    ]
    assert (result.reward, result.done) == (None, False)


@pytest.mark.parametrize("call, content", [
    (ToolCall("calc", {"expression": "1 + 1"}), "error: unknown tool 'calc'; tools: calculator"),
    (ToolCall("calculator", {"expr": "1 + 1"}),
     "error: calculator: unknown argument(s) ['expr'] and missing argument(s) ['expression']; takes ['expression']"),
    (ToolCall("calculator", {}), "error: calculator: missing argument(s) ['expression']; takes ['expression']"),
    (ToolCall("calculator", {"expression": 23}), "error: calculator: expression must be a string, not int"),
    (calc("1 / 0"), "error: calculator: division by zero"),
    (calc("2**3"), "error: calculator: only numbers, + - * / and parentheses are allowed"),
    (calc("__import__('os')"), "error: calculator: only numbers, + - * / and parentheses are allowed"),
])
def test_bad_calls_get_error_observations(call, content):
    result = CalculatorEnv().step(turn(calls=[call]))
    assert [m["content"] for m in result.messages] == [content] and not result.done
    assert check_step(result) is result


def test_a_malformed_call_alone_is_answered():
    result = CalculatorEnv().step(turn("<tool_call>calculator(os.system('x'))</tool_call>", malformed=[
        "tool call arguments must be literals (strings, numbers): \"calculator(os.system('x'))\""]))
    assert result.messages == [{"role": "tool", "content": "error: tool call arguments must be literals (strings, "
                                                           "numbers): \"calculator(os.system('x'))\""}]
    assert not result.done


def test_a_turn_without_calls_ends_the_episode_unscored():
    result = CalculatorEnv(tool_cost=0.5).step(turn("#### 23", index=2))
    assert result == StepResult(messages=[], reward=None, done=True)
    assert check_step(result) is result
    # a reply cut at max_new_tokens without calls ends it too
    cut = AssistantTurn(text="14 + 9 =", tool_calls=[], malformed=[], finished=False, index=0)
    assert CalculatorEnv().step(cut).done


def test_tool_cost_charges_every_call_malformed_ones_included():
    env = load_environment("world-calculator", {"tool_cost": 0.25})
    assert isinstance(env, CalculatorEnv) and env.tool_cost == 0.25
    assert env.step(turn(calls=[calc("1 + 1")])).reward == -0.25
    assert env.step(turn(calls=[calc("1 + 1"), calc("2 + 2")], malformed=["bad"])).reward == -0.75
    assert check_step(env.step(turn(calls=[calc("1 + 1")]))).reward == -0.25
    fresh = env.fresh()
    assert fresh is not env and fresh.tool_cost == 0.25
    assert load_environment("world-calculator").tool_cost == 0.0


@pytest.mark.parametrize("options, words", [
    ({"tool_cost": -0.1}, "env.options.tool_cost=-0.1"),
    ({"tool_cost": "0.1"}, "env.options.tool_cost='0.1'"),
    ({"tool_cost": float("nan")}, "env.options.tool_cost=nan"),
    ({"tool_cost": True}, "env.options.tool_cost=True"),
    ({"cost": 1.0}, "env.options has keys ['cost']"),
])
def test_bad_options_are_refused(options, words):
    with pytest.raises(ConfigError) as info:
        load_environment("world-calculator", options)
    assert words in str(info.value)
