"""Turning records into token ids and labels.

Two conventions live here, on purpose kept apart:

* :func:`tokenize_prompt_and_output` follows a fixed external contract (pre-shifted
  ``input_ids``/``labels`` of length ``max_len - 1`` plus a float ``response_mask``).
* :func:`encode_sft_example` / :func:`encode_dataset` produce :class:`EncodedExample`
  in the Hugging Face convention used by the rest of posttrain: ``input_ids`` and
  ``labels`` of the same length, *unshifted*, ``labels[t] = input_ids[t]`` where token
  ``t`` is trained and ``-100`` elsewhere. The causal shift (logits ``[:, :-1]`` predict
  labels ``[:, 1:]``) happens in the loss.
"""

from __future__ import annotations

import os

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from posttrain.errors import ConfigError, DataError, where

from .chat import check_tokenizer, render_turns
from .formats import Dataset, empty_data_error, load_records, validate_record

IGNORE_INDEX = -100
SFT_FORMATS = ("conversational", "prompt_completion")


# --------------------------------------------------------------------------------------
# The fixed-contract helper
# --------------------------------------------------------------------------------------


def _shift_and_pad(
    prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]], eos_token_id: int
) -> dict[str, torch.Tensor]:
    """The padding / shifting rules of :func:`tokenize_prompt_and_output`, on token ids."""
    combined = [list(p) + list(o) for p, o in zip(prompt_ids, output_ids)]
    target_len = max(len(ids) for ids in combined) - 1
    input_rows, label_rows, mask_rows = [], [], []
    for ids, prompt in zip(combined, prompt_ids):
        inputs, labels = ids[:-1], ids[1:]
        pad = target_len - len(inputs)
        if pad > 0:
            inputs = inputs + [0] * (pad - 1) + [eos_token_id]
            labels = labels + [eos_token_id] * pad
        mask = [0.0] * target_len
        for j in range(len(prompt) - 1, min(len(ids) - 1, target_len)):
            mask[j] = 1.0
        input_rows.append(inputs)
        label_rows.append(labels)
        mask_rows.append(mask)
    return {
        "input_ids": torch.tensor(input_rows, dtype=torch.long),
        "labels": torch.tensor(label_rows, dtype=torch.long),
        "response_mask": torch.tensor(mask_rows, dtype=torch.float32),
    }


def tokenize_prompt_and_output(
    prompt_strs: list[str], output_strs: list[str], tokenizer
) -> dict[str, torch.Tensor]:
    """Tokenize prompt/output pairs into pre-shifted, padded training tensors.

    Each prompt is tokenized *with* the tokenizer's special tokens (e.g. BOS), each output
    *without*, and the two are concatenated. With ``L`` the longest concatenation:

    * ``input_ids`` ``(B, L - 1)``: the concatenation minus its last token; shorter rows are
      padded with zeros and their final position holds the EOS id
      (``[tokens..., 0, ..., 0, EOS]``; a row one short gets just ``[tokens..., EOS]``).
    * ``labels`` ``(B, L - 1)``: the concatenation minus its first token (already shifted:
      ``input_ids[t]`` predicts ``labels[t]``), padded with the EOS id.
    * ``response_mask`` ``(B, L - 1)`` float: 1.0 on the label positions holding output
      tokens (``prompt_len - 1`` up to the row's real length), 0.0 on prompt and padding.
    """
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"got {len(prompt_strs)} prompts but {len(output_strs)} outputs")
    if not prompt_strs:
        raise ValueError("tokenize_prompt_and_output needs at least one prompt/output pair")
    if tokenizer.eos_token_id is None:
        check_tokenizer(tokenizer, need_chat_template=False)  # raises the standard message
    prompts = tokenizer(list(prompt_strs), add_special_tokens=True)["input_ids"]
    outputs = tokenizer(list(output_strs), add_special_tokens=False)["input_ids"]
    return _shift_and_pad(prompts, outputs, tokenizer.eos_token_id)


