"""Record schemas, validation and loading.

A data set is a sequence of JSON-like records in one of these formats:

``conversational``
    ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``.
    An optional single system turn first, then user and assistant turns alternating,
    starting with user; at least one assistant turn (the turns that are trained). With tool
    use (:mod:`posttrain.data.tool_turns`): an optional ``"tools"`` list of function schemas
    (given to the chat template as ``tools=``), assistant turns with ``tool_calls`` and the
    ``tool`` turns answering them.
``prompt_completion``
    ``{"prompt": ..., "completion": ...}``: both strings, or both lists of messages.
    As messages, the prompt is the conversation so far (it ends with a user turn) and the
    completion is the assistant turn(s) that follow (it starts and ends with assistant).
``preference``
    ``{"prompt": ..., "chosen": ..., "rejected": ...}``: all strings, or a message-list
    prompt with message-list answers. Records without ``"prompt"`` whose ``chosen`` and
    ``rejected`` are whole conversations sharing a prefix are accepted too; the shared
    prefix becomes the prompt ("implicit prompt"). An optional numeric ``"margin"`` (finite;
    e.g. how strongly ``chosen`` is preferred, for margin losses) is validated and kept as-is.
``ranked``
    ``{"prompt": ..., "responses": [...], "rewards": [number, ...]}``: K >= 2 scored responses
    to one prompt (reward-model ranking, exponential-tilt weighting), one finite reward per
    response (booleans are not rewards). With a string prompt every response is a non-empty
    string. With a message-list prompt every response is either a list of messages that
    continues the conversation (as a ``prompt_completion`` completion: it starts and ends with
    an assistant turn) or a string, which means one assistant turn and is normalized to
    ``[{"role": "assistant", "content": text}]``. Identical responses are allowed (sampled
    K-sets often repeat an answer).
``unpaired``
    ``{"prompt": ..., "completion": ..., "label": true|false}`` (KTO-style data).
``prompt_answer``
    ``{"prompt": str | messages, "answer": str | int}`` (RL with verifiable rewards).
``stepwise``
    ``{"prompt": ..., "completions": [step, ...]}`` with optional ``"labels"`` (process reward models).
``prompt``
    ``{"prompt": str | messages}`` and nothing a format above needs: prompts for the sampling
    methods whose rewards read no reference answer (a reward model, a judge, a length or
    format rule, a user function reading the record's other fields). Detected last, so a
    record with a ``completion`` or an ``answer`` is never taken for prompt-only.

:func:`load_records` reads JSON Lines, JSON arrays, Parquet, or any iterable of dicts
(a Hugging Face ``datasets.Dataset`` included), validates every record, and returns a
:class:`Dataset` that remembers where each record came from so later stages (tokenization,
training) can name the offending line in their own error messages.

Records are normalized: message lists contain only ``role`` and ``content`` keys (and the
tool keys of conversational records: assistant ``tool_calls``, a tool turn's ``name`` /
``tool_call_id``), and an
implicit preference prompt is made explicit. Other top-level keys (``"id"``, metadata)
are kept unchanged.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from posttrain.errors import DataError, where

from .tool_turns import TOOL_MESSAGE_KEYS, check_tool_calls, check_tools, next_roles

FORMATS: tuple[str, ...] = (
    "conversational",
    "prompt_completion",
    "preference",
    "unpaired",
    "prompt_answer",
    "ranked",
    "stepwise",
    "prompt",
)
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# The keys each format needs; used by auto-detection and by the error messages.
_FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "conversational": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt_answer": ("prompt", "answer"),
    "ranked": ("prompt", "responses", "rewards"),
    "stepwise": ("prompt", "completions"),
    "prompt": ("prompt",),
}

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_ARROW_SUFFIXES = (".arrow",)


# --------------------------------------------------------------------------------------
# The Dataset container
# --------------------------------------------------------------------------------------


class Dataset:
    """Validated, normalized records plus where each one came from.

    Attributes:
        records: the normalized records (plain dicts).
        format: one of :data:`FORMATS`.
        source: the file path, or a description such as ``"<in-memory list>"``.
        locations: for each record, its place in the source: ``"line 12"`` (JSON Lines,
            1-based, blank lines counted), ``"row 3"`` (Parquet, 0-based) or ``"item 3"``
            (JSON arrays and in-memory iterables, 0-based, i.e. the Python index).
    """

    def __init__(self, records: list[dict], format: str, source: str, locations: list[str]):
        if len(records) != len(locations):
            raise ValueError("records and locations must have the same length")
        self.records = records
        self.format = format
        self.source = source
        self.locations = locations

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def where(self, index: int, field: str | None = None) -> str:
        """Location text for record ``index`` (and optionally a field), for error messages."""
        return _where(self.source, self.locations[index], field)

    def __repr__(self) -> str:
        return f"Dataset(format={self.format!r}, source={self.source!r}, records={len(self)})"


def _where(source: str, location: str | None, field: str | None = None) -> str:
    """Like :func:`posttrain.errors.where`, for locations that are rows or items, not lines."""
    if location is not None and location.startswith("line "):
        return where(source, int(location[5:]), field)
    return where(source if location is None else f"{source}, {location}", None, field)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


class _Checker:
    """Validation helpers bound to one record's location."""

    def __init__(self, source: str, location: str | None):
        self.source = source
        self.location = location

    kind = staticmethod(_type_name)   # "a string", "an object", ... (for the checks in tool_turns)

    def fail(self, field: str | None, problem: str, fix: str) -> DataError:
        return DataError(f"{_where(self.source, self.location, field)}: {problem}", fix=fix)

    # -- scalars -------------------------------------------------------------------------

    def text(self, value: Any, field: str, *, nonempty: bool, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(
                field,
                f"expected {what} as a string, found {_type_name(value)} ({_short(value)}).",
                f"write '{field}' as a JSON string.",
            )
        if nonempty and not value.strip():
            raise self.fail(
                field,
                f"{what} is empty{' (only whitespace)' if value else ''}; there would be nothing to train on.",
                "fill it in or remove this record from the data set.",
            )
        return value

    # -- messages ------------------------------------------------------------------------

    def messages(self, value: Any, field: str, *, tools: bool = False) -> list[dict]:
        """A list of {"role", "content"} dicts with valid roles (order is checked separately).

        ``tools``: tool turns are allowed too (conversational records; see
        :mod:`posttrain.data.tool_turns`): ``tool`` messages (with an optional ``name`` /
        ``tool_call_id``) and assistant messages with ``tool_calls`` (whose content may be empty)."""
        if not isinstance(value, (list, tuple)):
            raise self.fail(
                field,
                f"expected a list of messages, found {_type_name(value)} ({_short(value)}).",
                f'write \'{field}\' as a list such as [{{"role": "user", "content": "..."}}].',
            )
        if len(value) == 0:
            raise self.fail(field, "the list of messages is empty.", "add at least one message.")
        out = []
        for i, msg in enumerate(value):
            path = f"{field}[{i}]"
            if not isinstance(msg, Mapping):
                raise self.fail(
                    path,
                    f"expected a message object with 'role' and 'content', found {_type_name(msg)} "
                    f"({_short(msg)}).",
                    'write each message as {"role": "...", "content": "..."}.',
                )
            # Parquet and HF datasets fill absent struct fields with null: treat null as absent.
            allowed = ("role", "content") + (TOOL_MESSAGE_KEYS.get(msg.get("role"), ()) if tools else ())
            extra = sorted(k for k, v in msg.items() if k not in allowed and v is not None)
            if extra:
                raise self.fail(
                    path,
                    f"unsupported message key(s) {extra}; posttrain renders only 'role' and 'content'"
                    f"{' (and tool calls / results)' if tools else ''}, so these would be dropped without notice.",
                    "remove the extra keys, or fold their text into 'content'"
                    + ("." if tools else "; assistant 'tool_calls' and 'tool' turns are supported in "
                       "conversational ('messages') records only."),
                )
            if msg.get("role") is None:
                raise self.fail(
                    f"{path}.role",
                    "the message has no 'role'.",
                    f"add a role, one of {list(ROLES)}.",
                )
            role = msg["role"]
            roles = ROLES + (("tool",) if tools else ())
            if role not in roles:
                raise self.fail(
                    f"{path}.role",
                    f"unknown role {_short(role)}; expected one of {list(roles)}.",
                    "rename the role (e.g. 'human' -> 'user', 'gpt'/'bot' -> 'assistant'); "
                    + ("function turns are 'tool' turns." if tools else
                       "tool turns are supported in conversational ('messages') records only."),
                )
            calls = msg.get("tool_calls") if role == "assistant" else None
            if calls is not None:
                calls = check_tool_calls(self, calls, f"{path}.tool_calls")
                if msg.get("content") is None:   # a turn that only calls tools
                    msg = {**msg, "content": ""}
            if "content" not in msg or msg["content"] is None:
                raise self.fail(
                    f"{path}.content", "the message has no 'content'.", "add the message text as 'content'."
                )
            content = self.text(msg["content"], f"{path}.content", nonempty=(role == "assistant" and calls is None),
                                what=f"the {role} message")
            out.append({"role": role, "content": content})
            if calls is not None:
                out[-1]["tool_calls"] = calls
            for key in ("name", "tool_call_id") if role == "tool" else ():
                if msg.get(key) is not None:
                    out[-1][key] = self.text(msg[key], f"{path}.{key}", nonempty=True, what=f"the tool message's {key}")
        return out

    def order(
        self,
        messages: list[dict],
        field: str,
        *,
        first: str = "user",
        last: str | None = None,
        need_assistant: bool = False,
        offset: int = 0,
        allow_system: bool = True,
        tools: bool = False,
    ) -> None:
        """Check the turn order: [system] then alternating turns starting with ``first``.

        ``offset`` shifts the indices in messages (for a completion that continues a prompt).
        ``tools``: an assistant turn with tool calls is followed by ``tool`` turns (its results),
        and they by the assistant's next turn (:func:`posttrain.data.tool_turns.next_roles`).
        """
        if tools:
            self._order_with_tools(messages, field, first=first, offset=offset, allow_system=allow_system)
        expected = first
        for i, msg in enumerate(() if tools else messages):
            role = msg["role"]
            path = f"{field}[{i + offset}].role"
            if role == "system":
                if i == 0 and allow_system:
                    continue
                raise self.fail(
                    path,
                    "a system message is only allowed as the first message of a conversation.",
                    "merge this system text into the first system message, or drop it.",
                )
            if role != expected:
                raise self.fail(
                    path,
                    f"expected role '{expected}' here, found '{role}'; turns must alternate user, "
                    "assistant, user, ... after an optional system message.",
                    "merge consecutive turns of the same role into one message, and start the "
                    "conversation with a user turn.",
                )
            expected = "assistant" if role == "user" else "user"
        if last is not None:
            tail = next((m["role"] for m in reversed(messages) if m["role"] != "system"), None)
            if tail != last:
                raise self.fail(
                    field,
                    f"expected the last message to be a '{last}' turn, found "
                    f"{repr(tail) if tail else 'no user or assistant turn'}.",
                    f"end '{field}' with a {last} message.",
                )
        if need_assistant and not any(m["role"] == "assistant" for m in messages):
            raise self.fail(
                field,
                "the conversation has no assistant turn, so there is nothing to train on.",
                "add the assistant's reply, or remove this record.",
            )

    def _order_with_tools(self, messages: list[dict], field: str, *, first: str, offset: int,
                          allow_system: bool) -> None:
        previous = None
        for i, msg in enumerate(messages):
            role, path = msg["role"], f"{field}[{i + offset}].role"
            if role == "system":
                if i == 0 and allow_system:
                    continue
                raise self.fail(
                    path,
                    "a system message is only allowed as the first message of a conversation.",
                    "merge this system text into the first system message, or drop it.",
                )
            allowed = next_roles(previous, first)
            if role not in allowed:
                why = ("; a 'tool' turn answers an assistant turn with tool_calls" if role == "tool" else
                       "; the assistant turn before it calls tools, so their results ('tool' turns) come next"
                       if allowed == ("tool",) else
                       "; turns must alternate user, assistant, user, ... after an optional system message")
                raise self.fail(
                    path,
                    f"expected role {' or '.join(repr(r) for r in allowed)} here, found '{role}'{why}.",
                    "answer each assistant turn that has tool_calls with 'tool' turns holding the results, merge "
                    "consecutive turns of the same role, and start the conversation with a user turn.",
                )
            previous = msg

    def number(self, value: Any, field: str, *, what: str) -> float | int:
        """A finite JSON number (int or float; booleans are not numbers here)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(
                field,
                f"expected {what} as a number, found {_type_name(value)} ({_short(value)}).",
                f"write '{field}' as a JSON number such as 1 or 0.5 (not quoted, not true/false).",
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(
                field,
                f"{what} is the non-finite number {value!r}; losses built on it would be NaN.",
                "replace it with a finite number, or remove this record.",
            )
        if abs(value) > MAX_SCORE:
            raise self.fail(
                field,
                f"{what} is {value:.4g}, beyond +-{MAX_SCORE:.0e}; float32 arithmetic on it (differences, "
                "softmax, exp) would overflow to inf or NaN.",
                "rescale the scores (only their differences and ratios matter), or remove this record.",
            )
        return value

    def finite(self, value: Any, field: str) -> None:
        """Reject NaN and infinities anywhere in the record (JSON allows them as an extension), and
        text that is not valid Unicode (an unpaired surrogate such as ``\\ud800``, which JSON can escape
        but no tokenizer can encode)."""
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(
                field,
                f"found the non-finite number {value!r}.",
                "replace it with a finite number, or remove the field.",
            )
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise self.fail(
                    field,
                    f"the text holds an unpaired UTF-16 surrogate ({value[e.start]!r} at character {e.start}), "
                    "which is not valid Unicode.",
                    "re-encode the text (the source likely split an emoji or other character in two), or remove "
                    "the character.",
                ) from None
        if isinstance(value, Mapping):
            for k, v in value.items():
                self.finite(k, f"{field} (a key)" if field else "(a key)")
                self.finite(v, f"{field}.{k}" if field else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                self.finite(v, f"{field}[{i}]")


def _present(record: Mapping, key: str) -> bool:
    return key in record and record[key] is not None


# keys that identify a format; a record holding keys of two of these groups is ambiguous
_EXCLUSIVE_KEYS = (("messages",), ("chosen", "rejected"), ("responses",), ("completion",), ("completions",))


def detect_format(record: Mapping) -> str | None:
    """The format a record's keys indicate, or ``None`` when no format matches."""
    if _present(record, "messages"):
        return "conversational"
    if _present(record, "chosen") and _present(record, "rejected"):
        return "preference"
    if _present(record, "responses"):
        return "ranked"
    if _present(record, "prompt") and _present(record, "completions"):
        return "stepwise"
    if _present(record, "prompt") and _present(record, "completion") and _present(record, "label"):
        return "unpaired"
    if _present(record, "prompt") and _present(record, "answer"):
        return "prompt_answer"
    if _present(record, "prompt") and _present(record, "completion"):
        return "prompt_completion"
    if _present(record, "prompt"):
        return "prompt"
    return None


def _require(chk: _Checker, record: Mapping, fmt: str) -> None:
    for key in _FORMAT_KEYS[fmt]:
        if fmt == "preference" and key == "prompt":
            continue  # may be implicit
        if not _present(record, key):
            found = sorted(k for k in record if record[k] is not None)
            raise chk.fail(
                key,
                f"the field is missing (or null); format '{fmt}' needs the keys "
                f"{list(_FORMAT_KEYS[fmt])}, this record has {found}.",
                f"add '{key}', or pick the format that matches the data (one of {list(FORMATS)}).",
            )


def _prompt(chk: _Checker, value: Any, field: str = "prompt") -> str | list[dict]:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        msgs = chk.messages(value, field)
        chk.order(msgs, field, last="user")
        return msgs
    raise chk.fail(
        field,
        f"expected a string or a list of messages, found {_type_name(value)} ({_short(value)}).",
        f"write '{field}' as a string, or as a list of {{role, content}} messages ending with a user turn.",
    )


def _response(chk: _Checker, value: Any, field: str, prompt: str | list[dict]) -> str | list[dict]:
    """A completion / chosen / rejected answer that must match the prompt's kind."""
    if isinstance(prompt, str):
        if isinstance(value, (list, tuple)):
            raise chk.fail(
                field,
                "the prompt is a string but this field is a list of messages; both must be strings "
                "or both message lists.",
                "write both as strings, or the prompt as a list of messages.",
            )
        return chk.text(value, field, nonempty=True, what=f"'{field}'")
    if isinstance(value, str):
        raise chk.fail(
            field,
            "the prompt is a list of messages but this field is a string; both must be strings or "
            "both message lists.",
            f'write \'{field}\' as [{{"role": "assistant", "content": "..."}}].',
        )
    msgs = chk.messages(value, field)
    chk.order(msgs, field, first="assistant", last="assistant", offset=0, allow_system=False)
    return msgs


def _validate_conversational(chk: _Checker, record: Mapping) -> dict:
    msgs = chk.messages(record["messages"], "messages", tools=True)
    chk.order(msgs, "messages", need_assistant=True, tools=True)
    out = {**record, "messages": msgs}
    if _present(record, "tools"):
        out["tools"] = check_tools(chk, record["tools"])
    return out


def _validate_prompt_completion(chk: _Checker, record: Mapping) -> dict:
    prompt = _prompt(chk, record["prompt"])
    completion = _response(chk, record["completion"], "completion", prompt)
    return {**record, "prompt": prompt, "completion": completion}


def _split_implicit(chk: _Checker, chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # The answers start at the first differing message; back up so that they start right
    # after a user turn (the inferred prompt must end with a user turn).
    while n > 0 and chosen[n - 1]["role"] != "user":
        n -= 1
    if n == 0:
        raise chk.fail(
            "chosen",
            "no 'prompt' was given and 'chosen' and 'rejected' do not share a conversation prefix "
            "ending with a user turn, so the prompt cannot be inferred.",
            "add an explicit 'prompt' field (the conversation up to the last user turn), and give "
            "'chosen' and 'rejected' as only the assistant replies.",
        )
    return chosen[:n], chosen[n:], rejected[n:]


def _validate_preference(chk: _Checker, record: Mapping) -> dict:
    out = dict(record)
    if not _present(record, "prompt"):
        # Implicit prompt: chosen/rejected are whole conversations sharing a prefix.
        for key in ("chosen", "rejected"):
            if not isinstance(record[key], (list, tuple)):
                raise chk.fail(
                    "prompt",
                    "the field is missing; without a prompt, 'chosen' and 'rejected' must be whole "
                    f"conversations (message lists), but '{key}' is {_type_name(record[key])}.",
                    "add a 'prompt' field.",
                )
        chosen = chk.messages(record["chosen"], "chosen")
        rejected = chk.messages(record["rejected"], "rejected")
        chk.order(chosen, "chosen", last="assistant")
        chk.order(rejected, "rejected", last="assistant")
        prompt, chosen, rejected = _split_implicit(chk, chosen, rejected)
        out["prompt"] = prompt
    else:
        prompt = _prompt(chk, record["prompt"])
        chosen_raw, rejected_raw = record["chosen"], record["rejected"]
        if isinstance(chosen_raw, (list, tuple)) and isinstance(rejected_raw, (list, tuple)):
            # the UltraFeedback layout: 'chosen' / 'rejected' are whole conversations that repeat the prompt
            prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            sides = {"chosen": chk.messages(chosen_raw, "chosen"), "rejected": chk.messages(rejected_raw, "rejected")}
            repeats = {k: v[: len(prompt_msgs)] == prompt_msgs and len(v) > len(prompt_msgs) for k, v in sides.items()}
            starts_with_user = {k: bool(v) and v[0]["role"] in ("user", "system") for k, v in sides.items()}
            if any(repeats.values()):
                for k, v in sides.items():
                    if not repeats[k]:
                        raise chk.fail(k, "'chosen' and 'rejected' must both repeat the prompt's turns or both leave "
                                       f"them out; '{k}' does not start with the prompt's {len(prompt_msgs)} turn(s).",
                                       f"make '{k}' start with the same turns as 'prompt', or drop them from both.")
                prompt = prompt_msgs
                chosen_raw = sides["chosen"][len(prompt_msgs):]
                rejected_raw = sides["rejected"][len(prompt_msgs):]
            elif any(starts_with_user.values()):
                side = "chosen" if starts_with_user["chosen"] else "rejected"
                raise chk.fail(
                    side, f"'{side}' is a whole conversation (it starts with a {sides[side][0]['role']} turn) whose first "
                    "turns differ from 'prompt'.",
                    "make 'prompt' the turns that chosen and rejected share (they are then treated as the prompt), or "
                    "omit 'prompt' so that the shared first turns become the prompt.")
        chosen = _response(chk, chosen_raw, "chosen", prompt)
        rejected = _response(chk, rejected_raw, "rejected", prompt)
        out["prompt"] = prompt
    if not chosen or not rejected:
        side = "chosen" if not chosen else "rejected"
        raise chk.fail(side, f"'{side}' has no reply after the shared prompt.", f"add the {side} assistant reply.")
    if chosen == rejected:
        raise chk.fail(
            "rejected",
            "'chosen' and 'rejected' are identical, so the pair carries no preference (and the "
            "loss gradient is zero).",
            "remove this record, or fix the pair.",
        )
    out["chosen"], out["rejected"] = chosen, rejected
    if _present(record, "margin"):
        chk.number(record["margin"], "margin", what="the preference margin")
    return out


def _validate_unpaired(chk: _Checker, record: Mapping) -> dict:
    out = _validate_prompt_completion(chk, record)
    label = record["label"]
    if not isinstance(label, bool):
        raise chk.fail(
            "label",
            f"expected true or false, found {_type_name(label)} ({_short(label)}).",
            "write the label as the JSON literal true (desirable) or false (undesirable); numbers "
            "and strings such as 1, \"yes\", \"desirable\" or \"undesirable\" are not accepted "
            "(map them to true/false when you build the file).",
        )
    return out


def _validate_prompt_answer(chk: _Checker, record: Mapping) -> dict:
    prompt = _prompt(chk, record["prompt"])
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int)):
        raise chk.fail(
            "answer",
            f"expected a string or an integer, found {_type_name(answer)} ({_short(answer)}).",
            "write the reference answer as a string (e.g. \"3.5\") or an integer.",
        )
    if isinstance(answer, str) and not answer.strip():
        raise chk.fail("answer", "the answer is empty.", "fill in the reference answer or remove this record.")
    return {**record, "prompt": prompt, "answer": answer}


