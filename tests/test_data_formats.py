"""Loading and validating records: formats, locations, and error messages."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.data.formats import FORMATS, Dataset, detect_format, load_records, validate_record
from posttrain.errors import DataError

CONV = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
PC = {"prompt": "2+2?", "completion": "4"}
PREF = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
UNP = {"prompt": "2+2?", "completion": "4", "label": True}
PA = {"prompt": "2+2?", "answer": 4}


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def error_text(source, format="auto") -> str:
    with pytest.raises(DataError) as info:
        load_records(source, format=format)
    return str(info.value)


# ---------------------------------------------------------------------------------------
# Happy paths
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, fmt",
    [(CONV, "conversational"), (PC, "prompt_completion"), (PREF, "preference"), (UNP, "unpaired"), (PA, "prompt_answer")],
)
def test_auto_detects_each_format_from_keys(record, fmt):
    assert detect_format(record) == fmt
    ds = load_records([record, record])
    assert ds.format == fmt and len(ds) == 2 and ds[0]["prompt" if fmt != "conversational" else "messages"]


def test_dataset_container_and_jsonl_locations_count_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PC, "", "   ", PC])
    ds = load_records(path)
    assert isinstance(ds, Dataset)
    assert ds.source == str(path) and ds.format == "prompt_completion"
    assert ds.locations == ["line 1", "line 4"]
    assert list(ds) == ds.records and ds[1] == PC
    assert ds.where(1, "completion") == f"{path}, line 4, field 'completion'"


def test_json_array_file_and_parquet_and_generic_iterables(tmp_path):
    array_path = tmp_path / "d.json"
    array_path.write_text(json.dumps([PC, PC]))
    ds = load_records(array_path)
    assert ds.locations == ["item 0", "item 1"]

    lines_json = write_jsonl(tmp_path / "lines.json", [PC, PC, PC])
    assert len(load_records(lines_json)) == 3

    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([CONV, CONV]), pq_path)
    ds = load_records(pq_path)
    assert ds.format == "conversational" and ds.locations == ["row 0", "row 1"]
    assert ds[0]["messages"] == CONV["messages"]

    ds = load_records(r for r in [PA, PA])  # any iterable of dicts (HF datasets.Dataset works alike)
    assert ds.source.startswith("<in-memory") and ds.locations == ["item 0", "item 1"]
    assert len(load_records(ds)) == 2  # a Dataset is itself a valid source


def test_messages_are_normalized_and_parquet_nulls_are_absent(tmp_path):
    # Parquet unifies struct fields across rows: a key present on one message is null on the others.
    rows = [
        {"messages": [{"role": "user", "content": "hi", "name": None}, {"role": "assistant", "content": "yo", "name": None}]}
    ]
    ds = load_records(rows)
    assert ds[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_extra_top_level_keys_are_kept():
    ds = load_records([{**PC, "id": 7, "meta": {"src": "x"}}])
    assert ds[0]["id"] == 7 and ds[0]["meta"] == {"src": "x"}


def test_conversational_prompt_completion_and_preference_with_messages():
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    ds = load_records([{"prompt": prompt, "completion": [{"role": "assistant", "content": "a"}]}])
    assert ds.format == "prompt_completion"
    pref = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    assert load_records([pref]).format == "preference"


def test_preference_with_implicit_prompt_is_made_explicit():
    shared = [{"role": "user", "content": "q"}]
    record = {
        "chosen": shared + [{"role": "assistant", "content": "good"}],
        "rejected": shared + [{"role": "assistant", "content": "bad"}],
    }
    ds = load_records([record])
    assert ds.format == "preference"
    assert ds[0]["prompt"] == shared
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "good"}]
    assert ds[0]["rejected"] == [{"role": "assistant", "content": "bad"}]


# ---------------------------------------------------------------------------------------
# Errors: every message names the place, the field, what was expected and found, and a fix
# ---------------------------------------------------------------------------------------


def test_malformed_json_names_file_line_and_reason(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [PC, PC, '{"prompt": "x", "completion": }'])
    msg = error_text(path)
    assert f"{path}, line 3" in msg and "invalid JSON" in msg and "column" in msg and "Fix:" in msg


def test_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [PC, "[1, 2]"])
    msg = error_text(path)
    assert "line 2" in msg and "expected a JSON object" in msg and "a list" in msg


def test_empty_file_and_empty_list(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    assert "empty" in error_text(path)
    assert "empty" in error_text([])


def test_missing_file_directory_and_unknown_suffix(tmp_path):
    assert "no such file" in error_text(tmp_path / "nope.jsonl")
    assert "directory" in error_text(tmp_path)
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    msg = error_text(csv)
    assert "unsupported file type '.csv'" in msg and ".jsonl" in msg


def test_unknown_format_name_lists_valid_ones():
    msg = error_text([PC], format="sft")
    assert "'sft'" in msg and all(name in msg for name in FORMATS)


def test_undetectable_keys_list_expected_key_sets():
    msg = error_text([{"question": "q", "response": "r"}])
    assert "item 0" in msg and "['question', 'response']" in msg and "prompt_completion: ['prompt', 'completion']" in msg


def test_mixed_formats_name_the_first_differing_line(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [PC, PC, PREF, PC])
    msg = error_text(path)
    assert "line 3" in msg and "'preference'" in msg and "line 1" in msg and "'prompt_completion'" in msg


def test_explicit_format_names_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PREF, {"prompt": "x", "chosen": "y"}])
    msg = error_text(path, format="preference")
    assert "line 2, field 'rejected'" in msg and "missing" in msg


@pytest.mark.parametrize(
    "messages, field, words",
    [
        ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "messages[1].role", "unknown role 'bot'"),
        ([{"role": "user", "content": "q"}, {"role": "assistant"}], "messages[1].content", "no 'content'"),
        ([{"role": "user", "content": "q"}, {"content": "a"}], "messages[1].role", "no 'role'"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}], "messages[1].content", "found an integer"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "messages[1].content", "empty"),
        ([{"role": "assistant", "content": "a"}], "messages[0].role", "expected role 'user' here"),
        (
            [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}],
            "messages[1].role",
            "expected role 'assistant' here",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
            "messages[1].role",
            "only allowed as the first",
        ),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "messages", "no assistant turn"),
        ([{"role": "user", "content": "q"}, "hello"], "messages[1]", "expected a message object"),
        (
            [{"role": "user", "content": "q", "tool_calls": []}, {"role": "assistant", "content": "a"}],
            "messages[0]",
            "unsupported message key",
        ),
        ("hello", "messages", "expected a list of messages"),
    ],
)
def test_conversation_errors_name_the_field_path(tmp_path, messages, field, words):
    path = write_jsonl(tmp_path / "c.jsonl", [CONV, {"messages": messages}])
    msg = error_text(path)
    assert f"{path}, line 2, field '{field}'" in msg, msg
    assert words in msg and "Fix:" in msg


@pytest.mark.parametrize(
    "record, fmt, field, words",
    [
        ({"prompt": "q", "completion": ""}, "prompt_completion", "completion", "empty"),
        ({"prompt": 5, "completion": "a"}, "prompt_completion", "prompt", "expected a string or a list of messages"),
        ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}, "prompt_completion", "completion", "both"),
        (
            {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
            "prompt_completion",
            "completion[0].role",
            "expected role 'assistant' here",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "completion": [{"role": "assistant", "content": "b"}],
            },
            "prompt_completion",
            "prompt",
            "last message to be a 'user'",
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "preference", "rejected", "identical"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "preference", "chosen", "empty"),
        ({"prompt": "q", "completion": "a", "label": 1}, "unpaired", "label", "expected true or false"),
        ({"prompt": "q", "completion": "a", "label": "true"}, "unpaired", "label", "found a string"),
        ({"prompt": "q", "answer": 2.5}, "prompt_answer", "answer", "expected a string or an integer"),
        ({"prompt": "q", "answer": True}, "prompt_answer", "answer", "found a boolean"),
        ({"prompt": "q", "answer": " "}, "prompt_answer", "answer", "empty"),
        ({"prompt": "q", "answer": "1", "score": float("nan")}, "prompt_answer", "score", "non-finite"),
        ({"prompt": "q", "answer": "1", "meta": {"w": [1.0, float("inf")]}}, "prompt_answer", "meta.w[1]", "non-finite"),
    ],
)
def test_record_errors(record, fmt, field, words):
    with pytest.raises(DataError) as info:
        load_records([{**record}], format=fmt)
    msg = str(info.value)
    assert f"item 0, field '{field}'" in msg, msg
    assert words in msg, msg


def test_nan_literal_in_jsonl_is_rejected_with_line(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [PA, '{"prompt": "q", "answer": "1", "weight": NaN}'])
    msg = error_text(path)
    assert "line 2, field 'weight'" in msg and "non-finite" in msg


def test_implicit_preference_without_shared_prefix_is_refused():
    record = {
        "chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}],
    }
    msg = error_text([record])
    assert "prompt cannot be inferred" in msg and "Fix:" in msg


def test_single_dict_and_non_iterable_sources():
    assert "wrap the record in a list" in error_text(PC)
    assert "cannot read a int" in error_text(3)


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(json.dumps(PC).encode() + b"\n" + b'{"prompt": "\xff", "completion": "a"}\n')
    msg = error_text(path)
    assert "line 2" in msg and "UTF-8" in msg


def test_validate_record_directly():
    out = validate_record(PC, "prompt_completion", source="x.jsonl", location="line 9")
    assert out == PC
    with pytest.raises(DataError, match=r"x.jsonl, line 9, field 'completion'"):
        validate_record({"prompt": "q"}, "prompt_completion", source="x.jsonl", location="line 9")
