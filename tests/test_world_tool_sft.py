"""builtin:world-tool-sft: word problems solved with calculator calls or a worked solution."""

from __future__ import annotations

import hashlib

import pytest
from transformers import AutoTokenizer

from posttrain.algorithms.sft import SFTDataConfig, load_sft_source
from posttrain.data import load_records
from posttrain.data.tokenize import IGNORE_INDEX, encode_dataset
from posttrain.envs import AssistantTurn
from posttrain.envs.calculator import CalculatorEnv
from posttrain.envs.tools import CALCULATOR, parse_pythonic
from posttrain.models.loading import BUILTIN_MODELS
from posttrain.world.datasets import tool_sft_record, tool_sft_records, uses_tool
from posttrain.world.sources import BUILTINS, builtin_records
from posttrain.world.tasks import Problem, Step, generate_problems

Q = "Mia has 14 shells. She finds 9 more. Then she gives away 5. How many shells does Mia have now?"
PROBLEM = Problem(Q, (Step(14, "+", 9, 23), Step(23, "-", 5, 18)), 3)


def tool_turn(expression, result):
    return [{"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}]},
            {"role": "tool", "name": "calculator", "content": result}]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-world-base"])


def test_a_problem_solved_with_and_without_the_tool():
    assert tool_sft_record(PROBLEM, True) == {
        "tools": [CALCULATOR.schema()],
        "messages": [{"role": "user", "content": Q}, *tool_turn("14 + 9", "23"), *tool_turn("23 - 5", "18"),
                     {"role": "assistant", "content": "#### 18"}]}
    assert tool_sft_record(PROBLEM, False) == {
        "tools": [CALCULATOR.schema()],
        "messages": [{"role": "user", "content": Q},
                     {"role": "assistant", "content": "14 + 9 = 23\n23 - 5 = 18\n#### 18"}]}
    p = Problem("Tom puts 84 pears into 7 equal groups. How many pears are in each group?",
                (Step(84, "/", 7, 12),), 2)
    assert tool_sft_record(p, True)["messages"][1:] == [*tool_turn("84 / 7", "12"),
                                                       {"role": "assistant", "content": "#### 12"}]
    q = Problem("x", (Step(6, "*", 7, 42),), 2)
    assert tool_sft_record(q, True)["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"expression": "6 * 7"}


def test_the_choice_is_a_fixed_draw_per_question():
    u = int.from_bytes(hashlib.sha256(f"tool-sft:{Q}".encode()).digest()[:8], "big") / 2**64
    assert uses_tool(PROBLEM, u + 1e-9) and not uses_tool(PROBLEM, u)
    problems = generate_problems(400, seed=0)
    assert not any(uses_tool(p, 0.0) for p in problems) and all(uses_tool(p, 1.0) for p in problems)
    at = {f: {p.question for p in problems if uses_tool(p, f)} for f in (0.3, 0.5, 0.8)}
    assert at[0.3] <= at[0.5] <= at[0.8]          # raising the fraction only adds tool solutions
    assert 160 <= len(at[0.5]) <= 240             # 400 fair draws: 200 +- 4 standard deviations
    records = tool_sft_records(400, seed=0, tool_fraction=0.5)
    assert sum(len(r["messages"]) > 2 for r in records) == len(at[0.5])
    with pytest.raises(ValueError, match="tool_fraction must be in"):
        tool_sft_records(1, seed=0, tool_fraction=1.5)


def test_the_builtin_source_and_its_option():
    b = BUILTINS["builtin:world-tool-sft"]
    assert (b.kind, b.format, b.options) == ("sft", "conversational", ("world_tool_fraction",))
    kw = dict(kinds=("sft",), n=20, n_heldout=10, seed=3, key="data.train", what="SFT data")
    default = builtin_records("builtin:world-tool-sft", **kw).records
    assert default == tool_sft_records(20, seed=3, tool_fraction=0.5)
    held = builtin_records("builtin:world-tool-sft-heldout", **kw).records
    assert held == tool_sft_records(10, seed=3, split="heldout")
    every = load_sft_source("builtin:world-tool-sft", SFTDataConfig(world_examples=20, world_tool_fraction=1.0), 3)
    assert all(r["messages"][1].get("tool_calls") for r in every.records)
    none = load_sft_source("builtin:world-tool-sft", SFTDataConfig(world_examples=20, world_tool_fraction=0.0), 3)
    assert all(len(r["messages"]) == 2 for r in none.records)


def test_both_kinds_share_the_prompt_and_train_only_assistant_turns(tok):
    with_tool, without = (load_records([tool_sft_record(PROBLEM, t)]) for t in (True, False))
    (a,), _ = encode_dataset(with_tool, tok, max_length=512)
    (b,), _ = encode_dataset(without, tok, max_length=512)
    prompt = tok(f"<|im_start|>system\ntools: calculator(expression)<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n"
                 "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for ex in (a, b):
        assert ex.input_ids[:len(prompt)] == prompt and set(ex.labels[:len(prompt)]) == {IGNORE_INDEX}
    trained = tok.decode([i for i, lab in zip(a.input_ids, a.labels) if lab != IGNORE_INDEX])
    assert trained == ('<tool_call>calculator(expression="14 + 9")</tool_call><|im_end|>'
                       '<tool_call>calculator(expression="23 - 5")</tool_call><|im_end|>#### 18<|im_end|>')
    assert tok.decode([i for i, lab in zip(b.input_ids, b.labels) if lab != IGNORE_INDEX]) == \
        "14 + 9 = 23\n23 - 5 = 18\n#### 18<|im_end|>"


def test_every_rendered_call_replays_in_the_environment(tok):
    """The template's call text parses back and CalculatorEnv answers exactly the record's tool turns."""
    env = CalculatorEnv()
    for record in tool_sft_records(40, seed=1, tool_fraction=1.0):
        msgs = record["messages"]
        for i, m in enumerate(msgs):
            if not m.get("tool_calls"):
                continue
            text = tok.apply_chat_template(msgs[: i + 1], tools=record["tools"], tokenize=False)
            body = text.rsplit("<|im_start|>assistant\n", 1)[1]
            calls, problems = parse_pythonic(body, {"calculator": ["expression"]})
            assert problems == []
            result = env.step(AssistantTurn(body, calls, [], True, i))
            assert result.messages == [msgs[i + 1]] and not result.done


def test_tool_conversations_fit_the_world_model(tok):
    records = tool_sft_records(200, seed=0, tool_fraction=1.0)
    examples, report = encode_dataset(load_records(records), tok, max_length=512)
    assert report.kept == 200 and report.truncated == 0
    # three calls (level 4) cost ~250 tokens: past the base model's pre-training length (256, RoPE),
    # well inside its 512 positions and data.max_length
    assert max(len(e) for e in examples) == 267