def _validate_prompt_only(chk: _Checker, record: Mapping) -> dict:
    return {**record, "prompt": _prompt(chk, record["prompt"])}


def _validate_ranked(chk: _Checker, record: Mapping) -> dict:
    prompt = _prompt(chk, record["prompt"])
    responses, rewards = record["responses"], record["rewards"]
    if not isinstance(responses, (list, tuple)):
        raise chk.fail(
            "responses",
            f"expected a list of responses, found {_type_name(responses)} ({_short(responses)}).",
            'write \'responses\' as a list such as ["first answer", "second answer"].',
        )
    if len(responses) < 2:
        raise chk.fail(
            "responses",
            f"a ranked set needs at least 2 responses to compare, found {len(responses)}.",
            "add more scored responses for this prompt, or remove the record (a single response with "
            "a reward belongs in a different format, e.g. 'unpaired' for a good/bad label).",
        )
    if not isinstance(rewards, (list, tuple)):
        raise chk.fail(
            "rewards",
            f"expected a list of numbers (one per response), found {_type_name(rewards)} ({_short(rewards)}).",
            "write 'rewards' as a list of numbers, e.g. [1.0, 0.0].",
        )
    if len(rewards) != len(responses):
        raise chk.fail(
            "rewards",
            f"expected one reward per response ({len(responses)}), found {len(rewards)} rewards.",
            "give exactly as many rewards as responses, in the same order.",
        )
    out_rewards = [chk.number(r, f"rewards[{i}]", what=f"the reward of responses[{i}]") for i, r in enumerate(rewards)]
    out_responses = []
    for i, value in enumerate(responses):
        field = f"responses[{i}]"
        if isinstance(prompt, list) and isinstance(value, str):
            # A string answer to a conversation means one assistant turn.
            text = chk.text(value, field, nonempty=True, what=f"'{field}'")
            out_responses.append([{"role": "assistant", "content": text}])
        else:
            out_responses.append(_response(chk, value, field, prompt))
    return {**record, "prompt": prompt, "responses": out_responses, "rewards": out_rewards}


