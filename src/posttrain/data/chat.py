"""Chat templates and assistant-only loss masks.

Training on conversations needs, for every token of the templated text, a flag saying
whether the assistant produced it. Every assistant turn of a multi-turn conversation is
trained, including the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``), so
the model learns when to stop; system and user turns, role headers and the generation
prompt are not.

Two ways to get the mask, both through the tokenizer's *own* chat template:

1. The template marks assistant text with ``{% generation %} ... {% endgeneration %}``.
   Then ``tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)`` returns
   the mask directly (transformers records the character ranges rendered inside the
   markers and maps them to tokens with ``char_to_token``). We check that it produced
   exactly one masked run per assistant turn.
2. No markers (most published templates). Each assistant turn ``i`` is located by
   rendering the conversation twice: ``messages[:i]`` with the generation prompt, and
   ``messages[:i+1]``. The assistant text is what the second rendering adds to the first.
   This is only sound when the template is *prefix-consistent*: each rendering must be a
   prefix of the next and of the full rendering (templates that rewrite earlier turns,
   e.g. drop earlier "thinking", are not), and when the tokenizer puts a token boundary at
   both ends of every assistant span. Both are verified; if either fails the conversation
   is refused with a :class:`TokenizerError` rather than trained with a wrong mask.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from posttrain.errors import TokenizerError, where

from .formats import _Checker

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

_TEMPLATE_FIX = (
    "add {% generation %} ... {% endgeneration %} markers around the assistant content and its "
    "end-of-turn token in the chat template (so masks come from the template itself), or train "
    "on prompt/completion data with plain strings instead of messages."
)


# --------------------------------------------------------------------------------------
# Tokenizer checks
# --------------------------------------------------------------------------------------


def _chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates; "default" is what apply_chat_template uses
        template = template.get("default")
    return template or None


def has_generation_markers(tokenizer) -> bool:
    """Whether the tokenizer's chat template has ``{% generation %}`` markers."""
    template = _chat_template(tokenizer)
    return bool(template and _GENERATION_TAG.search(template))


def check_tokenizer(tokenizer, *, need_chat_template: bool) -> None:
    """Raise :class:`TokenizerError` if ``tokenizer`` lacks what posttrain needs.

    Needed always: an EOS token (appended to completions, and it ends generation) and a
    pad token (batches are padded). With ``need_chat_template``: a chat template.
    """
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise TokenizerError(
            f"tokenizer {name!r} has no EOS token; posttrain appends it to completions so the model "
            "learns to stop, and generation stops on it.",
            fix="add \"eos_token\" (the model's end-of-text token) to the tokenizer's tokenizer_config.json, "
            "or point model.tokenizer to a tokenizer that has one.",
        )
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise TokenizerError(
            f"tokenizer {name!r} has no pad token, which batching needs.",
            fix=f"set model.pad_token in the config, for example to the EOS token (model.pad_token="
            f"{tokenizer.eos_token!r}); that is safe here because posttrain builds attention and loss masks "
            "from positions, never by comparing token ids with the pad id (a reward model then scores the "
            "token before a trailing EOS, exactly as transformers' forward of the saved model does).",
        )
    if need_chat_template and _chat_template(tokenizer) is None:
        raise TokenizerError(
            f"tokenizer {name!r} has no chat template, but chat messages (the data, or the prompts of an "
            "evaluation) must be rendered with the model's template.",
            fix="set model.chat_template to a Jinja template or the path of a "
            ".jinja file (for example "
            "the ChatML template of the model family you fine-tune from; keep using it at inference), "
            "point model.tokenizer to a tokenizer that has one, or give the data as prompt/completion strings.",
        )


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _validate_messages(messages: Any, *, prompt: bool, source: str | None, location: str | None) -> list[dict]:
    chk = _Checker(source or "<messages>", location)
    msgs = chk.messages(messages, "messages", tools=True)
    if prompt:
        chk.order(msgs, "messages", last="user", tools=True)
    else:
        chk.order(msgs, "messages", tools=True)
    return msgs


_TEMPLATE_PLACES = ("model.chat_template, or the tokenizer's own template in "
                    "tokenizer_config.json / chat_template.jinja")


def _apply(tokenizer, messages: list[dict], *, add_generation_prompt: bool, tokenize: bool, tools=None, **kwargs):
    """apply_chat_template with every template failure turned into TokenizerError (``tools``: the
    function schemas, passed as ``tools=`` only when given)."""
    if tools is not None:
        kwargs["tools"] = tools
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize, **kwargs
        )
    except Exception as exc:  # jinja2 errors, a template's raise_exception(...), or Python errors inside it
        roles = [m["role"] for m in messages]
        if type(exc).__name__ == "TemplateSyntaxError":
            line = getattr(exc, "lineno", None)
            raise TokenizerError(
                f"the chat template is not valid Jinja{f' (line {line})' if line else ''}: {exc}.",
                fix=f"correct the template ({_TEMPLATE_PLACES}).",
            ) from None
        if type(exc).__module__.startswith("jinja2") or isinstance(exc, ValueError):
            raise TokenizerError(
                f"the chat template failed to render a conversation of {len(messages)} message(s) with "
                f"roles {roles}: {type(exc).__name__}: {exc}",
                fix="check that the template supports these roles (some templates reject a system "
                f"message), or use a template that does ({_TEMPLATE_PLACES}).",
            ) from None
        raise TokenizerError(
            f"the chat template raised {type(exc).__name__} ({exc}) while rendering a conversation with roles "
            f"{roles}.",
            fix=f"correct the template ({_TEMPLATE_PLACES}).",
        ) from None


