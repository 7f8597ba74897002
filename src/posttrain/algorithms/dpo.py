"""Offline preference optimization: DPO and its family, KTO, and the exponential-tilt NLL.

    posttrain dpo --config cfg.yaml loss.name=ipo loss.beta=0.5

``loss.name`` picks a pure function from :data:`posttrain.ops.PREFERENCE_LOSSES`; the trainer
reads only what the loss *declares* — which data it needs (paired, unpaired or ranked), whether
it needs a reference model, its hyper-parameters — and never branches on the name:

====================  =========  ==========  ==============================================
loss                  data       reference   idea
====================  =========  ==========  ==============================================
dpo (+ smoothing,     paired     yes         -log sigmoid of the implicit-reward margin
robust)
ipo                   paired     yes         squared margin of length-averaged log-ratios
hinge                 paired     yes         SLiC hinge on the margin
dpop                  paired     yes         DPO with a penalty when chosen falls below ref
simpo                 paired     no          length-normalized margin with a target gamma
orpo                  paired     no          NLL(chosen) + odds-ratio term
kto                   unpaired   yes         prospect-theory value vs a KL baseline z_ref
tilt                  ranked     no          NLL weighted by softmax(reward / beta) per prompt
====================  =========  ==========  ==============================================

Reference log-probs come from a frozen eval-mode copy of the initial policy (or
``loss.reference``) through the same log-prob path as the policy, or are computed once before
training (``loss.precompute_reference=true``) so no reference model stays in memory. Chosen and
rejected responses go through one forward pass. Logged every step: chosen / rejected log-probs
and their change versus the reference, implicit rewards, margins, preference accuracy, response
lengths, and a likelihood-displacement warning when the chosen log-prob keeps falling below the
reference while the loss improves (reference note 001 section 6.8). The run ends by writing
``curves.png`` (:func:`posttrain.algorithms.rl_report.plot_preference_curves`): the chosen and
rejected log-ratios against the reference, the margin, the preference accuracy and the loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.fields import FIELDS_HELP, check_builtin
from ..config import ModelConfig, TrainConfig, option, unused_notes, validated
from ..data import check_tokenizer, encode_pairs, encode_ranked, encode_unpaired, load_records
from ..errors import ConfigError
from ..models.loading import (
    accelerator_for,
    check_model_fits,
    check_same_vocabulary,
    load_causal_lm,
    load_policy,
    read_paths,
    tokenizer_for,
)
from ..models.peft import apply_peft
from ..ops import PREFERENCE_LOSSES, get_preference_loss
from ..train.checkpoint import weights_digest
from ..train.engine import FitResult, fit, to_device
from ..train.plan import hold_out, spread_eval_every
from ..train.rundir import check_output_dir
from .rl_report import plot_preference_curves
from .sequences import (
    UnitPlan,
    collate_examples,
    collate_groups,
    reference_policy,
    reference_log_probs,
    sequence_log_probs,
)

BUILTIN_SOURCES = ("builtin:world-pairs", "builtin:world-unpaired", "builtin:world-ranked")


@dataclass
class PreferenceDataConfig:
    """Preference data and batching."""

    train: str = option("builtin:world-pairs", "JSONL/Parquet file (preference, unpaired or ranked records, "
                        "matching the loss) or builtin:world-pairs / world-unpaired / world-ranked.")
    eval: str | None = option("auto", "Held-out file, or builtin:<name>-heldout; auto: the world's held-out "
                              "set when train is a builtin: source, else none (then eval_fraction applies); "
                              "null: eval_fraction of train.")
    fields: dict | str | None = option(None, FIELDS_HELP)
    eval_fraction: float = option(0.0, "Fraction of train held out for eval when data.eval is null (or auto with "
                                       "a file): whole units (pairs, KTO examples, K-sets), by a seeded shuffle.",
                                  min=0.0, max=0.5)
    max_length: int = option(256, "Tokens per prompt + response (and per packed row).", min=8)
    overlong: str = option("truncate", "Over-long responses: truncate (counted) or drop the unit.",
                           choices=("truncate", "drop"))
    packing: bool = option(True, "Pack each micro-batch's sequences into rows (no cross-document attention).")
    cache: bool = option(True, "Cache tokenized data files (keyed by the file's content, the tokenizer and these "
                               "settings) so a second run skips reading and tokenizing; see posttrain.data.cache.")
    cache_dir: str | None = option(None, "Tokenization cache directory (default $POSTTRAIN_CACHE/tokenized or "
                                         "~/.cache/posttrain/tokenized).")
    share_prefix: bool = option(True, "Encode the prompt of a pair / K-set once: its responses attend to one "
                                      "shared copy (same log-probs, less compute; sdpa/eager attention).")
    world_examples: int = option(2000, "Records generated for builtin: training data.", min=2, max=1_000_000)
    world_eval_examples: int = option(200, "Records generated for builtin: held-out data.", min=2, max=1_000_000)
    world_k: int = option(4, "Responses per prompt for builtin:world-ranked.", min=2, max=64)


@dataclass
class PreferenceLossConfig:
    """Which preference loss, and its hyper-parameters (each loss uses the ones it declares)."""

    name: str = option("dpo", "dpo, ipo, hinge, dpop, simpo, orpo, kto or tilt.",
                       choices=tuple(sorted(PREFERENCE_LOSSES)))
    beta: float = option(0.1, "beta (KL strength / temperature; IPO's tau; tilt's reward temperature).", gt=0.0)
    label_smoothing: float = option(0.0, "Probability a preference label is flipped (dpo, simpo).",
                                    min=0.0, lt=0.5)
    robust: bool = option(False, "dpo: robust (unbiased) form instead of conservative smoothing.")
    dpop_lambda: float = option(5.0, "dpop: weight of max(0, log pi_ref(y_w) - log pi(y_w)) inside the sigmoid.",
                                min=0.0)
    simpo_gamma: float = option(0.5, "simpo: target margin gamma.", min=0.0)
    orpo_lambda: float = option(0.1, "orpo: weight of the odds-ratio term.", min=0.0)
    kto_lambda_d: float = option(1.0, "kto: weight of desirable examples.", min=0.0)
    kto_lambda_u: float = option(1.0, "kto: weight of undesirable examples.", min=0.0)
    length_normalize: bool = option(False, "tilt: use per-token average log-probs.")
    reference: str | None = option(None, "Reference model (default: a frozen copy of the initial policy).")
    precompute_reference: bool = option(False, "Compute reference log-probs once before training and free the "
                                               "reference model.")
    displacement_window: int = option(20, "Steps per half-window of the likelihood-displacement check "
                                          "(0 disables it).", min=0)
    displacement_threshold: float = option(0.1, "Warn when the chosen log-ratio (nats per response) is below "
                                                "minus this and still falling while the loss improves.", min=0.0)

    def hyperparameters(self, names: tuple[str, ...]) -> dict:
        """The values of the hyper-parameters a loss declares (by name)."""
        missing = [n for n in names if not hasattr(self, n)]
        if missing:
            raise ConfigError(f"Loss '{self.name}' declares hyper-parameters {missing} that loss.* does not have.")
        return {n: getattr(self, n) for n in names}


@dataclass
class DPOConfig:
    """posttrain dpo: offline preference optimization (DPO family, KTO, tilt)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    loss: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/dpo", lr=5e-5,
                                                                   micro_batch_size=8, epochs=1.0,
                                                                   warmup_ratio=0.1))


