"""Preference data: the ranked format, margins, and encoding pairs / unpaired / ranked groups
(values: prompt tokens, trained tokens, counts; every bad input named by file, line and field)."""

from __future__ import annotations

import json

import pytest

from posttrain.data import (
    Dataset,
    EncodedExample,
    detect_format,
    encode_pairs,
    encode_ranked,
    encode_sft_example,
    encode_unpaired,
    kl_partners,
    load_records,
    render_prompt,
)
from posttrain.data.tokenize import IGNORE_INDEX
from posttrain.errors import ConfigError, DataError

USER = [{"role": "user", "content": "what is two plus three ?"}]
SYSTEM_USER = [{"role": "system", "content": "you are a helpful assistant"}, {"role": "user", "content": "sum of 4 and 5 ?"}]


def asst(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "Fix:" in msg, msg
    return msg


def trained(example: EncodedExample) -> list[int]:
    return [t for t in example.labels if t != IGNORE_INDEX]


def prompt_len(example: EncodedExample) -> int:
    return next(t for t, x in enumerate(example.labels) if x != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------
# Formats: ranked records and preference margins
# ---------------------------------------------------------------------------------------


def test_ranked_format_detection_and_normalization():
    rec = {"prompt": "2+3?", "responses": ["5", "6", "5"], "rewards": [1, 0.25, 1.0], "id": 3}
    assert detect_format(rec) == "ranked"
    ds = load_records([rec])
    assert ds.format == "ranked" and ds[0] == rec  # strings kept, ints kept as-is, duplicates allowed

    # Message prompt: a response is a message list continuing the conversation, or a string,
    # which means one assistant turn.
    multi = asst("six") + [{"role": "user", "content": "sure ?"}] + asst("five")
    ds = load_records([{"prompt": USER, "responses": ["five", asst("four"), multi], "rewards": [1, 0, 0.5]}])
    assert ds[0]["responses"] == [asst("five"), asst("four"), multi]


@pytest.mark.parametrize(
    "record, field, words",
    [
        ({"prompt": "q", "responses": ["a"], "rewards": [1]}, "responses", "at least 2 responses to compare, found 1"),
        ({"prompt": "q", "responses": "a", "rewards": [1]}, "responses", "expected a list of responses, found a string"),
        ({"prompt": "q", "responses": ["a", "b"], "rewards": [1]}, "rewards", "one reward per response (2), found 1"),
        ({"prompt": "q", "responses": ["a", "b"], "rewards": [1, 2, 3]}, "rewards", "found 3 rewards"),
        ({"prompt": "q", "responses": ["a", "b"], "rewards": 1.0}, "rewards", "expected a list of numbers"),
        ({"prompt": "q", "responses": ["a", "b"], "rewards": [1, float("nan")]}, "rewards[1]", "non-finite number nan"),
        ({"prompt": "q", "responses": ["a", "b"], "rewards": [float("-inf"), 1]}, "rewards[0]", "non-finite number -inf"),
        ({"prompt": "q", "responses": ["a", "b"], "rewards": [1, True]}, "rewards[1]", "found a boolean"),
        ({"prompt": "q", "responses": ["a", "b"], "rewards": [1, "0.5"]}, "rewards[1]", "found a string"),
        ({"prompt": "q", "responses": ["a", " "], "rewards": [1, 0]}, "responses[1]", "empty"),
        ({"prompt": "q", "responses": ["a", asst("b")], "rewards": [1, 0]}, "responses[1]", "both"),
        ({"prompt": USER, "responses": ["a", ""], "rewards": [1, 0]}, "responses[1]", "empty"),
        (
            {"prompt": USER, "responses": ["a", [{"role": "user", "content": "b"}]], "rewards": [1, 0]},
            "responses[1][0].role",
            "expected role 'assistant' here",
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "found a string"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": float("inf")}, "margin", "non-finite"),
    ],
)
def test_ranked_and_margin_errors_name_the_field(tmp_path, record, field, words):
    msg = error(load_records, [record])
    assert f"item 0, field '{field}'" in msg and words in msg, msg


def test_ranked_errors_in_a_file_name_the_line(tmp_path):
    good = {"prompt": "q", "responses": ["a", "b"], "rewards": [1, 0]}
    path = write_jsonl(tmp_path / "r.jsonl", [good, '{"prompt": "q", "responses": ["a", "b"], "rewards": [1, Infinity]}'])
    msg = error(load_records, path)
    assert f"{path}, line 2, field 'rewards[1]'" in msg and "non-finite" in msg
    path = write_jsonl(tmp_path / "r1.jsonl", [good, good, {"prompt": "q", "responses": ["a"], "rewards": [1]}])
    assert f"{path}, line 3, field 'responses'" in error(load_records, path)


def test_ranked_parquet_rows_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = {"prompt": USER, "responses": [asst("five"), asst("six")], "rewards": [1.0, 0.0]}
    path = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist([good, good]), path)
    ds = load_records(path)
    assert ds.format == "ranked" and ds[1]["responses"] == good["responses"] and ds[1]["rewards"] == [1.0, 0.0]
    pq.write_table(pa.Table.from_pylist([good, {**good, "rewards": [1.0]}]), path)
    assert f"{path}, row 1, field 'rewards'" in error(load_records, path)


def test_margin_is_kept_as_is():
    ds = load_records([{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 3}])
    assert ds[0]["margin"] == 3 and isinstance(ds[0]["margin"], int)


@pytest.mark.parametrize("label", ["desirable", "undesirable", 1, 0, 1.0])
def test_unpaired_labels_must_be_booleans(tmp_path, data_chatml_tokenizer, label):
    good = {"prompt": "q", "completion": "a", "label": True}
    path = write_jsonl(tmp_path / "u.jsonl", [good, {"prompt": "q", "completion": "b", "label": label}])
    msg = error(encode_unpaired, path, data_chatml_tokenizer, max_length=32)
    assert f"{path}, line 2, field 'label'" in msg and "expected true or false" in msg and '"desirable"' in msg, msg


# ---------------------------------------------------------------------------------------
# encode_pairs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_encode_pairs_strings(style, data_chatml_tokenizer, data_llama3_tokenizer):
    tok = {"chatml": data_chatml_tokenizer, "llama3": data_llama3_tokenizer}[style]
    records = [
        {"prompt": "what is two plus three ?", "chosen": " five", "rejected": " six , the answer is six", "margin": 2},
        {"prompt": "hello", "chosen": " world", "rejected": " dog"},
    ]
    pairs, report = encode_pairs(records, tok, max_length=64)
    assert report.total == report.kept == 2 and report.dropped == report.truncated == 0
    assert [p.margin for p in pairs] == [2.0, None]
    for record, pair in zip(records, pairs):
        prompt = tok(record["prompt"], add_special_tokens=True)["input_ids"]
        for side in ("chosen", "rejected"):
            ex = getattr(pair, side)
            assert ex.input_ids[: len(prompt)] == prompt and prompt_len(ex) == len(prompt)
            assert ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
            assert ex.labels[len(prompt) :] == ex.input_ids[len(prompt) :]  # the whole response trained
            assert tok.decode(trained(ex)) == record[side] + tok.eos_token
    if style == "llama3":
        assert pairs[0].chosen.input_ids[0] == tok.bos_token_id


@pytest.mark.parametrize("name", ["chatml", "chatml_marked", "llama3", "llama3_marked"])
def test_encode_pairs_messages(data_make_tokenizer, data_templates, name):
    tok = data_make_tokenizer(name.split("_")[0], data_templates[name])
    eot = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[name.split("_")[0]]
    multi = asst("six") + [{"role": "user", "content": "are you sure ?"}] + asst("five")
    records = [
        {"prompt": USER, "chosen": asst("five"), "rejected": asst("six"), "margin": 0.5},
        {"prompt": SYSTEM_USER, "chosen": asst("it is 9"), "rejected": asst("it is 10 , the answer is 10")},
        # Implicit prompt: whole conversations sharing the prompt turns.
        {"chosen": USER + asst("five"), "rejected": USER + asst("four")},
    ]
    pairs, report = encode_pairs(records, tok, max_length=128)
    assert report.kept == 3 and [p.margin for p in pairs] == [0.5, None, None]
    for record, pair in zip(load_records(records), pairs):
        # The prompt tokens are exactly what generation would be prompted with.
        prompt = render_prompt(tok, record["prompt"])
        for side in ("chosen", "rejected"):
            ex = getattr(pair, side)
            assert prompt_len(ex) == len(prompt) and ex.input_ids[: len(prompt)] == prompt
            assert tok.decode(trained(ex)) == record[side][0]["content"] + eot

    # A multi-turn answer: both assistant turns trained, the user turn between them not.
    (pair,), _ = encode_pairs([{"prompt": USER, "chosen": asst("five"), "rejected": multi}], tok, max_length=128)
    assert tok.decode(trained(pair.rejected)) == "six" + eot + "five" + eot
    assert prompt_len(pair.rejected) == prompt_len(pair.chosen)


def test_pair_errors_name_file_line_and_field(tmp_path, data_chatml_tokenizer, data_llama3_tokenizer):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "p.jsonl", [good, {"prompt": "q", "chosen": "same", "rejected": "same"}])
    msg = error(encode_pairs, path, data_chatml_tokenizer, max_length=32)
    assert f"{path}, line 2, field 'rejected'" in msg and "identical" in msg

    path = write_jsonl(tmp_path / "e.jsonl", [good, good, {"prompt": "q", "chosen": "a", "rejected": ""}])
    msg = error(encode_pairs, path, data_chatml_tokenizer, max_length=32)
    assert f"{path}, line 3, field 'rejected'" in msg and "empty" in msg

    # Different text, same tokens: the Llama-3 template trims the content.
    record = {"prompt": USER, "chosen": asst("five"), "rejected": asst("  five \n")}
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": USER, "chosen": asst("five"), "rejected": asst("six")}, record])
    msg = error(encode_pairs, path, data_llama3_tokenizer, max_length=64)
    assert f"{path}, line 2, field 'rejected'" in msg and "same" in msg and "token ids" in msg


def test_pair_whose_prompt_tokens_differ_is_refused(tmp_path, data_make_tokenizer, data_templates):
    # A (marked) template that adds a system turn when the conversation has more than two
    # messages: the prompt renders differently before a one-turn and a three-turn answer.
    template = "{% if messages|length > 2 %}{{ '<|im_start|>system\nlong chat<|im_end|>\n' }}{% endif %}" + data_templates[
        "chatml_marked"
    ]
    tok = data_make_tokenizer("chatml", template)
    multi = asst("six") + [{"role": "user", "content": "sure ?"}] + asst("five")
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": USER, "chosen": asst("five"), "rejected": asst("six")}, {"prompt": USER, "chosen": asst("five"), "rejected": multi}],
    )
    msg = error(encode_pairs, path, tok, max_length=128)
    assert f"{path}, line 2, field 'prompt'" in msg and "different tokens" in msg and "long chat" in msg
    # The same template is fine for the first record alone.
    pairs, _ = encode_pairs(load_records(path).records[:1], tok, max_length=128)
    assert len(pairs) == 1

    # Same check for the responses of a ranked group.
    ranked = [{"prompt": USER, "responses": [asst("five"), asst("four"), multi], "rewards": [1, 0, 0]}]
    msg = error(encode_ranked, ranked, tok, max_length=128)
    assert "item 0, field 'prompt'" in msg and "'responses[0]'" in msg and "'responses[2]'" in msg