def _to_list(x) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) token ranges where the mask is 1."""
    runs, start = [], None
    for j, m in enumerate(mask):
        if m and start is None:
            start = j
        elif not m and start is not None:
            runs.append((start, j))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    return runs


def _refuse(problem: str, source: str | None, location: str | None) -> TokenizerError:
    prefix = where(source, None, None) if location is None else f"{where(source)}, {location}"
    return TokenizerError(
        f"{prefix}: assistant-only loss masks cannot be derived safely for this conversation: {problem}",
        fix=_TEMPLATE_FIX,
    )


def _render_with_markers(
    tokenizer, messages: list[dict], add_generation_prompt: bool, source, location, tools=None
) -> tuple[list[int], list[tuple[int, int, int]]]:
    out = _apply(
        tokenizer,
        messages,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        tools=tools,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids = _to_list(out["input_ids"])
    mask = _to_list(out["assistant_masks"])
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    runs = _runs(mask)
    if len(mask) != len(ids) or len(runs) != len(assistant):
        raise _refuse(
            f"the template's {{% generation %}} markers produced {len(runs)} masked span(s) for "
            f"{len(assistant)} assistant turn(s); each assistant turn must be wrapped in its own "
            "generation block.",
            source,
            location,
        )
    if add_generation_prompt and runs and runs[-1][1] == len(ids):
        raise _refuse(
            "the last masked span runs into the generation prompt (transformers masks to the end of "
            "the sequence when the end of a generation block falls on a character no token covers).",
            source,
            location,
        )
    return ids, [(i, s, e) for i, (s, e) in zip(assistant, runs)]


def _boundary_token(
    tokenizer, text: str, ids: list[int], offsets: list[tuple[int, int]], contiguous: bool, b: int
) -> int | None:
    """The index of the first token at or after character ``b``, if ``b`` is a token boundary."""
    if b == 0:
        return 0
    if b == len(text):
        return len(ids)
    for start, end in offsets:
        if start < b < end:
            return None  # a token straddles the boundary
    k = sum(1 for _, end in offsets if end <= b)
    if contiguous:
        return k
    # Offsets with gaps (e.g. ByteLevel trim_offsets=True) cannot place whitespace at the
    # boundary; confirm by tokenizing the prefix on its own.
    prefix = tokenizer(text[:b], add_special_tokens=False)["input_ids"]
    return k if _to_list(prefix) == ids[:k] else None


def _render_incremental(
    tokenizer, messages: list[dict], add_generation_prompt: bool, source, location, tools=None
) -> tuple[list[int], list[tuple[int, int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(
            "deriving assistant masks without {% generation %} markers needs a fast (Rust) tokenizer "
            f"with offset mappings; {type(tokenizer).__name__} has none.",
            fix="load the tokenizer with use_fast=True (the default), or " + _TEMPLATE_FIX,
        )
    full = _apply(tokenizer, messages, add_generation_prompt=add_generation_prompt, tokenize=False, tools=tools)
    char_spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _apply(tokenizer, messages[:i], add_generation_prompt=True, tokenize=False, tools=tools)
        upto = _apply(tokenizer, messages[: i + 1], add_generation_prompt=False, tokenize=False, tools=tools)
        if not upto.startswith(before):
            raise _refuse(
                f"the template is not prefix-consistent: rendering messages[:{i}] with the generation "
                f"prompt is not a prefix of rendering messages[:{i + 1}] (the generation prompt differs "
                "from the header of an assistant turn).",
                source,
                location,
            )
        if not full.startswith(upto):
            raise _refuse(
                f"the template is not prefix-consistent: it renders assistant turn messages[{i}] "
                "differently once later messages follow (for example it drops or shortens earlier "
                "turns' reasoning), so the text of that turn cannot be located.",
                source,
                location,
            )
        start, end = len(before), len(upto)
        while end > start and upto[end - 1].isspace():  # newline after the end-of-turn token
            end -= 1
        if end == start:
            raise _refuse(f"assistant turn messages[{i}] renders as empty text.", source, location)
        char_spans.append((i, start, end))

    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = _to_list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    reference = _to_list(_apply(tokenizer, messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                return_dict=False, tools=tools))
    if ids != reference:
        raise _refuse(
            "tokenizing the rendered text does not reproduce apply_chat_template(tokenize=True).",
            source,
            location,
        )
    contiguous = (
        bool(offsets)
        and offsets[0][0] == 0
        and offsets[-1][1] == len(full)
        and all(s < e for s, e in offsets)
        and all(offsets[j][0] == offsets[j - 1][1] for j in range(1, len(offsets)))
    )
    spans = []
    for i, start, end in char_spans:
        ks = _boundary_token(tokenizer, full, ids, offsets, contiguous, start)
        ke = _boundary_token(tokenizer, full, ids, offsets, contiguous, end)
        if ks is None or ke is None:
            b = start if ks is None else end
            context = full[max(0, b - 15) : b + 15]
            raise _refuse(
                f"a token straddles the {'start' if ks is None else 'end'} of assistant turn messages[{i}] "
                f"(around {context!r}), so that token belongs to both the template and the reply.",
                source,
                location,
            )
        if ke <= ks:
            raise _refuse(f"assistant turn messages[{i}] covers no token.", source, location)
        spans.append((i, ks, ke))
    return ids, spans


def render_turns(
    tokenizer,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = False,
    source: str | None = None,
    location: str | None = None,
    tools: Sequence[dict] | None = None,
) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Tokenize a conversation and locate each assistant turn.

    Returns ``(input_ids, spans)`` where ``spans`` holds ``(message_index, start, end)``
    token ranges, one per assistant message (tool-calling turns included), in order; ``tool``
    results are not spans. ``tools``: function schemas passed to the template as ``tools=``.
    ``source``/``location`` only serve the error messages.
    """
    check_tokenizer(tokenizer, need_chat_template=True)
    msgs = _validate_messages(messages, prompt=False, source=source, location=location)
    tools = None if tools is None else list(tools)
    if has_generation_markers(tokenizer):
        return _render_with_markers(tokenizer, msgs, add_generation_prompt, source, location, tools)
    return _render_incremental(tokenizer, msgs, add_generation_prompt, source, location, tools)