def _validate_stepwise(chk: _Checker, record: Mapping) -> dict:
    """TRL's stepwise-supervision layout: ``completions`` is the list of a solution's steps (or the
    whole solution as one string, which the trainer splits at its step delimiter) and the
    optional ``labels`` one label per step (true/false, or a number in [0, 1] such as a
    Monte-Carlo success rate)."""
    prompt = _prompt(chk, record["prompt"])
    steps = record["completions"]
    if isinstance(steps, str):  # one string, split into steps by the trainer's delimiter
        steps = [chk.text(steps, "completions", nonempty=True, what="the solution")]
    elif not isinstance(steps, (list, tuple)) or not steps:
        raise chk.fail("completions", f"expected a non-empty list of solution steps (strings), found "
                       f"{_type_name(steps)} ({_short(steps)}).",
                       'write the steps as a list, e.g. "completions": ["3 + 4 = 7", "#### 7"].')
    whole = isinstance(record["completions"], str)
    out_steps = [chk.text(v, f"completions[{i}]", nonempty=True, what=f"step {i}") for i, v in enumerate(steps)]
    out = {**record, "prompt": prompt, "completions": out_steps[0] if whole else out_steps}
    labels = record.get("labels")
    if labels is not None:
        if not isinstance(labels, (list, tuple)) or (not whole and len(labels) != len(out_steps)):
            raise chk.fail("labels", f"expected one label per step ({len(out_steps)}), found "
                           f"{len(labels) if isinstance(labels, (list, tuple)) else _type_name(labels)}.",
                           "give exactly one label per entry of 'completions', in the same order.")
        values = []
        for i, v in enumerate(labels):
            if isinstance(v, bool):
                values.append(1.0 if v else 0.0)
                continue
            x = chk.number(v, f"labels[{i}]", what=f"the label of step {i}")
            if not 0.0 <= x <= 1.0:
                raise chk.fail(f"labels[{i}]", f"a step label must lie in [0, 1] (a probability or true/false), "
                               f"found {x}.", "write true/false or the step's success rate.")
            values.append(x)
        out["labels"] = values
    return out