def test_wrong_formats_are_refused_with_guidance(data_chatml_tokenizer):
    conv = [{"messages": USER + asst("five")}]
    msg = error(encode_pairs, conv, data_chatml_tokenizer, max_length=32)
    assert "'preference'" in msg and "'conversational'" in msg and "not preference pairs" in msg
    msg = error(encode_unpaired, [{"prompt": "q", "chosen": "a", "rejected": "b"}], data_chatml_tokenizer, max_length=32)
    assert "'unpaired'" in msg and '"label": true' in msg
    msg = error(encode_ranked, [{"prompt": "q", "completion": "a"}], data_chatml_tokenizer, max_length=32)
    assert "'ranked'" in msg and "'prompt_completion'" in msg
    with pytest.raises(ConfigError):
        encode_pairs([{"prompt": "q", "chosen": "a", "rejected": "b"}], data_chatml_tokenizer, max_length=32, overlong="cut")


def test_pairs_over_long_truncate_and_drop_are_counted(data_chatml_tokenizer):
    tok = data_chatml_tokenizer
    words = "the quick brown fox jumps over the lazy dog"
    long_prompt = " ".join([words] * 6)
    records = [
        {"prompt": "hello", "chosen": " world", "rejected": " dog"},  # short
        {"prompt": "hello", "chosen": " world", "rejected": " " + " ".join([words] * 4)},  # long rejected
        {"prompt": long_prompt, "chosen": " a", "rejected": " b"},  # prompt alone fills max_length
        {"prompt": "hello", "chosen": " " + words * 3 + " cat", "rejected": " " + words * 3 + " dog"},  # same start
    ]
    full = {
        (i, side): encode_sft_example(
            {"prompt": r["prompt"], "completion": r[side]}, tok, format="prompt_completion", max_length=10_000
        )
        for i, r in enumerate(records)
        for side in ("chosen", "rejected")
    }
    max_length = 16
    assert len(full[0, "rejected"]) <= max_length < len(full[1, "rejected"])
    assert prompt_len(full[2, "chosen"]) >= max_length
    assert prompt_len(full[3, "chosen"]) < max_length < len(full[3, "chosen"])
    assert full[3, "chosen"].input_ids[:max_length] == full[3, "rejected"].input_ids[:max_length]

    pairs, report = encode_pairs(records, tok, max_length=max_length, overlong="truncate")
    assert (report.total, report.kept, report.truncated) == (4, 2, 1)
    assert (report.truncated_chosen, report.truncated_rejected) == (0, 1)
    assert report.dropped_no_trainable_tokens == 1 and report.dropped_identical_after_truncation == 1
    assert report.dropped_locations == ["item 2", "item 3"]
    cut = pairs[1].rejected
    assert cut.truncated and len(cut) == max_length and cut.input_ids == full[1, "rejected"].input_ids[:max_length]
    assert cut.labels == full[1, "rejected"].labels[:max_length] and not pairs[1].chosen.truncated
    assert "kept 2" in report.summary() and "1 identical after truncation" in report.summary()

    pairs, report = encode_pairs(records, tok, max_length=max_length, overlong="drop")
    assert (report.kept, report.dropped_overlong, report.truncated) == (1, 3, 0)
    assert pairs[0].chosen.input_ids == full[0, "chosen"].input_ids

    msg = error(encode_pairs, records[2:], tok, max_length=max_length)
    assert "every one of the 2 pairs was dropped" in msg


