"""The tiny world's chat template: tools, tool calls and tool turns; byte-identical output without them."""

from __future__ import annotations

from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from posttrain.data.chat import render_conversation, render_turns
from posttrain.envs.tools import CALCULATOR, Tool, parse_pythonic
from posttrain.models.loading import BUILTIN_MODELS
from posttrain.world.tasks import generate_problems
from posttrain.world.tokenizer import CHAT_TEMPLATE

# The template the shipped models were trained with, before tools (commit a5ca077): the reference
# every conversation without tools must still render to, byte for byte.
OLD_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QUESTION = "Mia has 14 shells. She finds 9 more. How many shells does Mia have now?"


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_CONVERSATION = [
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": "", "tool_calls": [call("calculator", expression="14 + 9")]},
    {"role": "tool", "name": "calculator", "content": "23"},
    {"role": "assistant", "content": "#### 23"},
]
TOOL_TEXT = (
    "<|im_start|>system\ntools: calculator(expression)<|im_end|>\n"
    f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>calculator(expression="14 + 9")</tool_call><|im_end|>\n'
    "<|im_start|>tool\n23<|im_end|>\n"
    "<|im_start|>assistant\n#### 23<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-world-base"])


def render(tok, messages, template=CHAT_TEMPLATE, **kw):
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


def _conversations():
    p, q = generate_problems(2, seed=5)
    single = p.messages()
    multi = single + [{"role": "user", "content": q.question}, {"role": "assistant", "content": q.solution}]
    system = [{"role": "system", "content": "Answer with #### n."}]
    return {
        "single": single, "multi": multi, "system": system + single, "system-multi": system + multi,
        "prompt": single[:1], "system-prompt": system + single[:1], "multi-prompt": multi[:3],
        "odd text": [{"role": "user", "content": "  tabs\tand\nnewlines {{ x }} <tool_call>f()</tool_call>"},
                     {"role": "assistant", "content": "ünïcode ✓ {% raw %}"}],
    }


CONVERSATIONS = _conversations()


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("tools", ["absent", None, []])
def test_without_tools_the_text_ids_and_masks_are_unchanged(tok, name, add_generation_prompt, tools):
    messages = CONVERSATIONS[name]
    kw = {} if tools == "absent" else {"tools": tools}
    assert render(tok, messages, add_generation_prompt=add_generation_prompt, **kw) == \
        render(tok, messages, OLD_TEMPLATE, add_generation_prompt=add_generation_prompt)
    if messages[-1]["role"] == "assistant":
        new = tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, return_dict=True,
                                      return_assistant_tokens_mask=True, add_generation_prompt=add_generation_prompt,
                                      **kw)
        old = tok.apply_chat_template(messages, chat_template=OLD_TEMPLATE, return_dict=True,
                                      return_assistant_tokens_mask=True, add_generation_prompt=add_generation_prompt)
        assert list(new["input_ids"]) == list(old["input_ids"])
        assert list(new["assistant_masks"]) == list(old["assistant_masks"])


def test_the_world_sft_conversation_renders_as_before(tok):
    p = generate_problems(1, seed=0)[0]
    assert render(tok, p.messages()) == f"<|im_start|>user\n{p.question}<|im_end|>\n" \
        f"<|im_start|>assistant\n{p.solution}<|im_end|>\n"


@pytest.mark.parametrize("which", ["tiny-world-base", "tiny-world-student"])
def test_the_shipped_assets_carry_the_template(which):
    path = Path(BUILTIN_MODELS[which])
    assert (path / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert AutoTokenizer.from_pretrained(path).chat_template == CHAT_TEMPLATE


def test_a_tool_conversation_renders_compactly(tok):
    assert render(tok, TOOL_CONVERSATION, tools=[CALCULATOR.schema()]) == TOOL_TEXT
    # a bare function schema renders the same
    assert render(tok, TOOL_CONVERSATION, tools=[CALCULATOR.schema()["function"]]) == TOOL_TEXT


def test_the_generation_prompt_after_a_tool_result(tok):
    text = render(tok, TOOL_CONVERSATION[:3], tools=[CALCULATOR.schema()], add_generation_prompt=True)
    assert text.endswith("<|im_start|>tool\n23<|im_end|>\n<|im_start|>assistant\n")


def test_a_system_message_is_merged_with_the_tools_line(tok):
    messages = [{"role": "system", "content": "Be brief."}] + TOOL_CONVERSATION[:1]
    search = Tool("search", fn=str, parameters={"type": "object", "properties": {"query": {}, "k": {}}})
    bare = Tool("now", fn=str).schema()["function"]
    del bare["parameters"]   # a schema without parameters: name()
    assert render(tok, messages, tools=[CALCULATOR.schema(), search.schema(), bare], add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.\ntools: calculator(expression), search(query, k), now()<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    # without tools the system message is an ordinary turn
    assert render(tok, messages) == f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"


def test_content_and_several_calls_round_trip_through_the_parser(tok):
    turn = {"role": "assistant", "content": "Two sums.",
            "tool_calls": [call("calculator", expression="1 + 2"), call("lookup", key='say "hi"', n=3, exact=True)]}
    text = render(tok, TOOL_CONVERSATION[:1] + [turn], tools=[CALCULATOR.schema()])
    body = 'Two sums.\n<tool_call>calculator(expression="1 + 2")</tool_call>' \
           '<tool_call>lookup(key="say \\"hi\\"", n=3, exact=true)</tool_call><|im_end|>\n'
    assert text.endswith("<|im_start|>assistant\n" + body)
    calls, problems = parse_pythonic(body)
    assert problems == []
    assert [(c.name, c.arguments) for c in calls] == [("calculator", {"expression": "1 + 2"}),
                                                     ("lookup", {"key": 'say "hi"', "n": 3, "exact": True})]


def test_json_string_arguments_are_refused_by_the_template_and_parsed_by_the_data_layer(tok):
    turn = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "calculator",
                                                             "arguments": '{"expression": "14 + 9"}'}}]}
    messages = [TOOL_CONVERSATION[0], turn] + TOOL_CONVERSATION[2:]
    with pytest.raises(TemplateError, match="not a JSON string"):
        render(tok, messages, tools=[CALCULATOR.schema()])
    ids, _ = render_turns(tok, messages, tools=[CALCULATOR.schema()])
    assert tok.decode(ids) == TOOL_TEXT


def test_the_mask_covers_the_calls_and_end_of_turn_not_the_results(tok):
    out = render_conversation(tok, TOOL_CONVERSATION, tools=[CALCULATOR.schema()])
    ids, mask = out["input_ids"], out["assistant_mask"]
    assert tok.decode(ids) == TOOL_TEXT
    spans, start = [], None
    for j, m in enumerate(mask + [0]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            spans.append(tok.decode(ids[start:j]))
            start = None
    assert spans == ['<tool_call>calculator(expression="14 + 9")</tool_call><|im_end|>', "#### 23<|im_end|>"]
    # everything else, the tool result "23" included, is context
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert unmasked == ("<|im_start|>system\ntools: calculator(expression)<|im_end|>\n"
                        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n\n"
                        "<|im_start|>tool\n23<|im_end|>\n<|im_start|>assistant\n\n")
