"""Conversational records with tools: validation (named file / line / field), normalization, and
assistant-only labels covering every assistant turn (tool calls included), never the tool results."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from posttrain.data import load_records, write_jsonl
from posttrain.data.chat import render_conversation
from posttrain.data.tokenize import IGNORE_INDEX, encode_dataset, encode_sft_example
from posttrain.envs.tools import CALCULATOR, ToolCall, parse_hermes
from posttrain.errors import DataError
from posttrain.models.loading import BUILTIN_MODELS

QUESTION = "Mia has 14 shells. She finds 9 more. How many shells does Mia have now?"
TOOLS = [CALCULATOR.schema()]


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


MESSAGES = [
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": "", "tool_calls": [call("calculator", {"expression": "14 + 9"})]},
    {"role": "tool", "name": "calculator", "content": "23"},
    {"role": "assistant", "content": "#### 23"},
]
RECORD = {"messages": MESSAGES, "tools": TOOLS}
CONV = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-world-base"])


# --------------------------------------------------------------------------- validation


def test_records_with_tools_load_normalized():
    raw = {"id": 7, "tools": [{"name": "calculator", "parameters": {"type": "object", "properties": {}}}],
           "messages": [
               {"role": "system", "content": "Use the tool."},
               {"role": "user", "content": QUESTION},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression": "14 + 9"}'}},
                   {"name": "calculator", "arguments": {"expression": "23 - 5"}}]},
               {"role": "tool", "name": "calculator", "tool_call_id": "c1", "content": "23"},
               {"role": "tool", "content": "18"},
               {"role": "assistant", "content": "#### 18", "tool_calls": None}]}
    (record,) = load_records([raw]).records
    assert record == {"id": 7, "tools": raw["tools"], "messages": [
        {"role": "system", "content": "Use the tool."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "14 + 9"}},
             "id": "c1"},
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "23 - 5"}}}]},
        {"role": "tool", "content": "23", "name": "calculator", "tool_call_id": "c1"},
        {"role": "tool", "content": "18"},
        {"role": "assistant", "content": "#### 18"}]}
    # a record may end on a tool call (trained; its result is not part of the record), and tools are optional
    assert load_records([{"messages": MESSAGES[:2]}]).format == "conversational"


def _with(index, **changes):
    msgs = [dict(m) for m in MESSAGES]
    msgs[index].update(changes)
    return msgs


TOOL_MSG = MESSAGES[2]


@pytest.mark.parametrize("record, field, words", [
    ({"messages": MESSAGES, "tools": "calculator"}, "tools", "expected a list of tool schemas, found a string"),
    ({"messages": MESSAGES, "tools": [3]}, "tools[0]", "expected a tool schema (an object), found an integer"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"description": "x"}}]},
     "tools[0].function.name", "the tool has no name"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": "calculator"}]},
     "tools[0].function", "expected the function's schema (an object), found a string"),
    ({"messages": MESSAGES, "tools": [{"type": "retrieval", "function": {"name": "r"}}]},
     "tools[0].type", "unsupported tool type 'retrieval'"),
    ({"messages": MESSAGES, "tools": [{"name": "c", "parameters": [1]}]},
     "tools[0].parameters", "expected a JSON schema object"),
    ({"messages": MESSAGES, "tools": [{"name": "c", "parameters": {"properties": []}}]},
     "tools[0].parameters", "whose 'properties' is an object"),
    ({"messages": _with(1, tool_calls="calculator")}, "messages[1].tool_calls",
     "expected a non-empty list of tool calls, found a string"),
    ({"messages": _with(1, tool_calls=[])}, "messages[1].tool_calls", "expected a non-empty list of tool calls"),
    ({"messages": _with(1, tool_calls=[7])}, "messages[1].tool_calls[0]", "expected a tool call (an object)"),
    ({"messages": _with(1, tool_calls=[call("calculator", '{"expression": ')])},
     "messages[1].tool_calls[0].function.arguments", "the arguments string is not valid JSON"),
    ({"messages": _with(1, tool_calls=[call("calculator", [1])])},
     "messages[1].tool_calls[0].function.arguments", "expected the arguments as an object, found a list"),
    ({"messages": _with(1, tool_calls=[call("", {})])}, "messages[1].tool_calls[0].function.name",
     "the tool call has no name"),
    ({"messages": _with(1, tool_calls=[{"type": "code", "function": {"name": "c"}}])},
     "messages[1].tool_calls[0].type", "unsupported tool call type 'code'"),
    ({"messages": _with(1, content="", tool_calls=None)}, "messages[1].content", "empty"),
    ({"messages": _with(2, foo="bar")}, "messages[2]", "unsupported message key(s) ['foo']"),
    ({"messages": _with(2, name=3)}, "messages[2].name", "found an integer"),
    ({"messages": _with(0, tool_calls=[call("calculator", {})])}, "messages[0]",
     "unsupported message key(s) ['tool_calls']"),
    ({"messages": [MESSAGES[0], {"role": "assistant", "content": "hm"}, TOOL_MSG, MESSAGES[3]]},
     "messages[2].role", "expected role 'user' here, found 'tool'; a 'tool' turn answers an assistant turn with "
                         "tool_calls"),
    ({"messages": MESSAGES[:2] + [{"role": "user", "content": "?"}, MESSAGES[3]]},
     "messages[2].role", "expected role 'tool' here, found 'user'; the assistant turn before it calls tools"),
    ({"messages": [TOOL_MSG] + MESSAGES}, "messages[0].role", "expected role 'user' here, found 'tool'"),
    ({"messages": MESSAGES[:3] + [{"role": "user", "content": "?"}]},
     "messages[3].role", "expected role 'tool' or 'assistant' here, found 'user'"),
    ({"messages": MESSAGES[:3]}, "messages", None),   # no error: the assistant's tool call is trained
])
def test_tool_record_errors_name_file_line_and_field(tmp_path, record, field, words):
    path = write_jsonl(tmp_path / "t.jsonl", [CONV, record])
    if words is None:
        assert len(load_records(path).records) == 2
        return
    with pytest.raises(DataError) as info:
        load_records(path)
    msg = str(info.value)
    assert f"{path}, line 2, field '{field}'" in msg and words in msg and "Fix:" in msg, msg


@pytest.mark.parametrize("record, field", [
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "tool", "content": "1"}],
      "completion": [{"role": "assistant", "content": "a"}]}, "prompt[1].role"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a", "tool_calls": [call("c", {})]}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "chosen[0]"),
])
def test_tool_turns_stay_refused_outside_conversational_records(record, field):
    with pytest.raises(DataError) as info:
        load_records([record])
    assert f"field '{field}'" in str(info.value)
    assert "supported in conversational ('messages') records only" in str(info.value)


# --------------------------------------------------------------------------- labels


def test_labels_cover_each_assistant_turn_and_not_the_tool_result(tok):
    # hand-derived: the rendered text in pieces, each tokenized on its own (every boundary is a
    # special token or a newline), trained or not
    pieces = [
        (f"<|im_start|>system\ntools: calculator(expression)<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ('<tool_call>calculator(expression="14 + 9")</tool_call><|im_end|>', True),
        ("\n<|im_start|>tool\n23<|im_end|>\n<|im_start|>assistant\n", False),
        ("#### 23<|im_end|>", True),
        ("\n", False),
    ]
    ids, labels = [], []
    for text, trained in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [IGNORE_INDEX] * len(part)
    ex = encode_sft_example(RECORD, tok, format="conversational", max_length=512)
    assert ex.input_ids == ids and ex.labels == labels
    assert (len(ids), ex.num_trainable) == (120, 48)
    # the same through a data set, and without the record's tools only the system block goes
    (same,), _ = encode_dataset(load_records([RECORD]), tok, max_length=512)
    assert same == ex
    bare = encode_sft_example({"messages": MESSAGES}, tok, format="conversational", max_length=512)
    n_system = len(tok(pieces[0][0].split("<|im_start|>user")[0], add_special_tokens=False)["input_ids"])
    assert bare.input_ids == ids[n_system:] and bare.labels == labels[n_system:]


HERMES_TEMPLATE = (   # a published-style template without {% generation %} markers: the incremental path
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools' }}"
    "{%- for t in tools %}{{- '\\n' + t['function']['name'] }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
    "{%- for c in m['tool_calls'] or [] %}"
    "{{- '<tool_call>' + {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson"
    " + '</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_template_without_markers_masks_tool_turns_too(data_make_tokenizer):
    tok = data_make_tokenizer("chatml", HERMES_TEMPLATE)
    out = render_conversation(tok, MESSAGES, tools=TOOLS)
    ids, mask = out["input_ids"], out["assistant_mask"]
    spans, start = [], None
    for j, m in enumerate(mask + [0]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            spans.append(tok.decode(ids[start:j]))
            start = None
    call_text = '<tool_call>{"name": "calculator", "arguments": {"expression": "14 + 9"}}</tool_call>'
    assert spans == [call_text + "<|im_end|>", "#### 23<|im_end|>"]
    assert tok.decode(ids).startswith("<|im_start|>system\n# Tools\ncalculator<|im_end|>\n<|im_start|>user\n")
    assert parse_hermes(spans[0]) == ([ToolCall("calculator", {"expression": "14 + 9"})], [])


def test_render_prompt_takes_tools(tok):
    from posttrain.data.chat import render_prompt

    head = "<|im_start|>system\ntools: calculator(expression)<|im_end|>\n"
    rest = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, QUESTION, tools=TOOLS) == tok(head + rest, add_special_tokens=False)["input_ids"]
    assert render_prompt(tok, MESSAGES[:1]) == tok(rest, add_special_tokens=False)["input_ids"]