# ---------------------------------------------------------------------------------------
# encode_unpaired (KTO)
# ---------------------------------------------------------------------------------------


def unpaired_records(n: int, *, messages: bool = False) -> list[dict]:
    out = []
    for i in range(n):
        q, a = f"sum of {i} and 1 ?", f" it is {i + 1}"
        if messages:
            out.append({"prompt": [{"role": "user", "content": q}], "completion": asst(a.strip()), "label": i % 3 != 0})
        else:
            out.append({"prompt": q, "completion": a, "label": i % 3 != 0})
    return out


def test_kl_partners_are_a_seeded_derangement_within_each_kind():
    ds = load_records(unpaired_records(9))
    for seed in range(20):
        p = kl_partners(ds, seed=seed)
        assert sorted(p) == list(range(9)) and all(p[i] != i for i in range(9))
        assert p == kl_partners(ds, seed=seed)  # deterministic
    assert len({tuple(kl_partners(ds, seed=s)) for s in range(20)}) > 10  # the seed matters

    mixed = unpaired_records(4) + unpaired_records(3, messages=True) + unpaired_records(2)
    ds = load_records(mixed, format="unpaired")
    kind = [isinstance(r["prompt"], str) for r in ds.records]
    for seed in range(10):
        p = kl_partners(ds, seed=seed)
        assert sorted(p) == list(range(9)) and all(p[i] != i and kind[p[i]] == kind[i] for i in range(9))


