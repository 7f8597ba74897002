"""Tokenization: the fixed prompt/output contract, and SFT example encoding."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from posttrain.data.chat import render_conversation
from posttrain.data.formats import load_records
from posttrain.data.tokenize import (
    IGNORE_INDEX,
    EncodedExample,
    _shift_and_pad,
    encode_dataset,
    encode_sft_example,
    tokenize_prompt_and_output,
)
from posttrain.errors import ConfigError, DataError

EOS = 151643


@pytest.fixture(scope="module")
def qwen_like_ids_tokenizer():
    """A word-level tokenizer whose ids match the worked example (Qwen ids, no BOS)."""
    vocab = {"Hello": 9707, ",": 11, "world": 1879, "!": 0, "<|endoftext|>": EOS, "[UNK]": 5}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="[UNK]")


# ---------------------------------------------------------------------------------------
# tokenize_prompt_and_output: the worked example and the rules
# ---------------------------------------------------------------------------------------


def test_worked_example(qwen_like_ids_tokenizer):
    # Row 0 combines to [9707, 11, 1879, 0, 9707, 11, 1879, 0] (8 tokens); row 1 is 10 tokens
    # long, so the target length is 9 and row 0 needs two padding positions.
    out = tokenize_prompt_and_output(
        ["Hello, world!", "Hello, world!"], ["Hello, world!", "Hello, world! Hello,"], qwen_like_ids_tokenizer
    )
    assert out["input_ids"].shape == out["labels"].shape == out["response_mask"].shape == (2, 9)
    assert out["input_ids"].dtype == torch.long and out["response_mask"].dtype == torch.float32
    assert out["input_ids"][0].tolist() == [9707, 11, 1879, 0, 9707, 11, 1879, 0, EOS]
    assert out["labels"][0].tolist() == [11, 1879, 0, 9707, 11, 1879, 0, EOS, EOS]
    assert out["response_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0]
    # The longest row is not padded: plain shift.
    combined = [9707, 11, 1879, 0, 9707, 11, 1879, 0, 9707, 11]
    assert out["input_ids"][1].tolist() == combined[:-1]
    assert out["labels"][1].tolist() == combined[1:]
    assert out["response_mask"][1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]


def test_padding_rules_by_hand():
    # EOS = 2. Row lengths 3, 5 and 4 -> target length 4.
    out = _shift_and_pad([[7, 8], [7, 8, 9], [7]], [[5], [5, 6], [4, 3, 3]], eos_token_id=2)
    assert out["input_ids"].tolist() == [[7, 8, 0, 2], [7, 8, 9, 5], [7, 4, 3, 2]]
    assert out["labels"].tolist() == [[8, 5, 2, 2], [8, 9, 5, 6], [4, 3, 3, 2]]
    assert out["response_mask"].tolist() == [[0, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 0]]


def test_prompt_gets_special_tokens_output_does_not(data_llama3_tokenizer):
    tok = data_llama3_tokenizer
    out = tokenize_prompt_and_output(["hello"], ["world"], tok)
    prompt = tok("hello")["input_ids"]
    output = tok("world", add_special_tokens=False)["input_ids"]
    assert prompt[0] == tok.bos_token_id and tok.bos_token_id not in output
    combined = prompt + output
    assert out["input_ids"][0].tolist() == combined[:-1]
    assert out["labels"][0].tolist() == combined[1:]
    assert out["response_mask"][0].sum().item() == len(output)


# ---------------------------------------------------------------------------------------
# encode_sft_example
# ---------------------------------------------------------------------------------------

CONV = [
    {"role": "system", "content": "you are helpful"},
    {"role": "user", "content": "what is two plus two?"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "and 3 + 3 ?"},
    {"role": "assistant", "content": "six"},
]


def trained_text(tok, ex):
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX], skip_special_tokens=False)


def test_conversational_trains_every_assistant_turn(data_chatml_tokenizer):
    tok = data_chatml_tokenizer
    ex = encode_sft_example({"messages": CONV}, tok, format="conversational", max_length=512)
    rendered = render_conversation(tok, CONV)
    assert ex.input_ids == rendered["input_ids"] and not ex.truncated
    assert ex.labels == [t if m else IGNORE_INDEX for t, m in zip(rendered["input_ids"], rendered["assistant_mask"])]
    assert trained_text(tok, ex) == "four<|im_end|>six<|im_end|>"


def test_string_prompt_completion_bos_and_eos(data_llama3_tokenizer):
    tok = data_llama3_tokenizer
    ex = encode_sft_example({"prompt": "what is two", "completion": " plus two"}, tok, format="prompt_completion", max_length=64)
    prompt = tok("what is two")["input_ids"]
    assert ex.input_ids[0] == tok.bos_token_id
    assert ex.input_ids[: len(prompt)] == prompt and ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ex.input_ids[-1] == tok.eos_token_id and ex.labels[-1] == tok.eos_token_id
    assert trained_text(tok, ex) == " plus two<|eot_id|>"
    # A completion that already ends with EOS does not get a second one.
    ex2 = encode_sft_example(
        {"prompt": "what is two", "completion": " plus two<|eot_id|>"}, tok, format="prompt_completion", max_length=64
    )
    assert ex2.input_ids == ex.input_ids


def test_message_prompt_completion_trains_only_the_completion(data_chatml_tokenizer):
    tok = data_chatml_tokenizer
    record = {"prompt": CONV[:4], "completion": CONV[4:]}
    ex = encode_sft_example(record, tok, format="prompt_completion", max_length=512)
    assert ex.input_ids == render_conversation(tok, CONV)["input_ids"]
    assert trained_text(tok, ex) == "six<|im_end|>"  # the assistant turn inside the prompt is context


def test_loss_on_all_trains_every_token_but_the_first(data_chatml_tokenizer):
    ex = encode_sft_example({"messages": CONV}, data_chatml_tokenizer, format="conversational", max_length=512, loss_on="all")
    assert ex.labels[0] == IGNORE_INDEX and ex.labels[1:] == ex.input_ids[1:]


def test_overlong_truncate_keeps_the_prompt_and_cuts_the_end(data_llama3_tokenizer):
    tok = data_llama3_tokenizer
    record = {"prompt": "what is two", "completion": " plus two and then four and five"}
    full = encode_sft_example(record, tok, format="prompt_completion", max_length=1000)
    n_prompt = len(tok("what is two")["input_ids"])
    cut = encode_sft_example(record, tok, format="prompt_completion", max_length=n_prompt + 2)
    assert cut.truncated and len(cut.input_ids) == n_prompt + 2
    assert cut.input_ids == full.input_ids[: n_prompt + 2] and cut.labels == full.labels[: n_prompt + 2]
    assert cut.num_trainable == 2
    # Prompt alone fills max_length: nothing trainable is left, so the example is dropped.
    assert encode_sft_example(record, tok, format="prompt_completion", max_length=n_prompt) is None
    # overlong="drop" drops anything over-long.
    assert encode_sft_example(record, tok, format="prompt_completion", max_length=n_prompt + 2, overlong="drop") is None


def test_encode_dataset_report(data_chatml_tokenizer, tmp_path):
    tok = data_chatml_tokenizer
    records = [
        {"prompt": "two", "completion": " four"},  # short
        {"prompt": "two", "completion": " four" * 20},  # over-long: truncated
        {"prompt": "what is two plus two ? " * 10, "completion": " four"},  # prompt alone too long
    ]
    limit = len(tok("two")["input_ids"]) + 10
    assert len(tok(records[2]["prompt"])["input_ids"]) > limit
    examples, report = encode_dataset(load_records(records), tok, max_length=limit)
    assert (report.total, report.kept, report.truncated) == (3, 2, 1)
    assert (report.dropped_overlong, report.dropped_no_trainable_tokens) == (0, 1)
    assert report.dropped_locations == ["item 2"]
    assert all(len(e.input_ids) <= limit for e in examples)
    line = report.summary()
    assert "\n" not in line and "kept 2" in line and "1 truncated" in line and "item 2" in line

    examples, report = encode_dataset(load_records(records), tok, max_length=limit, overlong="drop")
    assert (report.kept, report.truncated, report.dropped_overlong, report.dropped_no_trainable_tokens) == (1, 0, 2, 0)

    with pytest.raises(DataError, match="every one of the 3 records was dropped.*Fix: use data.overlong=truncate"):
        encode_dataset(load_records(records), tok, max_length=2, overlong="drop")


def test_encode_errors(data_chatml_tokenizer, data_make_tokenizer):
    tok = data_chatml_tokenizer
    pref = load_records([{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="SFT needs data in one of the formats"):
        encode_dataset(pref, tok, max_length=32)
    with pytest.raises(ConfigError, match="max_length"):
        encode_sft_example({"prompt": "q", "completion": "a"}, tok, format="prompt_completion", max_length=1)
    with pytest.raises(ConfigError, match="overlong"):
        encode_sft_example({"prompt": "q", "completion": "a"}, tok, format="prompt_completion", max_length=8, overlong="cut")
    with pytest.raises(ConfigError, match="loss_on"):
        encode_sft_example({"prompt": "q", "completion": "a"}, tok, format="prompt_completion", max_length=8, loss_on="x")
    no_template = data_make_tokenizer("chatml", None)
    from posttrain.errors import TokenizerError

    with pytest.raises(TokenizerError, match="no chat template"):
        encode_dataset(load_records([{"messages": CONV}]), no_template, max_length=64)


def test_template_refusal_names_the_record(data_make_tokenizer, tmp_path):
    import json

    from posttrain.errors import TokenizerError

    tok = data_make_tokenizer(
        "chatml",
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
    )
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CONV[1:3]}) + "\n")
    with pytest.raises(TokenizerError, match=rf"{path}, line 1: assistant-only loss masks cannot be derived"):
        encode_dataset(load_records(path), tok, max_length=64)


def test_encoded_example_checks_lengths():
    with pytest.raises(ValueError):
        EncodedExample([1, 2], [1])


def test_encode_sft_example_validates_raw_records(data_chatml_tokenizer):
    with pytest.raises(DataError, match=r"x.jsonl, line 4, field 'messages'.*missing"):
        encode_sft_example(
            {"prompt": "q", "completion": "a"},
            data_chatml_tokenizer,
            format="conversational",
            max_length=32,
            source="x.jsonl",
            location="line 4",
        )