# --------------------------------------------------------------------------- units


@dataclass
class Unit:
    """One training unit (a pair, an unpaired example, or a K-set) and its reference log-probs."""

    sequences: list
    kl_sequences: list = field(default_factory=list)
    desirable: bool | None = None
    rewards: list[float] | None = None
    margin: float | None = None
    ref: torch.Tensor | None = None        # (n_sequences,) when precomputed
    ref_kl: torch.Tensor | None = None


def units_from_records(ds, tokenizer, kind: str, *, max_length: int, overlong: str, seed: int):
    """Encode a dataset into units of the given data kind; returns (units, report summary)."""
    if kind == "paired":
        pairs, report = encode_pairs(ds, tokenizer, max_length=max_length, overlong=overlong)
        units = [Unit([p.chosen, p.rejected], margin=p.margin) for p in pairs]
    elif kind == "unpaired":
        items, report = encode_unpaired(ds, tokenizer, max_length=max_length, overlong=overlong, seed=seed)
        units = [Unit([u.example], kl_sequences=[u.kl_example], desirable=bool(u.desirable)) for u in items]
    elif kind == "ranked":
        groups, report = encode_ranked(ds, tokenizer, max_length=max_length, overlong=overlong)
        units = [Unit(list(g.responses), rewards=[float(r) for r in g.rewards]) for g in groups]
    else:
        raise ValueError(kind)
    return units, report.summary()