def test_encode_unpaired_values(data_chatml_tokenizer):
    tok = data_chatml_tokenizer
    records = unpaired_records(5) + unpaired_records(3, messages=True)
    ds = load_records(records)
    out, report = encode_unpaired(ds, tok, max_length=64, seed=7)
    partners = kl_partners(ds, seed=7)
    assert report.kept == 8 and report.desirable == sum(r["label"] for r in records) and report.undesirable == 3
    for i, (record, u) in enumerate(zip(records, out)):
        assert u.desirable is record["label"]
        own = encode_sft_example(
            {"prompt": record["prompt"], "completion": record["completion"]}, tok, format="prompt_completion", max_length=64
        )
        kl = encode_sft_example(
            {"prompt": record["prompt"], "completion": records[partners[i]]["completion"]},
            tok,
            format="prompt_completion",
            max_length=64,
        )
        assert u.example == own and u.kl_example == kl and u.kl_example != u.example
        assert u.kl_example.input_ids[: prompt_len(own)] == own.input_ids[: prompt_len(own)]
    again, _ = encode_unpaired(ds, tok, max_length=64, seed=7)
    assert again == out


def test_encode_unpaired_errors_and_over_long(tmp_path, data_chatml_tokenizer):
    tok = data_chatml_tokenizer
    msg = error(encode_unpaired, unpaired_records(1), tok, max_length=64)
    assert "at least 2 records, found 1" in msg

    path = write_jsonl(tmp_path / "m.jsonl", unpaired_records(3) + unpaired_records(1, messages=True))
    msg = error(encode_unpaired, path, tok, max_length=64)
    assert f"{path}, line 4, field 'completion'" in msg and "only record" in msg and "message lists" in msg

    long = {"prompt": "hello", "completion": " " + " ".join(["the quick brown fox jumps over the lazy dog"] * 3), "label": False}
    records = unpaired_records(3) + [long]
    out, report = encode_unpaired(records, tok, max_length=12, overlong="drop", seed=0)
    assert (report.kept, report.dropped_overlong) == (3, 1) and report.dropped_locations == ["item 3"]
    # Some kept record got the long completion as its KL example: cut to max_length, counted.
    assert report.kl_truncated == 1 == sum(u.kl_example.truncated for u in out)
    assert all(len(u.kl_example) <= 12 for u in out)
    out, report = encode_unpaired(records, tok, max_length=12, overlong="truncate", seed=0)
    assert (report.kept, report.truncated, report.kl_truncated) == (4, 1, 1) and len(out[3].example) == 12


