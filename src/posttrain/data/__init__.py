"""Data layer: formats and validation, chat templates and assistant masks, tokenization,
packing and collation.

Typical SFT flow::

    ds = load_records("train.jsonl")                       # validate, detect the format
    examples, report = encode_dataset(ds, tok, max_length=2048)
    print(report.summary())
    bins = best_fit_decreasing([len(e) for e in examples], capacity=2048)
    batch = packed_collate([[examples[i] for i in b] for b in bins[:8]], tok.pad_token_id,
                           row_length=2048)
"""

from .chat import check_tokenizer, has_generation_markers, render_conversation, render_prompt, render_turns
from .collate import packed_collate, pad_collate
from .formats import FORMATS, ROLES, Dataset, detect_format, load_records, validate_record
from .packing import PaddingStats, best_fit_decreasing, padding_stats
from .tokenize import (
    IGNORE_INDEX,
    EncodedExample,
    EncodeReport,
    encode_dataset,
    encode_sft_example,
    tokenize_prompt_and_output,
)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "ROLES",
    "Dataset",
    "EncodeReport",
    "EncodedExample",
    "PaddingStats",
    "best_fit_decreasing",
    "check_tokenizer",
    "detect_format",
    "encode_dataset",
    "encode_sft_example",
    "has_generation_markers",
    "load_records",
    "packed_collate",
    "pad_collate",
    "padding_stats",
    "render_conversation",
    "render_prompt",
    "render_turns",
    "tokenize_prompt_and_output",
    "validate_record",
]
