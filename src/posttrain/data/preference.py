"""Encoding preference data: pairs (reward models, DPO and its variants), unpaired labels
(KTO) and scored K-sets (exponential tilt, ranking reward models).

Every response is encoded as ``prompt + response`` by :func:`posttrain.data.tokenize.encode_sft_example`
with format ``prompt_completion``, so chat templates, end-of-turn tokens and loss masks live
in one place: ``labels`` are -100 on the prompt and equal ``input_ids`` on the response
(string responses get the EOS token appended; message responses are rendered with the chat
template and trained with their end-of-turn token, assistant turns only).

The *prompt tokens* of an encoded response are everything before its first trained label.
Responses that are compared with each other (the two sides of a pair, the K responses of a
group) must have identical prompt tokens, or the loss would compare answers to two different
contexts; this is checked on the full (untruncated) encoding and a mismatch raises a
:class:`DataError` naming the record (it happens with chat templates that render the
conversation differently depending on the reply that follows).

Over-long responses follow the SFT rule (never cut silently): the full encoding is computed
first; with ``overlong="truncate"`` a response longer than ``max_length`` keeps its first
``max_length`` tokens (the end of the response is cut) and with ``overlong="drop"`` it is
dropped. A response left without a trained token is dropped. What that means for the unit
(a pair, a record, a group) is documented per function, and every truncation and drop is
counted in the returned report (``report.summary()`` is one line).

Data errors (wrong format, identical answers, mismatched prompt tokens, too few records) are
raised, never skipped; they name the file, the line / row / item and the field.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.errors import ConfigError, DataError, PosttrainError, TokenizerError, where

from .chat import check_tokenizer
from .formats import Dataset, load_records
from .tokenize import IGNORE_INDEX, EncodedExample, encode_sft_example

# Long enough that encode_sft_example never applies its own over-long policy: the full encoding
# is needed to check prompt tokens; the policy is applied here, with its outcome counted.
_NO_LIMIT = 1 << 62


# --------------------------------------------------------------------------------------
# Encoded units
# --------------------------------------------------------------------------------------


@dataclass
class EncodedPair:
    """A preference pair: both sides share identical prompt tokens.

    ``margin`` is the record's optional ``"margin"`` as a float (``None`` when absent).
    """

    chosen: EncodedExample
    rejected: EncodedExample
    margin: float | None = None


@dataclass
class EncodedUnpaired:
    """A KTO example: ``example`` (the record's prompt + completion) with its label, and
    ``kl_example``: the same prompt followed by *another* record's completion (a mismatched
    pair from which KTO estimates its KL baseline)."""

    example: EncodedExample
    desirable: bool
    kl_example: EncodedExample


@dataclass
class EncodedGroup:
    """The kept responses of one prompt (all with identical prompt tokens) and their rewards,
    aligned: ``rewards[k]`` scores ``responses[k]``."""

    responses: list[EncodedExample]
    rewards: list[float]


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------


def _dropped_text(locations: list[str]) -> str:
    if not locations:
        return ""
    shown = ", ".join(locations[:3])
    more = f" and {len(locations) - 3} more" if len(locations) > 3 else ""
    return f" (dropped: {shown}{more})"


@dataclass
class PairReport:
    """What happened to each record during :func:`encode_pairs`.

    ``truncated`` counts kept pairs with at least one side truncated;
    ``truncated_chosen`` / ``truncated_rejected`` count the truncated sides.
    """

    total: int = 0
    kept: int = 0
    truncated: int = 0
    truncated_chosen: int = 0
    truncated_rejected: int = 0
    dropped_overlong: int = 0
    dropped_no_trainable_tokens: int = 0
    dropped_identical_after_truncation: int = 0
    max_length: int | None = None
    overlong: str | None = None
    dropped_locations: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.dropped_overlong + self.dropped_no_trainable_tokens + self.dropped_identical_after_truncation

    def summary(self) -> str:
        return (
            f"encoded {self.total} preference pairs: kept {self.kept} ({self.truncated} with a side "
            f"truncated to max_length={self.max_length}: {self.truncated_chosen} chosen, "
            f"{self.truncated_rejected} rejected), dropped {self.dropped} ({self.dropped_overlong} "
            f"over-long under policy '{self.overlong}', {self.dropped_no_trainable_tokens} with a side "
            f"left without a trainable token, {self.dropped_identical_after_truncation} identical after "
            f"truncation)" + _dropped_text(self.dropped_locations)
        )


@dataclass
class UnpairedReport:
    """What happened to each record during :func:`encode_unpaired`.

    ``desirable`` / ``undesirable`` count the kept records by label; ``kl_truncated`` counts
    KL examples cut to ``max_length`` (always truncated, whatever ``overlong`` says: see
    :func:`encode_unpaired`).
    """

    total: int = 0
    kept: int = 0
    desirable: int = 0
    undesirable: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_trainable_tokens: int = 0
    kl_truncated: int = 0
    max_length: int | None = None
    overlong: str | None = None
    seed: int | None = None
    dropped_locations: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.dropped_overlong + self.dropped_no_trainable_tokens

    def summary(self) -> str:
        return (
            f"encoded {self.total} unpaired records: kept {self.kept} ({self.desirable} desirable, "
            f"{self.undesirable} undesirable; {self.truncated} truncated to max_length={self.max_length}), "
            f"dropped {self.dropped} ({self.dropped_overlong} over-long under policy '{self.overlong}', "
            f"{self.dropped_no_trainable_tokens} with no trainable token left); KL examples from "
            f"mismatched completions (seed {self.seed}): {self.kl_truncated} truncated"
            + _dropped_text(self.dropped_locations)
        )


@dataclass
class GroupReport:
    """What happened to each record (group) and response during :func:`encode_ranked`.

    ``responses_truncated`` counts truncated responses of kept groups; the response drops
    count every group's responses.
    """

    total: int = 0
    kept: int = 0
    responses_total: int = 0
    responses_kept: int = 0
    responses_truncated: int = 0
    responses_dropped_overlong: int = 0
    responses_dropped_no_trainable_tokens: int = 0
    dropped_too_few_responses: int = 0
    max_length: int | None = None
    overlong: str | None = None
    dropped_locations: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.dropped_too_few_responses

    def summary(self) -> str:
        return (
            f"encoded {self.total} ranked groups ({self.responses_total} responses): kept {self.kept} "
            f"groups with {self.responses_kept} responses ({self.responses_truncated} truncated to "
            f"max_length={self.max_length}; dropped {self.responses_dropped_overlong} over-long under "
            f"policy '{self.overlong}' and {self.responses_dropped_no_trainable_tokens} with no trainable "
            f"token left), dropped {self.dropped_too_few_responses} groups left with fewer than 2 responses"
            + _dropped_text(self.dropped_locations)
        )


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------

_HINTS = {
    ("preference", "conversational"): (
        "'messages' records are single conversations, not preference pairs (there is no rejected "
        "answer to compare with).",
        "give each record 'prompt', 'chosen' and 'rejected' (or 'chosen' and 'rejected' as whole "
        "conversations sharing the prompt turns); train on 'messages' data with SFT.",
    ),
    ("preference", "prompt_completion"): (
        "prompt/completion records have a single answer, not a pair.",
        "add the second answer as 'chosen'/'rejected', or use labelled 'unpaired' data (KTO).",
    ),
    ("preference", "unpaired"): (
        "unpaired records carry one labelled answer, not a pair.",
        "use a method for unpaired data (KTO), or join records into 'chosen'/'rejected' pairs.",
    ),
    ("preference", "ranked"): (
        "ranked records hold K scored responses, not one chosen/rejected pair.",
        "use a method for ranked data, or turn each group into pairs (e.g. best vs worst) when "
        "writing the file.",
    ),
    ("unpaired", "preference"): (
        "preference records are pairs, not labelled single answers.",
        "use a pairwise method, or split every pair into a desirable record (prompt + chosen, "
        "\"label\": true) and an undesirable one (prompt + rejected, \"label\": false).",
    ),
    ("ranked", "preference"): (
        "preference records hold one chosen/rejected pair, not scored responses.",
        "use a pairwise method, or write each record as {\"prompt\", \"responses\": [chosen, "
        "rejected], \"rewards\": [1, 0]}.",
    ),
}


def _load(dataset: Dataset | Iterable[dict] | str, fmt: str, func: str) -> Dataset:
    if not isinstance(dataset, Dataset):
        dataset = load_records(dataset)
    if dataset.format != fmt:
        problem, fix = _HINTS.get(
            (fmt, dataset.format),
            (f"{func} needs format '{fmt}'.", f"convert the data to the '{fmt}' format (see posttrain.data.formats)."),
        )
        raise DataError(
            f"{where(dataset.source)}: {func} needs records in the '{fmt}' format, but this data set is "
            f"'{dataset.format}': {problem}",
            fix=fix,
        )
    return dataset


def _check_options(max_length: int, overlong: str) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}.", fix="set max_length, e.g. 2048.")
    if overlong not in ("truncate", "drop"):
        raise ConfigError(f"overlong must be 'truncate' or 'drop', got {overlong!r}.", fix="pick one of the two.")


def _check_tokenizer(tokenizer, dataset: Dataset) -> None:
    check_tokenizer(tokenizer, need_chat_template=any(not isinstance(r["prompt"], str) for r in dataset.records))


def _encode_full(tokenizer, prompt: Any, response: Any, ds: Dataset, index: int, field_name: str) -> EncodedExample:
    """prompt + response, untruncated, through the one SFT encoder; errors name the field."""
    location = ds.locations[index]
    try:
        example = encode_sft_example(
            {"prompt": prompt, "completion": response},
            tokenizer,
            format="prompt_completion",
            max_length=_NO_LIMIT,
            overlong="truncate",
            source=ds.source,
            location=location,
        )
    except PosttrainError as exc:
        raise type(exc)(f"{exc.problem} (while encoding '{field_name}')", fix=exc.fix) from None
    if example is None:  # validated data always has a trained token; guard against odd templates
        raise TokenizerError(
            f"{ds.where(index, field_name)}: the encoded response has no trained token (the chat "
            "template renders it as nothing).",
            fix="check the chat template's assistant turn, or remove this record.",
        )
    return example


def _prompt_tokens(example: EncodedExample) -> list[int]:
    """The tokens before the first trained label."""
    for t, label in enumerate(example.labels):
        if label != IGNORE_INDEX:
            return example.input_ids[:t]
    return list(example.input_ids)


def _check_same_prompt(
    tokenizer, ds: Dataset, index: int, a: EncodedExample, b: EncodedExample, name_a: str, name_b: str
) -> None:
    pa, pb = _prompt_tokens(a), _prompt_tokens(b)
    if pa == pb:
        return
    k = next((t for t, (x, y) in enumerate(zip(pa, pb)) if x != y), min(len(pa), len(pb)))

    def show(ids: list[int]) -> str:
        return repr(tokenizer.decode(ids[k : k + 12])) if k < len(ids) else "(end of prompt)"

    raise DataError(
        f"{ds.where(index, 'prompt')}: the prompt encodes to different tokens before '{name_a}' "
        f"({len(pa)} tokens) and before '{name_b}' ({len(pb)} tokens); they first differ at prompt "
        f"token {k}: {show(pa)} vs {show(pb)}. The loss compares answers to the same prompt, so both "
        "must follow identical prompt tokens (this happens when the chat template renders the "
        "conversation differently depending on the reply that follows it).",
        fix="use a chat template whose rendering of the conversation so far does not depend on the "
        "reply (no content that depends on the last message or the number of turns), or make the "
        "answers comparable (e.g. both a single assistant turn).",
    )


def _apply_policy(example: EncodedExample, max_length: int, overlong: str) -> tuple[EncodedExample | None, str]:
    """The SFT over-long policy on a full encoding: 'kept' | 'truncated' | 'overlong' | 'empty'."""
    if len(example) <= max_length:
        return example, "kept"
    if overlong == "drop":
        return None, "overlong"
    ids, labels = example.input_ids[:max_length], example.labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        return None, "empty"
    return EncodedExample(ids, labels, truncated=True), "truncated"


def _all_dropped(ds: Dataset, what: str, report, max_length: int, overlong: str) -> DataError:
    """Every unit was dropped: say why (the report's counts) and what changes that."""
    if overlong == "truncate":
        fix = ("shorten the prompts, or raise data.max_length (now {m}) if the model's position limit allows: "
               "truncation keeps the start of each sequence, so a prompt that fills max_length leaves no response, "
               "and responses that differ only after the cut become identical.").format(m=max_length)
    else:
        fix = (f"use data.overlong=truncate, shorten the data, or raise data.max_length (now {max_length}) if the "
               "model's position limit allows.")
    return DataError(f"{where(ds.source)}: every one of the {report.total} {what} was dropped: {report.summary()}.",
                     fix=fix)


# --------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------


def encode_pairs(
    dataset: Dataset | Sequence[dict] | str,
    tokenizer,
    *,
    max_length: int,
    overlong: Literal["truncate", "drop"] = "truncate",
) -> tuple[list[EncodedPair], PairReport]:
    """Encode ``preference`` records (``prompt`` / ``chosen`` / ``rejected``, implicit prompts
    made explicit by :func:`~posttrain.data.formats.load_records`) into pairs.

    Each side is ``prompt + answer`` (labels -100 on the prompt). Per pair:

    * The prompt tokens of both sides must be identical, else :class:`DataError`.
    * Both sides encoding to the same token ids (e.g. answers that differ only in whitespace a
      template trims) is a :class:`DataError`: the pair carries no preference.
    * ``overlong="truncate"``: a side longer than ``max_length`` keeps its first
      ``max_length`` tokens (counted per side); the pair is dropped if a side has no trained
      token left, or if both sides become identical (both counted).
    * ``overlong="drop"``: the pair is dropped if either side is longer than ``max_length``.

    ``dataset`` is a :class:`Dataset` or anything :func:`load_records` reads. Raises
    :class:`DataError` for data in another format (conversational ``messages`` data is not a
    pair) and when every pair is dropped.
    """
    _check_options(max_length, overlong)
    ds = _load(dataset, "preference", "encode_pairs")
    _check_tokenizer(tokenizer, ds)
    report = PairReport(max_length=max_length, overlong=overlong)
    pairs: list[EncodedPair] = []
    for i, record in enumerate(ds.records):
        report.total += 1
        full_c = _encode_full(tokenizer, record["prompt"], record["chosen"], ds, i, "chosen")
        full_r = _encode_full(tokenizer, record["prompt"], record["rejected"], ds, i, "rejected")
        _check_same_prompt(tokenizer, ds, i, full_c, full_r, "chosen", "rejected")
        if full_c.input_ids == full_r.input_ids:
            raise DataError(
                f"{ds.where(i, 'rejected')}: 'chosen' and 'rejected' differ as text but encode to the same "
                f"{len(full_c)} token ids (the chat template or tokenizer normalizes the difference away, "
                "e.g. by trimming whitespace), so the pair carries no preference.",
                fix="remove this record, or fix the pair so that the answers differ in content.",
            )
        chosen, why_c = _apply_policy(full_c, max_length, overlong)
        rejected, why_r = _apply_policy(full_r, max_length, overlong)
        if chosen is None or rejected is None:
            if "overlong" in (why_c, why_r):
                report.dropped_overlong += 1
            else:
                report.dropped_no_trainable_tokens += 1
            report.dropped_locations.append(ds.locations[i])
            continue
        if chosen.input_ids == rejected.input_ids:
            report.dropped_identical_after_truncation += 1
            report.dropped_locations.append(ds.locations[i])
            continue
        report.kept += 1
        report.truncated += chosen.truncated or rejected.truncated
        report.truncated_chosen += chosen.truncated
        report.truncated_rejected += rejected.truncated
        margin = record.get("margin")
        pairs.append(EncodedPair(chosen, rejected, None if margin is None else float(margin)))
    if not pairs:
        raise _all_dropped(ds, "pairs", report, max_length, overlong)
    return pairs, report


# --------------------------------------------------------------------------------------
# Unpaired (KTO)
# --------------------------------------------------------------------------------------


def kl_partners(dataset: Dataset, *, seed: int = 0) -> list[int]:
    """The fixed, seeded derangement used for KTO's KL examples: ``partners[i] != i`` is the
    record whose completion follows record ``i``'s prompt.

    Records are split by kind (string prompt/completion vs message lists, which cannot be
    mixed in one sequence); within each kind (in order of first appearance) the indices are
    shuffled with ``random.Random(f"posttrain-kl-{seed}")`` and each record is paired with the
    next one in that shuffled cycle, so no record gets its own completion, every completion is
    used exactly once, and the result depends only on the kinds of the records and ``seed``.

    Raises :class:`DataError` with fewer than 2 records, or when a kind has a single record.
    """
    n = len(dataset.records)
    if n < 2:
        raise DataError(
            f"{where(dataset.source)}: KTO needs at least 2 records, found {n}: its KL baseline pairs each "
            "prompt with another record's completion.",
            fix="add more records.",
        )
    kinds: dict[bool, list[int]] = {}
    for i, record in enumerate(dataset.records):
        kinds.setdefault(isinstance(record["prompt"], str), []).append(i)
    if len(kinds) > 1:
        for is_str, members in kinds.items():
            if len(members) == 1:
                this, other = ("strings", "message lists") if is_str else ("message lists", "strings")
                raise DataError(
                    f"{dataset.where(members[0], 'completion')}: this is the only record whose prompt and "
                    f"completion are {this} (the other {n - 1} are {other}); KTO's KL baseline pairs every "
                    "prompt with another record's completion of the same kind, and there is none.",
                    fix="write every record in one kind (for example, strings as [{\"role\": \"user\", ...}] "
                    "prompts and [{\"role\": \"assistant\", ...}] completions), or add records of this kind.",
                )
    rng = random.Random(f"posttrain-kl-{seed}")
    partners = [-1] * n
    for members in kinds.values():
        cycle = list(members)
        rng.shuffle(cycle)
        for k, i in enumerate(cycle):
            partners[i] = cycle[(k + 1) % len(cycle)]
    return partners


def encode_unpaired(
    dataset: Dataset | Sequence[dict] | str,
    tokenizer,
    *,
    max_length: int,
    overlong: Literal["truncate", "drop"] = "truncate",
    seed: int = 0,
) -> tuple[list[EncodedUnpaired], UnpairedReport]:
    """Encode ``unpaired`` records (``prompt`` / ``completion`` / boolean ``label``) for KTO.

    ``example`` follows the over-long policy like SFT (truncated or dropped, counted).
    ``kl_example`` is the record's prompt followed by the completion of record
    ``kl_partners(dataset, seed=seed)[i]`` (never its own), encoded by the same encoder. It
    only feeds KTO's KL *baseline* estimate (a statistic over the batch, without gradient in
    KTO), so it is always truncated to ``max_length`` when longer (counted as
    ``kl_truncated``) rather than dropping a record because of another record's length.
    Partners are assigned over all records, dropped ones included, so the pairing does not
    depend on ``max_length``.

    Labels must be JSON booleans; strings such as ``"desirable"`` and numbers such as ``1``
    are refused by validation (:class:`DataError` naming the line and ``label``).
    """
    _check_options(max_length, overlong)
    ds = _load(dataset, "unpaired", "encode_unpaired")
    for i, record in enumerate(ds.records):  # also for hand-built Dataset objects
        if not isinstance(record["label"], bool):
            raise DataError(
                f"{ds.where(i, 'label')}: expected true or false, found {record['label']!r}.",
                fix="write the label as the JSON literal true (desirable) or false (undesirable); "
                "strings such as \"desirable\"/\"undesirable\" and numbers such as 1 are not accepted.",
            )
    _check_tokenizer(tokenizer, ds)
    partners = kl_partners(ds, seed=seed)
    report = UnpairedReport(max_length=max_length, overlong=overlong, seed=seed)
    out: list[EncodedUnpaired] = []
    for i, record in enumerate(ds.records):
        report.total += 1
        full = _encode_full(tokenizer, record["prompt"], record["completion"], ds, i, "completion")
        example, why = _apply_policy(full, max_length, overlong)
        if example is None:
            if why == "overlong":
                report.dropped_overlong += 1
            else:
                report.dropped_no_trainable_tokens += 1
            report.dropped_locations.append(ds.locations[i])
            continue
        j = partners[i]
        kl_full = _encode_full(
            tokenizer, record["prompt"], ds.records[j]["completion"], ds, i, f"completion of {ds.locations[j]}, as KL example"
        )
        kl_example, _ = _apply_policy(kl_full, max_length, "truncate")
        if kl_example is None:  # the prompt alone fills max_length; then so it does for `example`
            report.dropped_no_trainable_tokens += 1
            report.dropped_locations.append(ds.locations[i])
            continue
        report.kl_truncated += kl_example.truncated
        report.kept += 1
        report.truncated += example.truncated
        if record["label"]:
            report.desirable += 1
        else:
            report.undesirable += 1
        out.append(EncodedUnpaired(example, record["label"], kl_example))
    if not out:
        raise _all_dropped(ds, "records", report, max_length, overlong)
    return out, report


# --------------------------------------------------------------------------------------
# Ranked groups
# --------------------------------------------------------------------------------------


def encode_ranked(
    dataset: Dataset | Sequence[dict] | str,
    tokenizer,
    *,
    max_length: int,
    overlong: Literal["truncate", "drop"] = "truncate",
) -> tuple[list[EncodedGroup], GroupReport]:
    """Encode ``ranked`` records (``prompt`` / ``responses`` / ``rewards``) into groups.

    All responses of a record must have identical prompt tokens (:class:`DataError`
    otherwise). Each response follows the over-long policy on its own (truncated, or
    dropped when over-long under ``drop`` or left without a trained token; all counted), its
    reward dropping with it; a group left with fewer than 2 responses is dropped and counted.
    Identical responses are kept (a sampled K-set may repeat an answer).
    """
    _check_options(max_length, overlong)
    ds = _load(dataset, "ranked", "encode_ranked")
    _check_tokenizer(tokenizer, ds)
    report = GroupReport(max_length=max_length, overlong=overlong)
    groups: list[EncodedGroup] = []
    for i, record in enumerate(ds.records):
        report.total += 1
        fulls = [
            _encode_full(tokenizer, record["prompt"], response, ds, i, f"responses[{k}]")
            for k, response in enumerate(record["responses"])
        ]
        for k in range(1, len(fulls)):
            _check_same_prompt(tokenizer, ds, i, fulls[0], fulls[k], "responses[0]", f"responses[{k}]")
        responses, rewards = [], []
        for full, reward in zip(fulls, record["rewards"]):
            report.responses_total += 1
            example, why = _apply_policy(full, max_length, overlong)
            if example is None:
                if why == "overlong":
                    report.responses_dropped_overlong += 1
                else:
                    report.responses_dropped_no_trainable_tokens += 1
                continue
            responses.append(example)
            rewards.append(float(reward))
        if len(responses) < 2:
            report.dropped_too_few_responses += 1
            report.dropped_locations.append(ds.locations[i])
            continue
        report.kept += 1
        report.responses_kept += len(responses)
        report.responses_truncated += sum(e.truncated for e in responses)
        groups.append(EncodedGroup(responses, rewards))
    if not groups:
        raise _all_dropped(ds, "groups", report, max_length, overlong)
    return groups, report
