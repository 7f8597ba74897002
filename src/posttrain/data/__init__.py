"""Data layer: formats and validation, chat templates and assistant masks, tokenization,
packing and collation.

Typical SFT flow::

    ds = load_records("train.jsonl")                       # validate, detect the format
    examples, report = encode_dataset(ds, tok, max_length=2048)
    print(report.summary())
    bins = best_fit_decreasing([len(e) for e in examples], capacity=2048)
    batch = packed_collate([[examples[i] for i in b] for b in bins[:8]], tok.pad_token_id,
                           row_length=2048)

Sequence-level methods (reward models, DPO family, KTO, tilt)::

    pairs, report = encode_pairs(load_records("prefs.jsonl"), tok, max_length=1024)
    batch = collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs],
                              tok.pad_token_id, packing=True, row_length=2048)
    # batch["sequence_ids"] says which sequence every token belongs to (-1 on padding)
"""

from .chat import check_tokenizer, has_generation_markers, render_conversation, render_prompt, render_turns
from .collate import collate_sequences, packed_collate, pad_collate
from .formats import FORMATS, ROLES, Dataset, detect_format, load_records, open_records, validate_record, write_jsonl
from .packing import PaddingStats, best_fit_decreasing, padding_stats
from .prefix import collate_shared_prefix, prediction_index
from .preference import (
    EncodedGroup,
    EncodedPair,
    EncodedUnpaired,
    GroupReport,
    PairReport,
    UnpairedReport,
    encode_pairs,
    encode_ranked,
    encode_unpaired,
    kl_partners,
)
from .tokenize import (
    IGNORE_INDEX,
    SFT_FORMATS,
    EncodedExample,
    EncodeReport,
    encode_dataset,
    encode_records,
    encode_sft_example,
    tokenize_prompt_and_output,
)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "ROLES",
    "SFT_FORMATS",
    "Dataset",
    "EncodeReport",
    "EncodedExample",
    "EncodedGroup",
    "EncodedPair",
    "EncodedUnpaired",
    "GroupReport",
    "PaddingStats",
    "PairReport",
    "UnpairedReport",
    "best_fit_decreasing",
    "check_tokenizer",
    "collate_sequences",
    "collate_shared_prefix",
    "prediction_index",
    "detect_format",
    "encode_dataset",
    "encode_records",
    "encode_pairs",
    "encode_ranked",
    "encode_sft_example",
    "encode_unpaired",
    "has_generation_markers",
    "kl_partners",
    "load_records",
    "open_records",
    "packed_collate",
    "pad_collate",
    "padding_stats",
    "render_conversation",
    "render_prompt",
    "render_turns",
    "tokenize_prompt_and_output",
    "validate_record",
    "write_jsonl",
]
