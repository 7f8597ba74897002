"""Field mapping: read public data sets in their own layout, without converting them.

``data.fields`` says where each field a record format needs is found in the records::

    data.fields: {prompt: question, answer: {field: answer, after: "####"}}     # GSM8K for RL
    data.fields: {prompt: question, completion: answer}                         # GSM8K for SFT
    data.fields: {prompt: "{instruction}\\n\\n{input}", completion: output}      # Alpaca
    data.fields: {chosen: response_j, rejected: response_k}                     # renamed sides

or names a preset (:data:`PRESETS`: ``gsm8k``, ``gsm8k-sft``, ``alpaca``). A value is

* a field name (``question``; ``a.b`` reads a nested field),
* a template with ``{name}`` placeholders, filled from the record's fields and stripped (so
  Alpaca's empty ``input`` leaves the instruction alone), or
* a mapping ``{field: NAME, after: MARKER}`` (the text after the last ``MARKER``, stripped:
  GSM8K's final answer after ``####``) or ``{field: NAME, before: MARKER}``.

The mapped fields replace the source fields they read; the record's other fields are kept (the
reward functions see them). A field that is not there is an error naming the file, the record,
the missing field and the fields the record has.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, DataError

PRESETS: dict[str, dict[str, Any]] = {
    # openai/gsm8k: {"question", "answer": "...reasoning...\n#### 72"}
    "gsm8k": {"prompt": "question", "answer": {"field": "answer", "after": "####"}},
    "gsm8k-sft": {"prompt": "question", "completion": "answer"},
    # tatsu-lab/alpaca: {"instruction", "input", "output"}
    "alpaca": {"prompt": "{instruction}\n\n{input}", "completion": "output"},
}

_SPEC_KEYS = {"field", "after", "before"}


def _placeholders(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"The data.fields template {template!r} is not valid ({e}).",
                          fix="write fields as {name}; double braces ({{ }}) for literal ones.") from None


def resolve_fields(fields: Mapping | str | None, *, key: str = "data.fields") -> dict[str, Any] | None:
    """A checked field map (a preset name resolved), or None for no mapping."""
    if fields is None or fields == {}:
        return None
    if isinstance(fields, str):
        if fields not in PRESETS:
            raise ConfigError(f"{key}={fields!r} is not a preset; presets are {sorted(PRESETS)}.",
                              fix="use one of those, or a mapping such as {prompt: question, completion: answer}.")
        return dict(PRESETS[fields])
    if not isinstance(fields, Mapping):
        raise ConfigError(f"{key} must be a mapping (target field -> source) or a preset name, got {fields!r}.",
                          fix="write e.g. data.fields={prompt: question, completion: answer}.")
    out = {}
    for target, spec in fields.items():
        k = f"{key}.{target}"
        if isinstance(spec, str):
            if not spec.strip():
                raise ConfigError(f"{k} is empty.", fix="name the source field.")
            _placeholders(spec)
        elif isinstance(spec, Mapping):
            extra = set(spec) - _SPEC_KEYS
            if extra or "field" not in spec or not isinstance(spec["field"], str):
                raise ConfigError(f"{k}={dict(spec)!r}: a mapping value needs 'field' and may have 'after' or "
                                  "'before' (nothing else).", fix=f"write e.g. {k}={{field: answer, after: '####'}}.")
            if "after" in spec and "before" in spec:
                raise ConfigError(f"{k} has both 'after' and 'before'.", fix="use one of them.")
        else:
            raise ConfigError(f"{k}={spec!r} is neither a field name, a template nor a mapping.",
                              fix=f"write e.g. {k}=question.")
        out[str(target)] = spec
    return out


def _get(record: Mapping, name: str, where: str, target: str):
    node: Any = record
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise DataError(f"{where}: data.fields.{target} reads the field '{name}', which this record does not have; "
                            f"its fields are {sorted(record)}.",
                            fix=f"map {target} to one of those fields (data.fields.{target}=...).")
        node = node[part]
    return node


def map_record(record: Mapping, fields: dict[str, Any], where: str) -> dict:
    """``record`` with the mapped fields filled in (and the source fields they read removed)."""
    out = dict(record)
    used: set[str] = set()
    values = {}
    for target, spec in fields.items():
        if isinstance(spec, Mapping):
            raw = _get(record, spec["field"], where, target)
            used.add(spec["field"].split(".")[0])
            if not isinstance(raw, str):
                raise DataError(f"{where}: data.fields.{target} cuts the field '{spec['field']}' at a marker, but it "
                                f"holds {type(raw).__name__}, not text.", fix="map a text field.")
            marker = spec.get("after", spec.get("before"))
            if marker is not None:
                if marker not in raw:
                    raise DataError(f"{where}: field '{spec['field']}' has no {marker!r} (data.fields.{target} takes "
                                    f"the text {'after' if 'after' in spec else 'before'} it): {raw[-80:]!r}.",
                                    fix="fix or drop the record, or change the marker.")
                raw = raw.rsplit(marker, 1)[1] if "after" in spec else raw.split(marker, 1)[0]
                raw = raw.strip()
            values[target] = raw
        elif "{" in spec:
            names = _placeholders(spec)
            filled = {n: _get(record, n, where, target) for n in names}
            used.update(n.split(".")[0] for n in names)
            flat = {n: ("" if v is None else v) for n, v in filled.items()}
            text = spec
            for n, v in flat.items():   # format by name (dotted names are not format fields)
                text = text.replace("{" + n + "}", str(v))
            values[target] = text.replace("{{", "{").replace("}}", "}").strip()
        else:
            values[target] = _get(record, spec, where, target)
            used.add(spec.split(".")[0])
    for name in used:
        out.pop(name, None)
    out.update(values)
    return out


def check_builtin(spec: str, fields, key: str = "data.train") -> None:
    """Built-in data is generated in posttrain's formats: a field mapping there would be ignored,
    so it is refused."""
    if fields and str(spec).startswith("builtin:"):
        raise ConfigError(f"data.fields is set, but {key}={spec} is built-in data, which needs no mapping.",
                          fix="remove data.fields, or point the key to the file the mapping is for.")


__all__ = ["PRESETS", "check_builtin", "map_record", "resolve_fields"]

FIELDS_HELP = ("Field mapping applied to every record before it is validated, so public data sets load in their "
               "own layout: {target: source field | '{a} {b}' template | {field: f, after: '####'}}, or a preset "
               "(gsm8k, gsm8k-sft, alpaca); see posttrain.data.fields.")
