"""Supervised fine-tuning.

    loss = - sum_t m_t log p(x_t | x_<t) / N          (N = kept tokens of the whole optimizer step)

with ``m_t = 1`` on assistant tokens (every assistant turn of a conversation, including its
end-of-turn token) or on the completion of prompt/completion data. Packing puts several
examples in one row with position ids restarting at each document, so attention never
crosses documents and the loss equals the padded loss (tested).

From Python::

    from posttrain.algorithms.sft import SFTConfig, run_sft
    cfg = SFTConfig()                       # the tiny world's defaults
    cfg.train.output_dir = "runs/my-sft"
    result = run_sft(cfg)

From the shell: ``posttrain sft --config cfg.yaml train.lr=1e-4``.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.fields import FIELDS_HELP
from ..config import ModelConfig, TrainConfig, option, unused_notes, validated
from ..data import (
    SFT_FORMATS,
    EncodedExample,
    best_fit_decreasing,
    encode_dataset,
    packed_collate,
    pad_collate,
    padding_stats,
)
from ..errors import ConfigError
from ..models.loading import prepare_policy, read_paths
from ..models.peft import apply_peft
from ..models.logprobs import shift_labels, token_log_probs_from_model
from ..ops import masked_sum, sft_loss
from ..train.engine import FitResult, fit, to_device
from ..train.plan import StepPlan, hold_out
from ..train.rundir import check_output_dir
from ..world.sources import HELDOUT, check_source, is_builtin, load_source, split_builtin

BUILTIN_DATA = "builtin:world-sft"
#: the tiny world's AI-feedback roles (posttrain cai): a judge and a critique/revision model


@dataclass
class SFTDataConfig:
    """Training / evaluation data and how it is tokenized and batched."""

    train: str = option(BUILTIN_DATA, "JSONL/Parquet file of conversational or prompt/completion records, "
                                      "or builtin:world-sft (tiny-world problems); builtin:world-tool-sft (the same with "
                                      "calculator calls); builtin:world-judge(-reasoning) / "
                                      "builtin:world-revise train the world's judge / reviser for posttrain cai.")
    eval: str | None = option("auto", "Held-out file for eval loss, or builtin:world-sft-heldout; auto: the "
                              "world's held-out set when train is builtin:world-sft, else none (then "
                              "eval_fraction applies); null: eval_fraction of train.")
    fields: dict | str | None = option(None, FIELDS_HELP)
    eval_fraction: float = option(0.0, "Fraction of train held out for eval when data.eval is null.",
                                  min=0.0, max=0.5)
    format: str = option("auto", "auto, conversational or prompt_completion.",
                         choices=("auto", "conversational", "prompt_completion"))
    max_length: int = option(512, "Tokens per example (and per packed row).", min=8)
    overlong: str = option("truncate", "Over-long examples: truncate the completion side, or drop them "
                                       "(counts are reported either way).", choices=("truncate", "drop"))
    loss_on: str = option("response", "response: assistant turns / completion only; all: every token.",
                          choices=("response", "all"))
    packing: bool = option(True, "Pack examples into rows of max_length (no cross-document attention).")
    cache: bool = option(True, "Cache tokenized data files (keyed by the file's content, the tokenizer and these "
                               "settings) so a second run skips reading and tokenizing; see posttrain.data.cache.")
    cache_dir: str | None = option(None, "Tokenization cache directory (default $POSTTRAIN_CACHE/tokenized or "
                                         "~/.cache/posttrain/tokenized).")
    num_proc: int = option(0, "Worker processes for tokenizing (0: up to 4 for files of 20k+ records; 1: none).",
                           min=0, max=256)
    world_examples: int = option(4000, "Examples generated for builtin:world-sft.", min=1, max=1_000_000)
    world_eval_examples: int = option(200, "Examples generated for the builtin *-heldout sets.", min=1, max=1_000_000)
    world_tool_fraction: float = option(0.5, "Share of builtin:world-tool-sft problems solved with calculator calls "
                                             "(the others: a worked solution).", min=0.0, max=1.0)
    max_examples: int = option(0, "Use only the first N training records (0: all).", min=0)


@dataclass
class SFTLossConfig:
    """How the masked NLL is normalized."""

    normalization: str = option("tokens", "tokens: divide by the step's kept tokens; sum: no division; "
                                          "constant: divide by normalize_constant.",
                                choices=("tokens", "sum", "constant"))
    normalize_constant: float | None = option(None, "Divisor for normalization=constant.", gt=0.0)

    def validate(self) -> None:
        if self.normalization == "constant" and not self.normalize_constant:
            raise ConfigError("loss.normalization is 'constant' but loss.normalize_constant is not set.",
                              fix="set loss.normalize_constant to a positive number (e.g. the max length).")
        if self.normalization != "constant" and self.normalize_constant is not None:
            raise ConfigError(f"loss.normalize_constant is set, but loss.normalization is '{self.normalization}', "
                              "which does not use it.", fix="set loss.normalization=constant, or remove "
                              "loss.normalize_constant.")


@dataclass
class SFTConfig:
    """posttrain sft: supervised fine-tuning."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    loss: SFTLossConfig = field(default_factory=SFTLossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, micro_batch_size=4, epochs=1.0))