def render_conversation(
    tokenizer,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = False,
    source: str | None = None,
    location: str | None = None,
    tools: Sequence[dict] | None = None,
) -> dict[str, list[int]]:
    """Tokenize ``messages`` with the tokenizer's chat template and an assistant mask.

    Returns ``{"input_ids": [...], "assistant_mask": [...]}`` (same length): 1 on every token
    of every assistant turn, its end-of-turn token included; 0 on system and user turns, role
    headers, and the generation prompt (when ``add_generation_prompt``). ``tools``: function
    schemas passed to the template (``tools=``); assistant turns with ``tool_calls`` are masked
    like any other, ``tool`` results are not.

    Raises:
        TokenizerError: no chat template / EOS / pad token, or the mask cannot be derived
            safely (see the module docstring).
        DataError: malformed messages (bad role, order, empty assistant content).
    """
    ids, spans = render_turns(
        tokenizer, messages, add_generation_prompt=add_generation_prompt, source=source, location=location,
        tools=tools,
    )
    mask = [0] * len(ids)
    for _, start, end in spans:
        mask[start:end] = [1] * (end - start)
    return {"input_ids": ids, "assistant_mask": mask}


def render_prompt(tokenizer, messages_or_str: str | Sequence[dict], *, chat: bool = True,
                  tools: Sequence[dict] | None = None) -> list[int]:
    """Token ids of a prompt, ready for generation.

    A list of messages (ending with a user turn) is rendered with the chat template and its
    generation prompt. A string is wrapped as one user message when ``chat`` is true; with
    ``chat=False`` it is tokenized as plain text with the tokenizer's special tokens (e.g.
    BOS), exactly like the prompt side of string prompt/completion SFT data, so a model
    trained on such data is prompted the way it was trained. ``tools``: function schemas
    passed to the chat template (``tools=``).
    """
    if isinstance(messages_or_str, str):
        if not chat:
            check_tokenizer(tokenizer, need_chat_template=False)
            return _to_list(tokenizer(messages_or_str, add_special_tokens=True)["input_ids"])
        messages = [{"role": "user", "content": messages_or_str}]
    else:
        messages = messages_or_str
    check_tokenizer(tokenizer, need_chat_template=True)
    msgs = _validate_messages(messages, prompt=True, source=None, location=None)
    return _to_list(_apply(tokenizer, msgs, add_generation_prompt=True, tokenize=True, return_dict=False,
                           tools=None if tools is None else list(tools)))


def render_text(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool,
                tools: Sequence[dict] | None = None) -> str:
    """The chat template's text of ``messages`` as given (no validation of roles or order), with
    ``tools`` passed to the template; template failures become TokenizerError."""
    check_tokenizer(tokenizer, need_chat_template=True)
    kw = {} if tools is None else {"tools": list(tools)}
    return _apply(tokenizer, list(messages), add_generation_prompt=add_generation_prompt, tokenize=False, **kw)
