"""Chat templates and assistant-only masks."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.data.chat import check_tokenizer, has_generation_markers, render_conversation, render_prompt, render_turns
from posttrain.errors import DataError, TokenizerError

SYSTEM = {"role": "system", "content": "you are helpful"}
TURNS = [
    {"role": "user", "content": "what is two plus two?"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "and 3 + 3 ?"},
    {"role": "assistant", "content": "it is six, then seven"},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "you are welcome!"},
]
EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def tokenizers_for(style, request):
    return (
        request.getfixturevalue(f"data_{style}_tokenizer"),
        request.getfixturevalue(f"data_{style}_marked_tokenizer"),
    )


def masked_text(tok, rendered) -> str:
    ids = [i for i, m in zip(rendered["input_ids"], rendered["assistant_mask"]) if m]
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def runs(mask):
    out, start = [], None
    for j, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = j
        if not m and start is not None:
            out.append((start, j))
            start = None
    return out


# ---------------------------------------------------------------------------------------
# Marker path == verified fallback path; masks hold exactly the assistant text + end-of-turn
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["chatml", "llama3"])
@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("n_turns", [2, 4, 6])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_marker_and_fallback_paths_give_identical_masks(request, style, system, n_turns, add_generation_prompt):
    plain, marked = tokenizers_for(style, request)
    assert not has_generation_markers(plain) and has_generation_markers(marked)
    messages = ([SYSTEM] if system else []) + TURNS[:n_turns]
    if add_generation_prompt:
        messages = messages + [{"role": "user", "content": "one more"}]
    a = render_conversation(plain, messages, add_generation_prompt=add_generation_prompt)
    b = render_conversation(marked, messages, add_generation_prompt=add_generation_prompt)
    assert a == b
    # Same ids as the template's own tokenization.
    assert a["input_ids"] == plain.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    # Every assistant turn is trained: its content followed by the end-of-turn token.
    expected = "".join(m["content"].strip() + EOT[style] for m in messages if m["role"] == "assistant")
    assert masked_text(plain, a) == expected
    assert len(runs(a["assistant_mask"])) == n_turns // 2
    if add_generation_prompt:  # the generation prompt is never trained
        assert a["assistant_mask"][-1] == 0


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_mask_boundaries_are_exact(request, style):
    tok, _ = tokenizers_for(style, request)
    out = render_conversation(tok, [SYSTEM] + TURNS)
    ids, mask = out["input_ids"], out["assistant_mask"]
    eot = tok.convert_tokens_to_ids(EOT[style])
    for start, end in runs(mask):
        assert ids[end - 1] == eot  # the end-of-turn token is trained
        assert tok.decode(ids[start - 1 : start]) == "\n"  # the role header is not
    # Unmasked text is exactly the template scaffolding plus system and user contents.
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert "four" not in unmasked and "what is two plus two?" in unmasked and "you are helpful" in unmasked


def test_render_turns_spans_identify_messages(data_chatml_tokenizer, data_chatml_marked_tokenizer):
    messages = [SYSTEM] + TURNS[:4]
    ids, spans = render_turns(data_chatml_tokenizer, messages)
    ids2, spans2 = render_turns(data_chatml_marked_tokenizer, messages)
    assert (ids, spans) == (ids2, spans2)
    assert [s[0] for s in spans] == [2, 4]
    for index, start, end in spans:
        assert data_chatml_tokenizer.decode(ids[start:end]) == messages[index]["content"] + "<|im_end|>"


def test_offsets_with_gaps_are_verified_by_prefix_tokenization(data_make_tokenizer, data_chatml_tokenizer):
    # ByteLevel(trim_offsets=True) leaves whitespace outside token offsets; multi-byte characters
    # share offsets. Both force the prefix-tokenization check, which must still agree.
    messages = [
        {"role": "user", "content": "café  au lait ?"},
        {"role": "assistant", "content": "  the answer is é  "},
        {"role": "user", "content": "  more"},
        {"role": "assistant", "content": "four four"},
    ]
    trimmed = data_make_tokenizer("chatml", trim_offsets=True)
    assert render_conversation(trimmed, messages) == render_conversation(data_chatml_tokenizer, messages)
    got = masked_text(trimmed, render_conversation(trimmed, messages))
    assert got == "  the answer is é  <|im_end|>four four<|im_end|>"


# ---------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------

DROPS_EARLIER_THINKING = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
    "{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MARKS_LAST_TURN = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' and loop.last %}{{ '[final] ' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GENERATION_PROMPT_DIFFERS = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
NO_SPECIAL_TOKENS = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
ONE_BLOCK_FOR_ALL = (
    "{% generation %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% endgeneration %}"
)


@pytest.mark.parametrize(
    "template, words",
    [
        (DROPS_EARLIER_THINKING, "renders assistant turn messages[1] differently"),
        (MARKS_LAST_TURN, "renders assistant turn messages[1] differently"),
        (GENERATION_PROMPT_DIFFERS, "generation prompt differs"),
        (NO_SPECIAL_TOKENS, "straddles the start"),
        (ONE_BLOCK_FOR_ALL, "1 masked span(s) for 2 assistant turn(s)"),
    ],
)
def test_unsafe_templates_are_refused(data_make_tokenizer, template, words):
    tok = data_make_tokenizer("chatml", template)
    messages = [
        {"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": "<think>two and two</think> four"},
        {"role": "user", "content": "and 3 + 3 ?"},
        {"role": "assistant", "content": "six"},
    ]
    with pytest.raises(TokenizerError) as info:
        render_conversation(tok, messages)
    msg = str(info.value)
    assert words in msg, msg
    assert "cannot be derived safely" in msg and "{% generation %}" in msg and "prompt/completion" in msg


def test_bad_messages_raise_data_error_with_field_path(data_chatml_tokenizer):
    with pytest.raises(DataError, match=r"messages\[1\]\.role.*unknown role 'gpt'"):
        render_conversation(data_chatml_tokenizer, [{"role": "user", "content": "q"}, {"role": "gpt", "content": "a"}])


# ---------------------------------------------------------------------------------------
# Tokenizer checks and prompts
# ---------------------------------------------------------------------------------------


def test_check_tokenizer(data_make_tokenizer):
    tok = data_make_tokenizer("chatml")
    check_tokenizer(tok, need_chat_template=True)

    no_template = data_make_tokenizer("chatml", None)
    check_tokenizer(no_template, need_chat_template=False)
    with pytest.raises(TokenizerError, match="no chat template.*Fix: set model.chat_template"):
        check_tokenizer(no_template, need_chat_template=True)

    no_pad = data_make_tokenizer("chatml")
    no_pad.pad_token = None
    with pytest.raises(TokenizerError) as info:
        check_tokenizer(no_pad, need_chat_template=False)
    assert "no pad token" in str(info.value) and "model.pad_token=" in str(info.value) and "<|im_end|>" in str(info.value)

    no_eos = data_make_tokenizer("chatml")
    no_eos.eos_token = None
    with pytest.raises(TokenizerError, match="no EOS token"):
        check_tokenizer(no_eos, need_chat_template=False)


def test_render_prompt(data_chatml_tokenizer, data_llama3_tokenizer):
    tok = data_chatml_tokenizer
    ids = render_prompt(tok, "what is two plus two?")
    assert tok.decode(ids) == "<|im_start|>user\nwhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
    messages = [SYSTEM] + TURNS[:3]
    assert render_prompt(tok, messages) == tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    # chat=False: plain text with the tokenizer's special tokens, as string prompt/completion SFT uses.
    plain = render_prompt(data_llama3_tokenizer, "hello world", chat=False)
    assert plain[0] == data_llama3_tokenizer.bos_token_id
    assert data_llama3_tokenizer.decode(plain) == "<|begin_of_text|>hello world"
    with pytest.raises(DataError, match="last message to be a 'user' turn"):
        render_prompt(tok, TURNS[:2])


# ---------------------------------------------------------------------------------------
# Property: random multi-turn conversations
# ---------------------------------------------------------------------------------------

_text = st.text(alphabet="ab cd\n?é1", min_size=1, max_size=12).filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_text)})
    for _ in range(draw(st.integers(1, 4))):
        messages.append({"role": "user", "content": draw(_text)})
        messages.append({"role": "assistant", "content": draw(_text)})
    trailing_user = draw(st.booleans())
    if trailing_user:
        messages.append({"role": "user", "content": draw(_text)})
    return messages, trailing_user and draw(st.booleans())


@pytest.mark.parametrize("style", ["chatml", "llama3"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=conversations())
def test_random_conversations_mask_exactly_the_assistant_spans(request, style, case):
    messages, add_generation_prompt = case
    plain, marked = tokenizers_for(style, request)
    a = render_conversation(plain, messages, add_generation_prompt=add_generation_prompt)
    b = render_conversation(marked, messages, add_generation_prompt=add_generation_prompt)
    assert a == b
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    spans = runs(a["assistant_mask"])
    assert len(spans) == len(assistant)
    for (start, end), content in zip(spans, assistant):
        want = (content.strip() if style == "llama3" else content) + EOT[style]
        assert plain.decode(a["input_ids"][start:end], clean_up_tokenization_spaces=False) == want