def unit_targets(u: Unit) -> list:
    """What a loss learns from besides the token ids (part of the plan's fingerprint)."""
    return [u.desirable, u.rewards, u.margin]


def load_preference_source(spec: str, cfg: PreferenceDataConfig, kind: str, seed: int, key: str = "data.train"):
    from ..world import preferences as wp

    check_builtin(spec, cfg.fields, key)
    if not str(spec).strip():
        raise ConfigError(f"Config key '{key}' is empty.",
                          fix=f"set {key} to a JSONL / Parquet file or one of {', '.join(BUILTIN_SOURCES)}.")

    builtin = {
        "builtin:world-pairs": ("paired", wp.preference_records, {}),
        "builtin:world-unpaired": ("unpaired", wp.unpaired_records, {}),
        "builtin:world-ranked": ("ranked", wp.ranked_records, {"k": cfg.world_k}),
    }
    name, split = spec, "train"
    if spec.endswith("-heldout"):
        name, split = spec[: -len("-heldout")], "heldout"
    if name in builtin:
        data_kind, fn, kw = builtin[name]
        if data_kind != kind:
            wanted = next(k for k, v in builtin.items() if v[0] == kind)
            raise ConfigError(f"data source '{spec}' holds {data_kind} data, but the loss needs {kind} data.",
                              fix=f"use {wanted} or a file in the matching format.")
        n = cfg.world_examples if split == "train" else cfg.world_eval_examples
        return load_records(fn(n, seed=seed, split=split, **kw))
    if spec.startswith("builtin:"):
        raise ConfigError(f"Unknown built-in data '{spec}'; built-in preference data: "
                          f"{', '.join(BUILTIN_SOURCES)} (and their -heldout variants).",
                          fix="use one of those or a file path.")
    return load_records(spec, fields=cfg.fields)


_KIND_FORMAT = {"paired": "preference", "unpaired": "unpaired", "ranked": "ranked"}


def encode_sources(data: PreferenceDataConfig, tokenizer, kind: str, *, seed: int, log, needed_by: str):
    """Load, check and encode ``data.train`` (and ``data.eval``) as units of ``kind``, through the
    tokenization cache for files (:mod:`posttrain.data.cache`).

    Returns ``(train_units, eval_units, train_summary)``; refuses data of the wrong kind.
    """
    units, summary = _encode_source(data.train, data, tokenizer, kind, seed=seed, log=log, needed_by=needed_by,
                                    key="data.train")
    eval_units: list[Unit] = []
    eval_spec = data.eval
    if eval_spec == "auto":  # the world's held-out set only for the world's own data
        eval_spec = data.train + "-heldout" if data.train in BUILTIN_SOURCES else None
    if eval_spec:
        eval_units, _ = _encode_source(eval_spec, data, tokenizer, kind, seed=seed, log=log, needed_by=needed_by,
                                       key="data.eval")
    elif data.eval_fraction > 0:  # (as SFT's: after encoding, so the tokenization cache is the same)
        units, eval_units = hold_out(units, data.eval_fraction, seed=f"preference-eval-split-{seed}",
                                     what=f"training units ({kind} data)")
        log(f"eval data: {len(eval_units)} of the training units held out (data.eval_fraction="
            f"{data.eval_fraction}), {len(units)} left to train on")
    return units, eval_units, summary