_VALIDATORS = {
    "conversational": _validate_conversational,
    "prompt_completion": _validate_prompt_completion,
    "preference": _validate_preference,
    "unpaired": _validate_unpaired,
    "prompt_answer": _validate_prompt_answer,
    "ranked": _validate_ranked,
    "stepwise": _validate_stepwise,
    "prompt": _validate_prompt_only,
}


def validate_record(record: Any, format: str, *, source: str = "<in-memory data>", location: str | None = None) -> dict:
    """Validate one record against ``format`` and return its normalized copy.

    Raises :class:`DataError` naming ``source``, ``location`` and the field path.
    """
    _check_format_name(format, allow_auto=False)
    chk = _Checker(source, location)
    if not isinstance(record, Mapping):
        raise chk.fail(
            None,
            f"expected a JSON object (a record), found {_type_name(record)} ({_short(record)}).",
            "write one object per record, e.g. {\"prompt\": \"...\", \"completion\": \"...\"}.",
        )
    record = dict(record)
    _require(chk, record, format)
    out = _VALIDATORS[format](chk, record)
    # After the format's own checks, so that numbers it knows (rewards, margin) get their own
    # messages; this catches NaN/inf anywhere else (metadata included).
    chk.finite(record, "")
    return out


def _check_format_name(format: str, *, allow_auto: bool) -> None:
    valid = FORMATS + (("auto",) if allow_auto else ())
    if format not in valid:
        raise DataError(
            f"unknown data format {format!r}; valid formats are {list(valid)}.",
            fix="set the data format to one of these names.",
        )