# --------------------------------------------------------------------------------------
# SFT encoding
# --------------------------------------------------------------------------------------


@dataclass
class EncodedExample:
    """One tokenized training example (Hugging Face convention, unshifted).

    ``labels[t] == input_ids[t]`` where token ``t`` is trained, ``-100`` elsewhere;
    ``truncated`` says whether the over-long policy cut the end off.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) must have the same length"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trainable(self) -> int:
        """Number of trained tokens (labels other than -100)."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class EncodeReport:
    """What happened to each record during :func:`encode_dataset`."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_trainable_tokens: int = 0
    max_length: int | None = None
    overlong: str | None = None
    dropped_locations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"encoded {self.total} records: kept {self.kept} ({self.truncated} truncated to "
            f"max_length={self.max_length}), dropped {self.dropped_overlong} over-long "
            f"(policy '{self.overlong}') and {self.dropped_no_trainable_tokens} with no trainable "
            "token left"
        )
        if self.dropped_locations:
            shown = ", ".join(self.dropped_locations[:3])
            more = f" and {len(self.dropped_locations) - 3} more" if len(self.dropped_locations) > 3 else ""
            text += f" (dropped: {shown}{more})"
        return text


_KEPT, _DROP_OVERLONG, _DROP_EMPTY = "kept", "dropped_overlong", "dropped_no_trainable_tokens"


def _check_options(format: str, max_length: int, overlong: str, loss_on: str) -> None:
    if format not in SFT_FORMATS:
        raise DataError(
            f"SFT needs data in one of the formats {list(SFT_FORMATS)}, got '{format}'.",
            fix="convert the data (for preference data, train on 'prompt' + 'chosen' as "
            "prompt_completion), or use the method that matches this format.",
        )
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}.", fix="set max_length, e.g. 2048.")
    if overlong not in ("truncate", "drop"):
        raise ConfigError(f"overlong must be 'truncate' or 'drop', got {overlong!r}.", fix="pick one of the two.")
    if loss_on not in ("response", "all"):
        raise ConfigError(f"loss_on must be 'response' or 'all', got {loss_on!r}.", fix="pick one of the two.")


def _ids(tokenizer, text: str, *, special: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def _encode(
    record: dict,
    tokenizer,
    *,
    format: str,
    max_length: int,
    overlong: str,
    loss_on: str,
    source: str | None,
    location: str | None,
) -> tuple[EncodedExample | None, str]:
    if format == "conversational":
        ids, spans = render_turns(tokenizer, record["messages"], source=source, location=location,
                                  tools=record.get("tools"))
        labels = [IGNORE_INDEX] * len(ids)
        for _, start, end in spans:
            labels[start:end] = ids[start:end]
    elif isinstance(record["prompt"], str):
        check_tokenizer(tokenizer, need_chat_template=False)
        prompt = _ids(tokenizer, record["prompt"], special=True)
        completion = _ids(tokenizer, record["completion"], special=False)
        if not completion or completion[-1] != tokenizer.eos_token_id:
            completion.append(tokenizer.eos_token_id)
        ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
    else:
        n_prompt = len(record["prompt"])
        messages = list(record["prompt"]) + list(record["completion"])
        ids, spans = render_turns(tokenizer, messages, source=source, location=location)
        labels = [IGNORE_INDEX] * len(ids)
        for index, start, end in spans:
            if index >= n_prompt:  # assistant turns in the prompt are context, not trained
                labels[start:end] = ids[start:end]

    if loss_on == "all":
        labels = [IGNORE_INDEX] + ids[1:]

    truncated = False
    if len(ids) > max_length:
        if overlong == "drop":
            return None, _DROP_OVERLONG
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
    if all(x == IGNORE_INDEX for x in labels):
        return None, _DROP_EMPTY
    return EncodedExample(ids, labels, truncated), _KEPT


def encode_sft_example(
    record: dict,
    tokenizer,
    *,
    format: str,
    max_length: int,
    overlong: Literal["truncate", "drop"] = "truncate",
    loss_on: Literal["response", "all"] = "response",
    source: str | None = None,
    location: str | None = None,
) -> EncodedExample | None:
    """Tokenize one validated SFT record (see :func:`posttrain.data.formats.load_records`).

    * ``conversational``: the chat template renders the conversation (with the record's
      ``tools`` as ``tools=``, if any); every assistant turn (with its end-of-turn token, a
      tool-calling turn included) is trained, ``tool`` results are not.
    * ``prompt_completion`` with strings: prompt tokens with the tokenizer's special tokens
      (e.g. BOS), then the completion tokens and EOS; the completion and EOS are trained.
      (Prompt and completion are tokenized separately, so a word straddling the two is split
      at the boundary, as at generation time.)
    * ``prompt_completion`` with messages: the chat template renders prompt + completion;
      the completion's assistant turns are trained, assistant turns in the prompt are not.

    ``loss_on="all"`` trains every token except the first (which nothing predicts).

    Over-long examples (more than ``max_length`` tokens) are never cut silently:
    ``overlong="truncate"`` keeps the first ``max_length`` tokens (the prompt side, cutting
    the completion end) and ``overlong="drop"`` drops them. Returns ``None`` when the example
    is dropped, either by ``drop`` or because no trained token is left;
    :func:`encode_dataset` counts both. The record is validated first (DataError naming
    ``source``/``location`` and the field); those two arguments serve error messages only.
    """
    _check_options(format, max_length, overlong, loss_on)
    record = validate_record(record, format, source=source or "<in-memory data>", location=location)
    example, _ = _encode(
        record,
        tokenizer,
        format=format,
        max_length=max_length,
        overlong=overlong,
        loss_on=loss_on,
        source=source,
        location=location,
    )
    return example


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


_WORKER_TOKENIZER = None
#: records per task when tokenizing in worker processes
WORKER_CHUNK = 2000
#: below this many records, tokenizing in the main process is faster than starting workers
WORKER_MIN_RECORDS = 20000


def _encode_chunk(args):
    items, kw = args
    return [_encode(r, _WORKER_TOKENIZER, location=loc, format=fmt, **kw) for loc, r, fmt in items]


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encoded_outcomes(items, tokenizer, kw: dict, num_proc: int, progress: bool, total: int | None = None):
    """``(location, example or None, outcome)`` per ``(location, record, format)`` item, in order.

    Large inputs are tokenized in ``num_proc`` worker processes (spawned, each with one copy of
    the tokenizer; 0: up to 4 once there are :data:`WORKER_MIN_RECORDS` records), chunk by chunk
    with a bounded number of chunks in flight, so ``items`` may be a stream larger than memory."""
    import itertools

    from tqdm.auto import tqdm

    workers = num_proc if num_proc > 0 else min(4, os.cpu_count() or 1)
    threshold = WORKER_MIN_RECORDS if num_proc <= 0 else 2 * WORKER_CHUNK
    items = iter(items)
    head = list(itertools.islice(items, threshold)) if workers > 1 else []
    if workers <= 1 or len(head) < threshold:
        n = len(head) if workers > 1 else total
        bar = tqdm(total=n, desc="tokenizing", unit="rec", disable=not progress or (n is not None and n < 10000),
                   mininterval=1.0)
        for location, record, fmt in itertools.chain(head, items):
            yield (location, *_encode(record, tokenizer, location=location, format=fmt, **kw))
            bar.update(1)
        bar.close()
        return
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    bar = tqdm(total=total, desc=f"tokenizing ({workers} processes)", unit="rec", disable=not progress,
               mininterval=1.0)
    pending: deque = deque()
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(tokenizer,)) as pool:
        for chunk in _chunks(itertools.chain(head, items), WORKER_CHUNK):
            pending.append((chunk, pool.submit(_encode_chunk, (chunk, kw))))
            while len(pending) > 2 * workers:   # bounded: a few chunks per worker in flight
                yield from _finished(*pending.popleft(), bar)
        while pending:
            yield from _finished(*pending.popleft(), bar)
    bar.close()


def _finished(chunk, future, bar):
    done = future.result()
    bar.update(len(chunk))
    for (location, _, _), outcome in zip(chunk, done):
        yield (location, *outcome)


def encode_records(
    items,
    tokenizer,
    *,
    source: str,
    keep,
    max_length: int,
    overlong: Literal["truncate", "drop"] = "truncate",
    loss_on: Literal["response", "all"] = "response",
    num_proc: int = 1,
    progress: bool = False,
    total: int | None = None,
) -> EncodeReport:
    """Encode a stream of validated SFT records ``(location, record, format)`` (as
    :func:`posttrain.data.formats.open_records` yields them), calling ``keep(example)`` for
    every kept example in order; returns the report. Nothing is held but the chunks in flight.
    Raises :class:`DataError` if every record is dropped (the message says how to fix it)."""
    report = EncodeReport(max_length=max_length, overlong=overlong)
    kw = dict(max_length=max_length, overlong=overlong, loss_on=loss_on, source=source)
    checked: set = set()

    def checked_items():
        for location, record, fmt in items:
            needs_template = fmt == "conversational" or not isinstance(record.get("prompt"), str)
            if (fmt, needs_template) not in checked:   # once per kind of record, before its first encoding
                _check_options(fmt, max_length, overlong, loss_on)
                check_tokenizer(tokenizer, need_chat_template=needs_template)
                checked.add((fmt, needs_template))
            yield location, record, fmt

    for location, example, outcome in _encoded_outcomes(checked_items(), tokenizer, kw, num_proc, progress, total):
        report.total += 1
        if example is None:
            setattr(report, outcome, getattr(report, outcome) + 1)
            report.dropped_locations.append(location)
            continue
        report.kept += 1
        report.truncated += example.truncated
        keep(example)
    if not report.total:
        raise empty_data_error(source)
    if not report.kept:
        raise DataError(
            f"{where(source)}: every one of the {report.total} records was dropped "
            f"({report.dropped_overlong} longer than max_length={max_length} under overlong='{overlong}', "
            f"{report.dropped_no_trainable_tokens} whose prompt alone fills max_length).",
            fix=(f"shorten the prompts, or raise data.max_length (now {max_length}) if the model's position limit "
                 "allows." if overlong == "truncate" else
                 f"use data.overlong=truncate, shorten the data, or raise data.max_length (now {max_length}) if the "
                 "model's position limit allows."),
        )
    return report


def encode_dataset(
    dataset: Dataset | Sequence[dict],
    tokenizer,
    *,
    max_length: int,
    overlong: Literal["truncate", "drop"] = "truncate",
    loss_on: Literal["response", "all"] = "response",
    num_proc: int = 1,
    progress: bool = False,
) -> tuple[list[EncodedExample], EncodeReport]:
    """Encode every record of an SFT data set; returns the kept examples and a report.

    ``num_proc`` > 1 tokenizes in that many worker processes (0: up to 4 when there are at
    least :data:`WORKER_MIN_RECORDS` records); the result is identical. Raises
    :class:`DataError` if every record is dropped (the message says how to fix it).
    """
    if not isinstance(dataset, Dataset):
        dataset = load_records(dataset)
    examples: list[EncodedExample] = []   # encode_records checks the options and the tokenizer
    items = ((loc, r, dataset.format) for loc, r in zip(dataset.locations, dataset.records))
    report = encode_records(items, tokenizer, source=dataset.source, keep=examples.append, max_length=max_length,
                            overlong=overlong, loss_on=loss_on, num_proc=num_proc, progress=progress,
                            total=len(dataset))
    return examples, report