def _encode_source(spec: str, data: PreferenceDataConfig, tokenizer, kind: str, *, seed: int, log, needed_by: str,
                   key: str) -> tuple[list[Unit], str]:
    from ..data.cache import cache_location, cached, read_entry, save_entry

    def build():
        ds = load_preference_source(spec, data, kind, seed, key=key)
        if ds.format != _KIND_FORMAT[kind]:
            other = ", or pick a loss for {ds.format} data" if key == "data.train" else ""
            raise ConfigError(
                f"{needed_by} needs {_KIND_FORMAT[kind]} records, but {key} ({ds.source}) holds {ds.format} records.",
                fix=f"give {key} a file of {_KIND_FORMAT[kind]} records{other.format(ds=ds)}.")
        if key == "data.train":
            check_tokenizer(tokenizer, need_chat_template=any(isinstance(r.get("prompt"), list)
                                                              for r in ds.records[:1]))
        units, summary = units_from_records(ds, tokenizer, kind, max_length=data.max_length, overlong=data.overlong,
                                            seed=seed)
        return units, summary, ds.source

    directory, parts = cache_location(spec, data, tokenizer, {
        "kind": f"preference-{kind}", "max_length": data.max_length, "overlong": data.overlong,
        "seed": seed if kind == "unpaired" else None})  # (KTO's KL partners are drawn with the seed)

    def save(built, entry):
        units, summary, source = built
        examples, counts, meta = [], [], []
        for u in units:
            examples += [*u.sequences, *u.kl_sequences]
            counts.append(len(u.sequences) + len(u.kl_sequences))
            meta.append({"n": len(u.sequences), "desirable": u.desirable, "rewards": u.rewards, "margin": u.margin})
        save_entry(entry, examples, {"summary": summary, "source": source}, parts, counts=counts, meta=meta)

    def load(entry):
        e = read_entry(entry)
        if e["counts"] is None:
            raise ValueError("the entry holds no preference units")
        units, i = [], 0
        for c, m in zip(e["counts"], e["meta"]):
            seqs = e["examples"][i:i + c]
            i += c
            units.append(Unit(seqs[:m["n"]], kl_sequences=seqs[m["n"]:], desirable=m["desirable"],
                              rewards=m["rewards"], margin=m["margin"]))
        return units, e["report"]["summary"], e["report"]["source"]

    units, summary, source, hit = cached(directory, parts, build, log=log, save=save, load=load)
    # an entry is keyed by content: a hit may have been made from a copy of the file elsewhere
    log(f"{'train' if key == 'data.train' else 'eval'} data {spec if hit else source}: {summary}"
        + (" (from the tokenization cache)" if hit else ""))
    return units, summary


def data_notes(data: PreferenceDataConfig, *, has_eval: bool) -> list[str]:
    """Notes for builtin-data settings given with data files."""
    notes = []
    eval_spec = data.eval
    if eval_spec == "auto":
        eval_spec = data.train + "-heldout" if data.train in BUILTIN_SOURCES else None
    if eval_spec:
        notes += unused_notes(data, "data.", ["eval_fraction"], f"data.eval ({eval_spec}) is the held-out set")
    if not data.train.startswith("builtin:"):
        notes += unused_notes(data, "data.", ["world_examples", "world_k"], "data.train is a file")
    if not str(data.eval or "").startswith(("builtin:", "auto")) or not has_eval:
        notes += unused_notes(data, "data.", ["world_eval_examples"], "there is no builtin eval data")
    return notes