# --------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------


MAX_SCORE = 1e15  # bound on rewards / margins in data: float32 differences and softmax stay finite


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _parse_json(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys (json would keep the last one silently)."""
    return json.loads(text, object_pairs_hook=_no_duplicates)


def _json_failure(exc: Exception) -> str | None:
    """A description of why a JSON text could not be read, for errors json itself does not name."""
    if isinstance(exc, _DuplicateKey):
        return f"the key {exc.args[0]!r} appears twice in one object (JSON readers keep only one of them)"
    if isinstance(exc, RecursionError):
        return "it is nested too deeply to read"
    if isinstance(exc, ValueError) and not isinstance(exc, json.JSONDecodeError):
        return f"{str(exc).split(';')[0]}"  # e.g. an integer of more than 4300 digits
    return None


def _json_problem(exc: json.JSONDecodeError) -> str:
    """``"Expecting value at column 5"``; json's messages may already end in "at" ("Unterminated
    string starting at")."""
    return f"{exc.msg.removesuffix(' at')} at column {exc.colno}"


def _iter_jsonl(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{where(source, lineno)}: the line is not valid UTF-8 ({exc.reason} at byte {exc.start}).",
                    fix="re-save the file as UTF-8.",
                ) from None
            if not line.strip():
                continue
            try:
                obj = _parse_json(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where(source, lineno)}: invalid JSON ({_json_problem(exc)}). Each line of a "
                    "JSON Lines file must hold one complete JSON object.",
                    fix="fix the line (a common cause is a record pretty-printed across several lines, or "
                    "a trailing comma), or delete it.",
                ) from None
            except (ValueError, RecursionError) as exc:
                raise DataError(f"{where(source, lineno)}: the record cannot be read: {_json_failure(exc)}.",
                                fix="fix or delete the line.") from None
            yield f"line {lineno}", obj