# --------------------------------------------------------------------------- the loss


@dataclass
class SFTAlgorithm:
    """Masked NLL over the trained tokens; metrics: mean response entropy, NLL."""

    normalization: str = "tokens"
    normalize_constant: float | None = None

    def counts(self, batch: dict) -> dict[str, int]:
        return {
            "tokens": int((batch["labels"][:, 1:] != -100).sum()),
            "sequences": int(batch["num_sequences"]),
            "input_tokens": int(batch["num_input_tokens"]),
        }

    def loss(self, model, batch: dict, totals: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = shift_labels(batch["labels"])
        out = token_log_probs_from_model(
            model, batch["input_ids"], targets, attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"), return_entropy=True,
        )
        mask = (targets != -100).float()
        loss, _ = sft_loss(out["log_probs"], mask, normalization=self.normalization,
                           normalize_constant=self.normalize_constant, num_tokens=totals["tokens"])
        n = totals["tokens"].clamp(min=1)
        metrics = {
            "nll": masked_sum(-out["log_probs"].detach(), mask) / n,
            "entropy": masked_sum(out["entropy"].detach(), mask) / n,
        }
        return loss, metrics


# --------------------------------------------------------------------------- batching plan


def collate_sft(examples: list[EncodedExample] | list[list[EncodedExample]], *, packing: bool,
             pad_token_id: int, row_length: int) -> dict:
    if packing:
        batch = packed_collate(examples, pad_token_id, row_length=row_length)
        batch["num_sequences"] = sum(len(r) for r in examples)
        batch["num_input_tokens"] = sum(len(e) for r in examples for e in r)
    else:
        batch = pad_collate(examples, pad_token_id)
        batch["num_sequences"] = len(examples)
        batch["num_input_tokens"] = sum(len(e) for e in examples)
    batch.pop("cu_seqlens", None)
    batch.pop("num_docs", None)
    return batch


class SFTPlan(StepPlan):
    """The SFT plan: per epoch the examples are shuffled; with packing they are packed
    best-fit-decreasing into rows of ``row_length`` and the rows shuffled; micro-batches hold
    ``micro_batch_size`` rows (or examples). See :class:`posttrain.train.plan.StepPlan`."""

    def __init__(self, examples: list[EncodedExample], *, micro_batch_size: int, grad_accum: int,
                 epochs: float, max_steps: int, packing: bool, row_length: int, pad_token_id: int,
                 seed: int, rank: int | None = None, world: int | None = None):
        self.examples = examples

        def epoch_units(epoch: int, rng: random.Random) -> list:
            order = list(range(len(examples)))
            rng.shuffle(order)
            if not packing:
                return order
            bins = best_fit_decreasing([len(examples[i]) for i in order], row_length)
            rows = [[order[j] for j in b] for b in bins]
            rng.shuffle(rows)
            return rows

        def collate(mb: list) -> dict:
            items = [[examples[i] for i in row] for row in mb] if packing else [examples[i] for i in mb]
            return collate_sft(items, packing=packing, pad_token_id=pad_token_id, row_length=row_length)

        super().__init__(n_items=len(examples), epoch_units=epoch_units, collate=collate,
                         content=lambda: ([e.input_ids, e.labels] for e in examples),
                         micro_batch_size=micro_batch_size, grad_accum=grad_accum, epochs=epochs,
                         max_steps=max_steps, seed=seed, tag="sft", extra=[packing, row_length], rank=rank,
                         world=world)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def eval_loss(model, algorithm: SFTAlgorithm, examples: list[EncodedExample], *, pad_token_id: int,
              batch_size: int = 16) -> dict[str, float]:
    """Token-mean NLL and mean response entropy of ``model`` over ``examples`` (padded batches)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll = ent = 0.0
    n = 0
    for i in range(0, len(examples), batch_size):
        batch = collate_sft(examples[i : i + batch_size], packing=False, pad_token_id=pad_token_id, row_length=0)
        batch = to_device(batch, device)
        targets = shift_labels(batch["labels"])
        out = token_log_probs_from_model(model, batch["input_ids"], targets,
                                         attention_mask=batch["attention_mask"], return_entropy=True)
        mask = (targets != -100).float()
        nll += float(masked_sum(-out["log_probs"], mask))
        ent += float(masked_sum(out["entropy"], mask))
        n += int(mask.sum())
    model.train(was_training)
    return {"loss": nll / max(n, 1), "entropy": ent / max(n, 1), "tokens": n}


# --------------------------------------------------------------------------- data sources


def load_sft_source(spec: str, cfg: SFTDataConfig, seed: int, key: str = "data.train"):
    ds = load_source(spec, cfg, kinds=("sft",), seed=seed, key=key, what="SFT data", format=cfg.format)
    if ds.format not in SFT_FORMATS:
        raise _not_sft(key, ds.source, ds.format)
    return ds


def _not_sft(key: str, source: str, fmt: str) -> ConfigError:
    return ConfigError(f"SFT trains on conversational or prompt/completion records, but {key} ({source}) holds {fmt} "
                       "records.", fix=f"give {key} a file of {' or '.join(SFT_FORMATS)} records "
                       "(preference pairs train with `posttrain dpo` / `rm`).")


def encode_sft_source(spec: str, data: SFTDataConfig, seed: int, tokenizer, encode_kw: dict, *, log,
                      progress: bool = False, key: str = "data.train"):
    """Load, validate and tokenize an SFT source through the tokenization cache (files only:
    built-in data is generated, not read). Returns ``(examples, report, from_cache)``."""
    from ..data.cache import EntryWriter, cache_location, cached
    from ..data.formats import open_records
    from ..data.tokenize import encode_records

    check_source(spec, data, kinds=("sft",), key=key)
    directory, parts = cache_location(spec, data, tokenizer, {"kind": "sft", "format": data.format, **encode_kw})

    def build():
        ds = load_sft_source(spec, data, seed, key=key)
        return encode_dataset(ds, tokenizer, **encode_kw, num_proc=data.num_proc, progress=progress)

    def stream(entry):
        """The first pass over a file, streamed: records are read, validated and tokenized chunk
        by chunk and their tokens appended to the entry on disk; no record list is built."""
        source, records = open_records(spec, data.format, fields=data.fields)
        writer = EntryWriter(entry)
        try:
            report = encode_records(_sft_only(records, source, key), tokenizer, source=source, keep=writer.add,
                                    **encode_kw, num_proc=data.num_proc, progress=progress)
            writer.finish(report, parts)
        except BaseException:
            writer.abort()
            raise

    return cached(directory, parts, build, log=log, stream=stream)


def _sft_only(records, source: str, key: str):
    for location, record, fmt in records:
        if fmt not in SFT_FORMATS:
            raise _not_sft(key, source, fmt)
        yield location, record, fmt


# --------------------------------------------------------------------------- entry point


@dataclass
class SFTResult:
    fit: FitResult
    output_dir: Path
    final_dir: Path | None
    encode_summary: str
    padding_summary: str
    eval_metrics: dict = dataclasses.field(default_factory=dict)


def run_sft(cfg: SFTConfig, *, model=None, tokenizer=None, log=print, extra_eval=None,
            eval_times: int | None = None, algorithm=None, inputs: dict | None = None,
            plan_hook=None) -> SFTResult:
    """Run SFT as configured; ``model`` / ``tokenizer`` may be passed in to skip loading.

    ``extra_eval(model) -> dict`` adds metrics to every evaluation (the quickstart uses it for
    held-out accuracy); ``eval_times`` spreads that many evaluations evenly over the run
    (overriding ``train.eval_every``). ``algorithm`` replaces the masked NLL with another
    per-token loss over the same batches (token-level distillation; its config class is then
    ``type(cfg)``), and ``inputs`` names what the run reads but does not checkpoint (a teacher).
    ``plan_hook(plan, model, tokenizer) -> plan`` may replace the batches (on-policy distillation
    samples the completions of a step's prompts from the model being trained).
    """
    cfg = validated(cfg, SFTConfig if algorithm is None else type(cfg))
    log = log or (lambda line: None)
    check_output_dir(cfg.train.output_dir, resume=cfg.train.resume, overwrite=cfg.train.overwrite_output_dir,
                     protect=read_paths(cfg.model))
    accelerator, tokenizer, model = prepare_policy(cfg, model=model, tokenizer=tokenizer,
                                                  max_length=cfg.data.max_length)
    model = apply_peft(model, cfg.model.peft, log=log)
    eval_examples: list[EncodedExample] = []
    encode_kw = dict(max_length=cfg.data.max_length, overlong=cfg.data.overlong, loss_on=cfg.data.loss_on)
    progress = cfg.train.progress
    train_examples, report, hit = encode_sft_source(cfg.data.train, cfg.data, cfg.train.seed, tokenizer, encode_kw,
                                                    log=log, progress=progress)
    if cfg.data.max_examples:
        train_examples = train_examples[: cfg.data.max_examples]
    log(f"train data {cfg.data.train}: {report.summary()}" + (" (from the tokenization cache)" if hit else ""))
    eval_spec = cfg.data.eval
    if eval_spec == "auto":  # the world's held-out set only for the world's own data
        eval_spec = (cfg.data.train + HELDOUT if is_builtin(cfg.data.train) and split_builtin(cfg.data.train)[1] == "train"
                     else None)
    if eval_spec:
        eval_examples, eval_report, hit = encode_sft_source(eval_spec, cfg.data, cfg.train.seed, tokenizer, encode_kw,
                                                            log=log, progress=progress, key="data.eval")
        log(f"eval data {eval_spec}: {eval_report.summary()}" + (" (from the tokenization cache)" if hit else ""))
    elif cfg.data.eval_fraction > 0:
        capped = f" (data.max_examples={cfg.data.max_examples})" if cfg.data.max_examples else ""
        train_examples, eval_examples = hold_out(train_examples, cfg.data.eval_fraction,
                                                 seed=f"sft-eval-split-{cfg.train.seed}", capped=capped)
    stats = padding_stats([len(e) for e in train_examples], cfg.data.max_length, cfg.train.micro_batch_size)
    log(f"padding: {stats.summary()}")
    plan = SFTPlan(train_examples, micro_batch_size=cfg.train.micro_batch_size,
                   grad_accum=cfg.train.grad_accum, epochs=cfg.train.epochs, max_steps=cfg.train.max_steps,
                   packing=cfg.data.packing, row_length=cfg.data.max_length,
                   pad_token_id=tokenizer.pad_token_id, seed=cfg.train.seed)
    log(f"plan: {plan.num_steps()} optimizer steps ({plan.steps_per_epoch} per epoch), "
        f"{'packed rows' if cfg.data.packing else 'padded batches'} of {cfg.train.micro_batch_size} "
        f"x {cfg.train.grad_accum} accumulation")
    if plan_hook is not None:
        plan = plan_hook(plan, model, tokenizer)
    if algorithm is None:
        algorithm = SFTAlgorithm(cfg.loss.normalization, cfg.loss.normalize_constant)

    def evaluate(m) -> dict:
        metrics = {}
        if eval_examples:
            metrics.update({f"eval_{k}": v for k, v in
                            eval_loss(m, algorithm, eval_examples, pad_token_id=tokenizer.pad_token_id).items()})
        if extra_eval is not None:
            metrics.update(extra_eval(m))
        return metrics

    has_eval = bool(eval_examples) or extra_eval is not None
    notes = []
    if eval_spec:
        notes += unused_notes(cfg.data, "data.", ["eval_fraction"], f"data.eval ({eval_spec}) is the held-out set")
    if not cfg.data.train.startswith("builtin:"):
        notes += unused_notes(cfg.data, "data.", ["world_examples"], "data.train is a file")
    if split_builtin(cfg.data.train)[0] != "builtin:world-tool-sft":
        notes += unused_notes(cfg.data, "data.", ["world_tool_fraction"], "data.train is not builtin:world-tool-sft")
    if not (eval_spec or "").startswith("builtin:"):
        notes += unused_notes(cfg.data, "data.", ["world_eval_examples"], "data.eval is not builtin data")
    if not has_eval:
        notes += unused_notes(cfg.train, "train.", ["eval_every"], "there is no eval data")
    for note in notes:
        log(f"note: {note}")
    result = fit(model, algorithm, plan, cfg.train, tokenizer=tokenizer, accelerator=accelerator,
                 evaluate=evaluate if has_eval else None, run_config=dataclasses.asdict(cfg), inputs=inputs, log=log,
                 eval_times=eval_times)
    return SFTResult(fit=result, output_dir=Path(cfg.train.output_dir), final_dir=result.final_dir,
                     encode_summary=report.summary(), padding_summary=stats.summary(),
                     eval_metrics=result.eval_history[-1] if result.eval_history else {})