def unused_settings(loss_cfg: PreferenceLossConfig, spec, units: list[Unit]) -> list[str]:
    """Settings the chosen loss will not use although they were changed (so they are not
    ignored silently): another loss's hyper-parameters, a reference path for a reference-free
    loss, the data's margin fields."""
    notes = []
    defaults = PreferenceLossConfig()
    all_hparams = sorted({h for s in PREFERENCE_LOSSES.values() for h in s.hyperparameters})
    unused = [h for h in all_hparams if h not in spec.hyperparameters
              and getattr(loss_cfg, h, None) != getattr(defaults, h, None)]
    if unused:
        notes.append(f"loss '{spec.name}' does not use {', '.join(f'loss.{h}={getattr(loss_cfg, h)!r}' for h in unused)}"
                     f" (it uses {', '.join('loss.' + h for h in spec.hyperparameters) or 'no hyper-parameters'}).")
    if not spec.needs_reference:
        notes += unused_notes(loss_cfg, "loss.", ["reference", "precompute_reference"],
                              f"loss '{spec.name}' uses no reference model")
    if any(u.margin is not None for u in units):
        notes.append(f"the training data's 'margin' fields are not used by loss '{spec.name}' (only the reward "
                     "model's bt loss reads them).")
    return notes


# --------------------------------------------------------------------------- the algorithm