def _read_json_array(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    try:
        data = _parse_json(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: the file is not valid UTF-8 ({exc.reason}).", fix="re-save it as UTF-8.") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{where(source, exc.lineno)}: invalid JSON ({_json_problem(exc)}).",
            fix="fix the JSON, or write the data as JSON Lines (one object per line).",
        ) from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{source}: the file cannot be read: {_json_failure(exc)}.",
                        fix="fix the JSON, or write the data as JSON Lines (one object per line).") from None
    for i, obj in enumerate(data):
        yield f"item {i}", obj


def _read_json_file(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    # A .json file may hold one JSON array, or (like .jsonl) one object per line.
    with open(path, "rb") as fh:
        head = fh.read(4096).decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        return _read_json_array(path, source)
    return _iter_jsonl(path, source)


def _iter_parquet(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise DataError(f"{source}: reading Parquet needs pyarrow.", fix="pip install pyarrow.") from None
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(
            f"{source}: could not read the file as Parquet ({type(exc).__name__}: {exc}).",
            fix="check that the file is a complete Parquet file (not truncated), or convert it to JSON Lines.",
        ) from None
    row = 0
    for batch in table.to_batches():
        for obj in batch.to_pylist():
            yield f"row {row}", obj
            row += 1


def _iter_arrow(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    """Rows of an Arrow IPC file: the stream format Hugging Face ``datasets`` writes (its
    ``.arrow`` cache and ``save_to_disk`` shards), or the random-access file format."""
    import pyarrow as pa

    try:
        try:
            reader = pa.ipc.open_stream(path)
            batches = iter(reader)
        except pa.ArrowInvalid:
            f = pa.ipc.open_file(path)
            batches = (f.get_batch(i) for i in range(f.num_record_batches))
        row = 0
        for batch in batches:
            for obj in batch.to_pylist():
                yield f"row {row}", obj
                row += 1
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{source}: could not read the file as Arrow ({type(exc).__name__}: {exc}).",
                        fix="check that the file is a complete Arrow file (e.g. a datasets save_to_disk shard), "
                        "or convert it to JSON Lines / Parquet.") from None


def _dataset_dir_files(path: Path) -> list[Path]:
    """The data files of a directory: a ``datasets`` ``save_to_disk`` directory (its Arrow shards
    in ``state.json`` order) or a directory of shards of one type (sorted by name)."""
    source = str(path)
    if (path / "dataset_dict.json").is_file():
        splits = sorted(d.name for d in path.iterdir() if d.is_dir())
        raise DataError(f"{source}: a DatasetDict saved with save_to_disk, with the splits {splits}.",
                        fix=f"point to one split's directory, e.g. {path / (splits[0] if splits else 'train')}.")
    state = path / "state.json"
    if state.is_file():
        try:
            names = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{state}: not a datasets state file ({type(exc).__name__}: {exc}).",
                            fix="save the dataset again with save_to_disk.") from None
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{source}: shard(s) listed in state.json are missing: {missing[:3]}.",
                            fix="copy the whole directory, or save the dataset again.")
        return files
    # .json is left out: a directory's .json files are metadata (configs), not shards
    shards = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in
                    (".jsonl", ".ndjson") + _PARQUET_SUFFIXES + _ARROW_SUFFIXES)
    kinds = {f.suffix.lower() for f in shards}
    if not shards:
        raise DataError(f"{source}: is a directory without data shards (.jsonl, .parquet, .arrow) or a "
                        "datasets save_to_disk state.json.", fix="point to a data file or a directory of shards.")
    if len(kinds) > 1:
        raise DataError(f"{source}: holds shards of several types {sorted(kinds)}; a directory is read as one "
                        "data set of one type.", fix="keep one type of shard in the directory, or point to a file.")
    return shards