# ---------------------------------------------------------------------------------------
# encode_ranked
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chatml", "llama3_marked"])
def test_encode_ranked_values(data_make_tokenizer, data_templates, name):
    tok = data_make_tokenizer(name.split("_")[0], data_templates[name])
    eot = tok.eos_token
    records = [
        {"prompt": USER, "responses": ["five", asst("six"), asst("it is five")], "rewards": [1, 0, 0.75]},
        {"prompt": SYSTEM_USER, "responses": ["9", "9"], "rewards": [1, 1]},
    ]
    groups, report = encode_ranked(records, tok, max_length=128)
    assert (report.kept, report.responses_kept, report.dropped) == (2, 5, 0)
    assert groups[0].rewards == [1.0, 0.0, 0.75] and all(isinstance(r, float) for r in groups[0].rewards)
    for record, group in zip(load_records(records), groups):
        prompt = render_prompt(tok, record["prompt"])
        for response, ex in zip(record["responses"], group.responses):
            assert ex.input_ids[: prompt_len(ex)] == prompt
            assert tok.decode(trained(ex)) == response[0]["content"] + eot
    assert groups[1].responses[0] == groups[1].responses[1]  # duplicates are kept


def test_encode_ranked_over_long_responses_and_groups(data_chatml_tokenizer):
    tok = data_chatml_tokenizer
    long = " " + " ".join(["the quick brown fox jumps over the lazy dog"] * 3)
    records = [
        {"prompt": "hello", "responses": [" a", long, " b"], "rewards": [0, 1, 2]},
        {"prompt": "hello", "responses": [" a", long], "rewards": [0, 1]},
    ]
    groups, report = encode_ranked(records, tok, max_length=12, overlong="drop")
    assert (report.total, report.kept, report.dropped_too_few_responses) == (2, 1, 1)
    assert (report.responses_total, report.responses_kept, report.responses_dropped_overlong) == (5, 2, 2)
    assert groups[0].rewards == [0.0, 2.0] and report.dropped_locations == ["item 1"]
    groups, report = encode_ranked(records, tok, max_length=12, overlong="truncate")
    assert (report.kept, report.responses_kept, report.responses_truncated) == (2, 5, 2)
    assert [len(e) for e in groups[1].responses] == [len(groups[0].responses[0]), 12]
    assert "dropped 0 groups" in report.summary()
    msg = error(encode_ranked, records[1:], tok, max_length=12, overlong="drop")
    assert "every one of the 1 groups was dropped" in msg


def test_hand_built_dataset_is_accepted(data_chatml_tokenizer):
    ds = Dataset([{"prompt": "q", "chosen": " a", "rejected": " b"}], "preference", "mem", ["item 0"])
    pairs, report = encode_pairs(ds, data_chatml_tokenizer, max_length=16)
    assert report.kept == 1 and pairs[0].chosen.input_ids != pairs[0].rejected.input_ids