class PreferenceAlgorithm:
    """Sequence log-probs of a micro-batch of units -> the selected loss, normalized by the
    step's global number of units (pairs / examples / prompts). A batch with ``zero_weight``
    set (a data-parallel padding copy) counts nothing and contributes a zero loss and zero metrics."""

    def __init__(self, spec, hparams: dict, *, reference=None):
        self.spec = spec
        self.hparams = hparams
        self.reference = reference

    # sequence order in a batch: paired -> all chosen, then all rejected; ranked -> group by group;
    # unpaired -> the examples (their KL partners go in a second batch)
    def collate(self, units: list[Unit], *, pad_token_id: int, packing: bool, row_length: int,
                share_prefix: bool = False, attn_implementation: str = "sdpa") -> dict:
        kind = self.spec.data
        if kind == "unpaired":
            batch = collate_examples([u.sequences[0] for u in units], pad_token_id=pad_token_id, packing=packing,
                                     row_length=row_length)
        else:
            if kind == "paired":
                ids = [[i, len(units) + i] for i in range(len(units))]
            else:
                starts = [sum(len(u.sequences) for u in units[:g]) for g in range(len(units))]
                ids = [[st + k for k in range(len(u.sequences))] for st, u in zip(starts, units)]
            batch = collate_groups([u.sequences for u in units], ids, pad_token_id=pad_token_id, packing=packing,
                                   row_length=row_length, share_prefix=share_prefix,
                                   attn_implementation=attn_implementation)
        batch["num_units"] = len(units)
        if units[0].ref is not None:
            if kind == "paired":
                batch["ref_logps"] = torch.stack([u.ref[0] for u in units] + [u.ref[1] for u in units])
            else:
                batch["ref_logps"] = torch.cat([u.ref for u in units])
        if kind == "unpaired":
            batch["desirable"] = torch.tensor([bool(u.desirable) for u in units])
            kl = collate_examples([u.kl_sequences[0] for u in units], pad_token_id=pad_token_id,
                                  packing=packing, row_length=row_length)
            if units[0].ref_kl is not None:
                kl["ref_logps"] = torch.cat([u.ref_kl for u in units])
            batch["kl"] = kl
        if kind == "ranked":
            batch["rewards"] = torch.tensor([r for u in units for r in u.rewards], dtype=torch.float32)
            batch["group_ids"] = torch.tensor([g for g, u in enumerate(units) for _ in u.sequences])
        return batch

    def counts(self, batch: dict) -> dict[str, int]:
        if batch.get("zero_weight"):  # a data-parallel padding copy (share_layout): it counts nothing
            return {"units": 0, "tokens": 0, "input_tokens": 0}
        return {
            "units": int(batch["num_units"]),
            "tokens": int(batch["lp_targets"].numel()),
            "input_tokens": int(batch["num_input_tokens"]),
        }

    def _ref(self, batch: dict) -> torch.Tensor | None:
        if not self.spec.needs_reference:
            return None
        if "ref_logps" in batch:
            return batch["ref_logps"]
        return reference_log_probs(self.reference, batch)

    def loss(self, model, batch: dict, totals: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = sequence_log_probs(model, batch)
        logps, lengths = out["logps"], out["lengths"]
        ref = self._ref(batch)
        kind = self.spec.data
        n_units = totals["units"].clamp(min=1)
        metrics: dict[str, torch.Tensor] = {}
        if kind == "paired":
            p = int(batch["num_units"])
            c, r, lc, lr = logps[:p], logps[p:], lengths[:p], lengths[p:]
            rc = rr = None
            if ref is not None:
                rc, rr = ref[:p], ref[p:]
                metrics["chosen_logratio"] = (c - rc).detach().sum() / n_units
                metrics["rejected_logratio"] = (r - rr).detach().sum() / n_units
            losses, m = self.spec.fn(c, r, rc, rr, lc, lr, **self.hparams)
            metrics["chosen_logps"] = c.detach().sum() / n_units
            metrics["rejected_logps"] = r.detach().sum() / n_units
            metrics["chosen_len"] = lc.sum() / n_units
            metrics["rejected_len"] = lr.sum() / n_units
        elif kind == "unpaired":
            with torch.no_grad():
                kl_batch = batch["kl"]
                kl_logps = sequence_log_probs(model, kl_batch)["logps"]
                kl_ref = kl_batch["ref_logps"] if "ref_logps" in kl_batch else \
                    reference_log_probs(self.reference, kl_batch)
            losses, m = self.spec.fn(logps, ref, batch["desirable"], kl_logps, kl_ref, lengths, **self.hparams)
            d = batch["desirable"].to(logps.dtype)
            metrics["desirable_fraction"] = d.sum() / n_units
            metrics["logratio"] = (logps - ref).detach().sum() / n_units
        else:  # ranked
            losses, m = self.spec.fn(logps, batch["rewards"], batch["group_ids"], lengths, **self.hparams)
        units_here = int(batch["num_units"])
        for k, v in m.items():
            v = v.detach().to(torch.float32)
            if v.dim() == 0:  # a micro-batch statistic (e.g. KTO's z_ref): weight by its share of units
                metrics[k] = v * (units_here / n_units)
            elif v.shape[0] == units_here:  # per-unit values: a mean over the step's units
                metrics[k] = v.sum() / n_units
        if batch.get("zero_weight"):
            # a padding copy (posttrain.train.plan.share_layout): the forward / backward runs, but its
            # loss and metrics are 0 (num_units stays the copy's real size: it splits chosen / rejected)
            return losses.sum() * 0.0, {k: v * 0.0 for k, v in metrics.items()}
        return losses.sum() / n_units, metrics


# --------------------------------------------------------------------------- diagnostics


class DisplacementMonitor:
    """Warns once when the chosen log-prob keeps falling below the reference while the loss
    improves (likelihood displacement): over two consecutive windows of ``window`` steps the
    mean loss went down, the mean chosen log-ratio (log pi - log pi_ref, summed over the
    response) went down, and it is below ``-threshold``. Adds ``likelihood_displacement`` (0/1)
    to every step record."""

    def __init__(self, window: int, threshold: float = 0.1, log=print):
        self.window = window
        self.threshold = threshold
        self.log = log
        self.loss: list[float] = []
        self.chosen: list[float] = []
        self.warned = False

    def __call__(self, record: dict) -> None:
        if not self.window or "chosen_logratio" not in record:
            return
        self.loss.append(record["loss"])
        self.chosen.append(record["chosen_logratio"])
        flag = 0
        w = self.window
        if len(self.loss) >= 2 * w:
            l0, l1 = sum(self.loss[-2 * w : -w]) / w, sum(self.loss[-w:]) / w
            c0, c1 = sum(self.chosen[-2 * w : -w]) / w, sum(self.chosen[-w:]) / w
            if l1 < l0 and c1 < c0 and c1 < -self.threshold:
                flag = 1
                if not self.warned:
                    self.warned = True
                    self.log(
                        f"warning: likelihood displacement at step {record['step']}: the loss improved "
                        f"({l0:.4f} -> {l1:.4f}) while the chosen responses' log-prob fell further below the "
                        f"reference (mean log-ratio {c0:.3f} -> {c1:.3f} nats). The margin grows only because "
                        "rejected responses fall faster. Consider loss.name=dpop (anchors the chosen "
                        "log-prob), simpo, a smaller train.lr, or a larger loss.beta.")
        record["likelihood_displacement"] = flag
        del self.loss[: -2 * w], self.chosen[: -2 * w]  # only the last two windows matter

    def state_dict(self) -> dict:
        """Saved in every checkpoint, so a resumed run flags (and warns) exactly as an uninterrupted one."""
        return {"loss": list(self.loss), "chosen": list(self.chosen), "warned": self.warned}

    def load_state_dict(self, state: dict) -> None:
        self.loss = [float(x) for x in state.get("loss", [])]
        self.chosen = [float(x) for x in state.get("chosen", [])]
        self.warned = bool(state.get("warned", False))


# --------------------------------------------------------------------------- entry point


@dataclass
class PreferenceResult:
    fit: FitResult
    final_dir: Path | None
    encode_summary: str
    eval_metrics: dict = dataclasses.field(default_factory=dict)


@torch.no_grad()
def attach_reference(units: list[Unit], ref_model, collate, batch_size: int = 16) -> None:
    """Compute every unit's reference log-probs once (``loss.precompute_reference``)."""
    for i in range(0, len(units), batch_size):
        chunk = units[i : i + batch_size]
        seqs = [s for u in chunk for s in u.sequences]
        logps = reference_log_probs(ref_model, collate(seqs))
        kl = [s for u in chunk for s in u.kl_sequences]
        kl_logps = reference_log_probs(ref_model, collate(kl)) if kl else None
        pos = kpos = 0
        for u in chunk:
            u.ref = logps[pos : pos + len(u.sequences)].cpu()
            pos += len(u.sequences)
            if kl_logps is not None:
                u.ref_kl = kl_logps[kpos : kpos + len(u.kl_sequences)].cpu()
                kpos += len(u.kl_sequences)


@torch.no_grad()
def evaluate_preferences(model, algo: PreferenceAlgorithm, units: list[Unit], collate, batch_size: int = 16) -> dict:
    """Held-out loss and (for paired data) preference accuracy / margin of ``model``."""
    was = model.training
    model.eval()
    total = {}
    n = 0
    for i in range(0, len(units), batch_size):
        chunk = units[i : i + batch_size]
        batch = collate(chunk)
        batch = to_device(batch, next(model.parameters()).device)  # nested: KTO's KL batch too
        loss, m = algo.loss(model, batch, {"units": torch.tensor(float(len(chunk)))})
        for k, v in {"loss": loss, **m}.items():
            total[k] = total.get(k, 0.0) + float(v) * len(chunk)
        n += len(chunk)
    model.train(was)
    return {f"eval_{k}": v / max(n, 1) for k, v in total.items()}


def run_preference(cfg: DPOConfig, *, model=None, tokenizer=None, log=print, extra_eval=None,
                   eval_times: int | None = None) -> PreferenceResult:
    """Run offline preference optimization as configured (see the module docstring)."""
    cfg = validated(cfg, DPOConfig)
    log = log or (lambda line: None)
    check_output_dir(cfg.train.output_dir, resume=cfg.train.resume, overwrite=cfg.train.overwrite_output_dir,
                     protect=read_paths(cfg.model, **{"loss.reference": cfg.loss.reference}))
    torch.manual_seed(cfg.train.seed)
    spec = get_preference_loss(cfg.loss.name)
    accelerator = accelerator_for(cfg.model)
    tokenizer = tokenizer or tokenizer_for(cfg.model)
    if model is None:
        model = load_policy(cfg.model, accelerator)
    check_model_fits(model, tokenizer, cfg.model, max_length=cfg.data.max_length)
    model = apply_peft(model, cfg.model.peft, log=log)
    kind = spec.data
    units, eval_units, summary = encode_sources(cfg.data, tokenizer, kind, seed=cfg.train.seed, log=log,
                                                needed_by=f"loss '{cfg.loss.name}'")

    reference = None
    if spec.needs_reference:
        if cfg.loss.reference:
            reference = load_causal_lm(cfg.loss.reference, dtype=cfg.model.dtype, device=str(accelerator.device),
                                       attn_implementation=cfg.model.attn_implementation, key="loss.reference")
            check_same_vocabulary(reference, model, key="loss.reference")
        else:
            reference = reference_policy(model)
        for p in reference.parameters():
            p.requires_grad_(False)
        reference.eval()
    hparams = cfg.loss.hyperparameters(spec.hyperparameters)
    for note in unused_settings(cfg.loss, spec, units):
        log(f"note: {note}")
    algo = PreferenceAlgorithm(spec, hparams, reference=reference)

    attn = str(getattr(model.config, "_attn_implementation", "sdpa"))

    def collate_units(us):
        return algo.collate(us, pad_token_id=tokenizer.pad_token_id, packing=cfg.data.packing,
                            row_length=cfg.data.max_length, share_prefix=cfg.data.share_prefix,
                            attn_implementation=attn)

    def collate_seqs(seqs):
        return collate_examples(seqs, pad_token_id=tokenizer.pad_token_id, packing=cfg.data.packing,
                                row_length=cfg.data.max_length)

    # the reference is not in the checkpoints: record which weights it had, so that a resume with a
    # changed reference model is refused
    inputs = {"reference_weights_sha256": weights_digest(reference)} if reference is not None else {}
    if reference is not None and cfg.loss.precompute_reference:
        log("computing reference log-probs once (loss.precompute_reference)")
        attach_reference(units, reference, collate_seqs)
        attach_reference(eval_units, reference, collate_seqs)
        algo.reference = None
        del reference
    plan = UnitPlan(units, collate=collate_units, unit_sequences=lambda u: u.sequences + u.kl_sequences,
                    micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                    epochs=cfg.train.epochs, max_steps=cfg.train.max_steps, seed=cfg.train.seed,
                    unit_targets=unit_targets,
                    tag=f"pref-{cfg.loss.name}")
    log(f"loss {spec.name}: {kind} data, reference {'yes' if spec.needs_reference else 'no'}"
        f"{' (precomputed)' if spec.needs_reference and cfg.loss.precompute_reference else ''}; "
        f"hyper-parameters {hparams}; plan: {plan.num_steps()} optimizer steps of "
        f"{cfg.train.micro_batch_size} x {cfg.train.grad_accum} units")

    def evaluate(m) -> dict:
        metrics = evaluate_preferences(m, algo, eval_units, collate_units) if eval_units else {}
        if extra_eval is not None:
            metrics.update(extra_eval(m))
        return metrics

    for note in data_notes(cfg.data, has_eval=bool(eval_units or extra_eval)) + unused_notes(
            cfg.train, "train.", ["eval_every"] if not (eval_units or extra_eval) else [], "there is no eval data"):
        log(f"note: {note}")
    engine_cfg = cfg.train.engine()
    if eval_times:
        engine_cfg.eval_every = spread_eval_every(plan.num_steps(), eval_times)
    monitor = DisplacementMonitor(cfg.loss.displacement_window, cfg.loss.displacement_threshold, log=log)
    result = fit(model, algo, plan, engine_cfg, tokenizer=tokenizer, accelerator=accelerator,
                 evaluate=evaluate if (eval_units or extra_eval) else None,
                 run_config=dataclasses.asdict(cfg), inputs=inputs, log=log, callbacks=[monitor])
    if accelerator.is_main_process and result.history:
        plot_preference_curves(result.history, result.eval_history, Path(cfg.train.output_dir) / "curves.png",
                               title=f"posttrain dpo (loss.name={cfg.loss.name})")
    return PreferenceResult(fit=result, final_dir=result.final_dir, encode_summary=summary,
                            eval_metrics=result.eval_history[-1] if result.eval_history else {})