def _iter_shards(files: list[Path]) -> Iterator[tuple[str, Any]]:
    for f in files:
        _, items = _open_path(f)
        for location, obj in items:
            yield f"{f.name}, {location}", obj


def _open_path(path: Path) -> tuple[str, Iterator[tuple[str, Any]]]:
    source = str(path)
    if not path.exists():
        raise DataError(f"{source}: no such file.", fix="check the path (it is relative to the working directory).")
    if path.is_dir():
        return source, _iter_shards(_dataset_dir_files(path))
    suffix = path.suffix.lower()
    if suffix in _ARROW_SUFFIXES:
        return source, _iter_arrow(path, source)
    if suffix == ".json":
        return source, _read_json_file(path, source)
    if suffix in _JSONL_SUFFIXES:
        return source, _iter_jsonl(path, source)
    if suffix in _PARQUET_SUFFIXES:
        return source, _iter_parquet(path, source)
    raise DataError(
        f"{source}: unsupported file type {suffix or '(no extension)'!r}; supported are "
        f"{list(_JSONL_SUFFIXES + _PARQUET_SUFFIXES + _ARROW_SUFFIXES)} (or a directory of shards).",
        fix="convert the data to JSON Lines (one JSON object per line) or Parquet, or rename the file "
        "if it already is one of these.",
    )


def _open_iterable(source_obj: Iterable) -> tuple[str, Iterator[tuple[str, Any]]]:
    name = f"<in-memory {type(source_obj).__name__}>"
    return name, ((f"item {i}", obj) for i, obj in enumerate(source_obj))


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def load_records(source: str | os.PathLike | Iterable[Mapping], format: str = "auto",
                 fields: Mapping | str | None = None) -> Dataset:
    """Read, validate and normalize a data set.

    Args:
        source: a path to a ``.jsonl`` / ``.json`` / ``.parquet`` file, or any iterable of
            dicts (a list, a generator, a Hugging Face ``datasets.Dataset``, a
            :class:`Dataset`).
        format: one of :data:`FORMATS`, or ``"auto"`` to detect it from the first record's
            keys (all records must then share that format).
        fields: a field mapping or preset applied to every record first (``data.fields``; see
            :mod:`posttrain.data.fields`).

    Returns:
        A :class:`Dataset`.

    Raises:
        DataError: for an unreadable file, a malformed or invalid record, mixed formats, or an
            empty data set; the message names the file, the line/row/item and the field.
    """
    source_name, records = open_records(source, format, fields)
    recs: list[dict] = []
    locations: list[str] = []
    fmt = None
    for location, record, fmt in records:
        recs.append(record)
        locations.append(location)
    if not recs:
        raise empty_data_error(source_name)
    return Dataset(recs, fmt, source_name, locations)


