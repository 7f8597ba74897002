"""Preference data as training units: pairs, unpaired examples or ranked sets, from files or the
world, encoded (and cached) for the loss's declared data kind."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...config import unused_notes
from ...data import check_tokenizer, encode_pairs, encode_ranked, encode_unpaired
from ...errors import ConfigError
from ...ops import PREFERENCE_LOSSES
from ...train.plan import hold_out
from ...world.sources import load_source
from .config import BUILTIN_SOURCES, PreferenceDataConfig, PreferenceLossConfig


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
    return load_source(spec, cfg, kinds=(kind,), seed=seed, key=key, what=f"{kind} preference data")


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
    from ...data.cache import cache_location, cached, read_entry, save_entry

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