def empty_data_error(source_name: str) -> DataError:
    return DataError(f"{source_name}: the data set is empty (no records).",
                     fix="check the path and the file contents; blank lines are skipped.")


def open_records(source: str | os.PathLike | Iterable[Mapping], format: str = "auto",
                 fields: Mapping | str | None = None) -> tuple[str, Iterator[tuple[str, dict, str]]]:
    """``(source name, records)``: the records of ``source`` read, field-mapped, validated and
    normalized one at a time as ``(location, record, format)`` (what :func:`load_records`
    collects), so a large file can be processed without holding it. Errors as in
    :func:`load_records`, raised when the offending record is reached."""
    _check_format_name(format, allow_auto=True)
    from .fields import resolve_fields

    field_map = resolve_fields(fields)
    if isinstance(source, Dataset):
        source_name, items = source.source, zip(source.locations, source.records)
    elif isinstance(source, str) and "://" in source:
        raise DataError(f"{source}: posttrain reads data from local files, not URLs.",
                        fix="download the file first and give its local path.")
    elif isinstance(source, (str, os.PathLike)):
        source_name, items = _open_path(Path(source).expanduser())
    elif isinstance(source, Mapping):
        raise DataError(
            "load_records got a single dict; it expects a file path or an iterable of records.",
            fix="wrap the record in a list: load_records([record]).",
        )
    elif isinstance(source, Iterable):
        source_name, items = _open_iterable(source)
    else:
        raise DataError(
            f"load_records cannot read a {type(source).__name__}; it expects a file path or an "
            "iterable of dicts.",
            fix="pass a path to a .jsonl/.json/.parquet file, or a list of dicts.",
        )

    return source_name, _validated(items, source_name, format, field_map)


def _layout_hint(keys: list[str]) -> str | None:
    """The field-mapping preset that fits a public data set's own layout, if the keys show one."""
    have = set(keys)
    if {"question", "answer"} <= have:
        return ("these look like GSM8K records (question, answer with the final number after '####'): add "
                "data.fields=gsm8k for RL (question -> prompt, the number after #### -> answer) or "
                "data.fields=gsm8k-sft for SFT (question -> prompt, the worked answer -> completion).")
    if {"instruction", "output"} <= have:
        return ("these look like Alpaca records (instruction, input, output): add data.fields=alpaca "
                "(instruction + input -> prompt, output -> completion).")
    return None


def _validated(items, source_name: str, format: str, field_map) -> Iterator[tuple[str, dict, str]]:
    from .fields import map_record

    fmt = None if format == "auto" else format
    first_location = None
    for location, obj in items:
        chk = _Checker(source_name, location)
        if not isinstance(obj, Mapping):
            raise chk.fail(
                None,
                f"expected a JSON object (a record), found {_type_name(obj)} ({_short(obj)}).",
                "write exactly one JSON object per record.",
            )
        if field_map:
            obj = map_record(obj, field_map, _where(source_name, location))
        if format == "auto":
            groups = [g for g in _EXCLUSIVE_KEYS if any(_present(obj, k) for k in g)]
            if len(groups) > 1:
                raise chk.fail(
                    None,
                    f"the record has the keys of more than one format ({' and '.join('/'.join(g) for g in groups)}), "
                    "so it is not clear which to train on.",
                    "keep one format's keys per record (rename or remove the others), or pass the format explicitly.",
                )
            detected = detect_format(obj)
            if detected is None:
                found = sorted(k for k in obj if obj[k] is not None)
                options = "; ".join(f"{name}: {list(keys)}" for name, keys in _FORMAT_KEYS.items())
                raise chk.fail(
                    None,
                    f"cannot tell the data format from the keys {found}. Each format needs these keys: "
                    f"{options}.",
                    _layout_hint(found) or "rename the keys to one of these sets, or map your fields to them with "
                    "data.fields (e.g. data.fields='{prompt: question}'; presets gsm8k, gsm8k-sft, alpaca).",
                )
            if fmt is None:
                fmt, first_location = detected, location
            elif detected != fmt:
                raise chk.fail(
                    None,
                    f"this record looks like format '{detected}' but the first record "
                    f"({first_location}) looked like '{fmt}'; a data set must use one format.",
                    "make every record use the same keys, split the file, or pass the format explicitly "
                    "to get an error naming the missing field.",
                )
        yield location, validate_record(obj, fmt, source=source_name, location=location), fmt


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping], *, append: bool = False) -> Path:
    """Write ``records`` to a JSONL file, one JSON object per line (its folder created). A new file
    appears whole or not at all (written beside it, then renamed); ``append`` adds to the end of
    an existing log instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if append:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(lines)
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(lines, encoding="utf-8")
    os.replace(tmp, path)
    return path
