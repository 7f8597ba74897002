"""Reward models: a scalar head on a causal-LM backbone, trained on preferences.

    posttrain rm --config cfg.yaml model.name_or_path=runs/sft/final loss.name=bt

The model is a Hugging Face ``AutoModelForSequenceClassification`` with one label (the
convention users know: ``AutoModelForSequenceClassification.from_pretrained(dir)`` loads the
result), built from a causal LM's weights with a freshly initialized score head. A linear head
is applied to every position and the per-token scores are pooled per sequence, *exactly as
transformers' own forward of the saved model pools them*, so the saved model scores what
training scored:

* ``last`` (default): the last token of each sequence that is not the pad token — the
  token ``AutoModelForSequenceClassification`` reads (its rule: the rightmost token whose id
  differs from ``config.pad_token_id``; right or left padding, packed rows). When the pad token
  is the EOS token (the usual fix for Llama-family tokenizers), that is the token *before* a
  trailing EOS, in training and after saving alike.
* ``eos``: the final end-of-sequence / end-of-turn token of the response. transformers can
  only reproduce this when that token is the sequence's last token and is not the pad token,
  so those two conditions are checked on the data before training and anything else is
  refused (e.g. a chat template that writes a newline after its end-of-turn token).
* ``mean`` over the response tokens is refused: transformers' forward reads one token, so a
  mean-pooled head would score differently once saved.

The pooling is also stored in the saved config as ``posttrain_pooling``.

Losses (pure functions in :mod:`posttrain.ops.reward`): Bradley-Terry ``-log sigmoid(r_w - r_l -
m)`` with an optional per-pair margin from the data, hinge, MSE to a target gap (paired data),
and listwise softmax cross-entropy over K ranked responses (ranked data), plus optional reward
centering ``coef * (r_w + r_l)^2``. Held-out metrics: pairwise accuracy, mean margin, reward
mean / std, and a length-bias probe (correlation of reward with response length).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig, TrainConfig, option, unused_notes, validated
from ..errors import ConfigError, DataError
from ..models.loading import (
    accelerator_for,
    check_model_fits,
    load_sequence_classifier,
    read_paths,
    tokenizer_for,
)
from ..models.logprobs import forward_kwargs
from ..models.peft import apply_peft, hf_model
from ..ops import REWARD_LOSSES, listwise_loss, pool_sequences, reward_centering, softmax_targets, top1_targets
from ..rewards.process import score_head
from ..train.engine import FitResult, fit, to_device
from ..train.rundir import check_output_dir
from .dpo import PreferenceDataConfig, Unit, data_notes, encode_sources, unit_targets
from .sequences import UnitPlan, collate_examples, pearson

# what each reward loss needs, as data: its data kind and the keyword arguments it takes
RM_LOSS_DATA = {**{name: "paired" for name in REWARD_LOSSES}, "listwise": "ranked"}
RM_LOSS_ARGS = {"bt": ("margin",), "hinge": ("hinge_margin",), "mse": ("target_gap",)}


@dataclass
class RMLossConfig:
    """Reward-model loss, pooling and regularization."""

    name: str = option("bt", "bt (Bradley-Terry), hinge, mse (paired data) or listwise (ranked data).",
                       choices=tuple(sorted(RM_LOSS_DATA)))
    pooling: str = option("last", "last (the last non-pad token, as transformers' forward reads it) or eos (the "
                          "final EOS token; checked to be what transformers reads). mean is refused: the saved "
                          "model could not reproduce it.", choices=("last", "eos", "mean"))
    use_data_margin: bool = option(True, "bt: subtract a record's 'margin' field when present.")
    hinge_margin: float = option(1.0, "hinge: required reward gap.", gt=0.0)
    target_gap: float = option(1.0, "mse: target reward gap.")
    centering_coef: float = option(0.0, "Reward centering: adds coef * (r_w + r_l)^2.", min=0.0)
    listwise_target: str = option("top1", "listwise targets: top1 (one-hot on the best; ties share) or softmax "
                                          "(softmax of the data's rewards / temperature).",
                                  choices=("top1", "softmax"))
    listwise_temperature: float = option(1.0, "listwise: temperature of the softmax targets.", gt=0.0)

    def validate(self) -> None:
        if self.pooling == "mean":
            raise ConfigError(
                "Config key 'loss.pooling' is 'mean', which posttrain refuses for reward models: transformers' "
                "AutoModelForSequenceClassification scores a sequence by the one token it reads (the last "
                "non-pad token), so a head trained on mean-pooled scores would give different scores once "
                "saved and loaded.", fix="use loss.pooling=last (default) or loss.pooling=eos.")


@dataclass
class RMConfig:
    """posttrain rm: reward-model training on preference (or ranked) data."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    loss: RMLossConfig = field(default_factory=RMLossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/rm", lr=1e-4,
                                                                   micro_batch_size=8, epochs=1.0,
                                                                   warmup_ratio=0.05))

    def validate(self) -> None:
        if self.model.peft.quantize != "none":
            raise ConfigError(f"model.peft.quantize={self.model.peft.quantize}: QLoRA is not supported for reward "
                              "models yet (the score head would sit on a 4-bit backbone).",
                              fix="use model.peft.method=lora with model.peft.quantize=none.")


def load_reward_model(name_or_path: str, tokenizer, *, dtype: str = "auto", device: str = "auto",
                      attn_implementation: str | None = "sdpa", key: str = "model.name_or_path"):
    """A one-label ``AutoModelForSequenceClassification`` from a causal LM (new score head) or an RM dir
    (safetensors only, no repository code: :mod:`posttrain.models.loading`)."""
    model = load_sequence_classifier(name_or_path, num_labels=1, dtype=dtype, device=device,
                                     attn_implementation=attn_implementation, key=key)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def sequence_rewards(model, batch: dict, *, pooling: str, eos_token_id: int | None,
                     pad_token_id: int | None) -> torch.Tensor:
    """``(S,)`` scalar rewards of the batch's sequences (float32), pooled as transformers' forward of
    the saved model pools them (see the module docstring)."""
    kwargs = forward_kwargs(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    with hf_model(model) as m:
        hidden = m.base_model(**kwargs).last_hidden_state
        values = score_head(m)(hidden).squeeze(-1).float()
    ids = batch["input_ids"]
    if pooling == "last":
        # transformers' rule: the rightmost token that is not the pad token
        mode, mask = "eos", (ids != pad_token_id) if pad_token_id is not None else torch.ones_like(ids, dtype=torch.bool)
    elif pooling == "eos":
        mode, mask = "eos", (ids == eos_token_id) & (batch["labels"] != -100)
    else:
        mode, mask = pooling, None
    try:
        return pool_sequences(values, batch["sequence_ids"], int(batch["num_sequences"]), mode=mode,
                              token_mask=batch["labels"] != -100, eos_mask=mask)
    except ValueError as e:
        raise DataError(f"reward pooling '{pooling}' failed: {e}",
                        fix="use loss.pooling=last, or make sure every response ends with the EOS / "
                        "end-of-turn token (pooling=eos).") from None


def check_pooling_reproducible(units, *, pooling: str, eos_token_id: int | None, pad_token_id: int | None,
                               source: str) -> None:
    """For ``pooling="eos"``: every sequence must end with the EOS token, and EOS must not be the pad
    token, or transformers' forward of the saved model would read another token. Raises otherwise."""
    if pooling != "eos":
        return
    if eos_token_id is None:
        raise ConfigError("loss.pooling=eos needs a tokenizer with an EOS token; this one has none.",
                          fix="use loss.pooling=last.")
    if pad_token_id == eos_token_id:
        raise ConfigError(
            "loss.pooling=eos cannot be reproduced by the saved model: the tokenizer's pad token is its EOS "
            f"token (id {eos_token_id}), and transformers' AutoModelForSequenceClassification skips pad tokens "
            "when it picks the token to score, so it would read the token before the EOS.",
            fix="use loss.pooling=last (it scores exactly what transformers reads), or set model.pad_token to a "
            "token other than EOS.")
    for i, u in enumerate(units):
        for s in u.sequences:
            if not s.input_ids or s.input_ids[-1] != eos_token_id:
                tail = s.input_ids[-3:]
                raise DataError(
                    f"{source}, unit {i}: with loss.pooling=eos every sequence must end with the EOS / end-of-turn "
                    f"token (id {eos_token_id}) so that transformers' forward of the saved model reads it, but this "
                    f"one ends with token ids {tail} (a chat template may write a newline after its end-of-turn "
                    "token, or the response was truncated to data.max_length).",
                    fix="use loss.pooling=last (it scores exactly what transformers reads), or raise "
                    "data.max_length.")


class RewardModelAlgorithm:
    def __init__(self, cfg: RMLossConfig, *, eos_token_id: int | None, pad_token_id: int | None = None):
        self.cfg = cfg
        self.kind = RM_LOSS_DATA[cfg.name]
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def collate(self, units: list[Unit], *, pad_token_id: int, packing: bool, row_length: int) -> dict:
        if self.kind == "paired":
            seqs = [u.sequences[0] for u in units] + [u.sequences[1] for u in units]
        else:
            seqs = [s for u in units for s in u.sequences]
        batch = collate_examples(seqs, pad_token_id=pad_token_id, packing=packing, row_length=row_length)
        batch["num_units"] = len(units)
        batch["lengths"] = torch.tensor([sum(1 for x in s.labels if x != -100) for s in seqs], dtype=torch.float32)
        if self.kind == "paired":
            batch["margins"] = torch.tensor([u.margin if (u.margin is not None and self.cfg.use_data_margin)
                                             else 0.0 for u in units], dtype=torch.float32)
        else:
            k = max(len(u.sequences) for u in units)
            data_rewards = torch.full((len(units), k), float("-inf"))
            mask = torch.zeros((len(units), k), dtype=torch.bool)
            for g, u in enumerate(units):
                data_rewards[g, : len(u.rewards)] = torch.tensor(u.rewards)
                mask[g, : len(u.rewards)] = True
            batch["data_rewards"], batch["group_mask"] = data_rewards, mask
        return batch

    def counts(self, batch: dict) -> dict[str, int]:
        return {"units": int(batch["num_units"]), "tokens": int((batch["labels"] != -100).sum()),
                "input_tokens": int(batch["num_input_tokens"])}

    def rewards(self, model, batch: dict) -> torch.Tensor:
        return sequence_rewards(model, batch, pooling=self.cfg.pooling, eos_token_id=self.eos_token_id,
                                pad_token_id=self.pad_token_id)

    def loss(self, model, batch: dict, totals: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r = self.rewards(model, batch)
        n = totals["units"].clamp(min=1)
        p = int(batch["num_units"])
        if self.kind == "paired":
            rw, rl = r[:p], r[p:]
            args = {"margin": batch["margins"], "hinge_margin": self.cfg.hinge_margin,
                    "target_gap": self.cfg.target_gap}
            losses, m = REWARD_LOSSES[self.cfg.name](rw, rl, **{k: args[k] for k in RM_LOSS_ARGS[self.cfg.name]})
            if self.cfg.centering_coef:
                losses = losses + reward_centering(rw, rl, self.cfg.centering_coef)
            metrics = {"accuracy": m["accuracy"].sum() / n, "margin": m["margin"].sum() / n,
                       "reward_mean": r.detach().sum() / (2 * n)}
        else:
            mask = batch["group_mask"]
            scores = torch.full(mask.shape, float("-inf"), device=r.device, dtype=r.dtype)
            scores = scores.masked_scatter(mask, r)
            if self.cfg.listwise_target == "top1":
                targets = top1_targets(batch["data_rewards"], mask)
            else:
                targets = softmax_targets(batch["data_rewards"], self.cfg.listwise_temperature, mask)
            losses, m = listwise_loss(scores, targets, mask)
            best_model = scores.argmax(-1)
            best_data = batch["data_rewards"].argmax(-1)
            metrics = {"top1_accuracy": (best_model == best_data).float().sum() / n}
        return losses.sum() / n, metrics


@torch.no_grad()
def evaluate_reward_model(model, algo: RewardModelAlgorithm, units: list[Unit], collate, batch_size: int = 16) -> dict:
    """Held-out pairwise accuracy, mean margin, reward mean/std and the length-bias probe."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    rewards, lengths, correct, margins = [], [], [], []
    for i in range(0, len(units), batch_size):
        chunk = units[i : i + batch_size]
        batch = collate(chunk)
        batch = to_device(batch, device)
        r = algo.rewards(model, batch).cpu()
        rewards += r.tolist()
        lengths += batch["lengths"].tolist()
        if algo.kind == "paired":
            p = len(chunk)
            margins += (r[:p] - r[p:]).tolist()
            correct += (r[:p] > r[p:]).float().tolist()
        else:
            pos = 0
            for u in chunk:
                k = len(u.sequences)
                scores = r[pos : pos + k]
                correct.append(float(int(scores.argmax()) == int(torch.tensor(u.rewards).argmax())))
                pos += k
    model.train(was)
    t = torch.tensor(rewards)
    out = {"eval_accuracy": sum(correct) / max(1, len(correct)), "eval_reward_mean": float(t.mean()),
           "eval_reward_std": float(t.std()) if len(t) > 1 else 0.0,
           "eval_length_correlation": pearson(rewards, lengths)}
    if margins:
        out["eval_margin"] = sum(margins) / len(margins)
    return out


@dataclass
class RMResult:
    fit: FitResult
    final_dir: Path | None
    encode_summary: str
    eval_metrics: dict = dataclasses.field(default_factory=dict)


def run_rm(cfg: RMConfig, *, model=None, tokenizer=None, log=print) -> RMResult:
    """Train a reward model as configured (see the module docstring)."""
    cfg = validated(cfg, RMConfig)
    log = log or (lambda line: None)
    check_output_dir(cfg.train.output_dir, resume=cfg.train.resume, overwrite=cfg.train.overwrite_output_dir,
                     protect=read_paths(cfg.model))
    torch.manual_seed(cfg.train.seed)
    kind = RM_LOSS_DATA[cfg.loss.name]
    accelerator = accelerator_for(cfg.model)
    tokenizer = tokenizer or tokenizer_for(cfg.model)
    if model is None:
        model = load_reward_model(cfg.model.name_or_path, tokenizer, dtype=cfg.model.dtype,
                                  device=str(accelerator.device), attn_implementation=cfg.model.attn_implementation)
    check_model_fits(model, tokenizer, cfg.model, max_length=cfg.data.max_length)
    model = apply_peft(model, cfg.model.peft, task="SEQ_CLS", log=log)
    model.config.pad_token_id = tokenizer.pad_token_id  # what transformers' forward pools by
    model.config.posttrain_pooling = cfg.loss.pooling
    units, eval_units, summary = encode_sources(cfg.data, tokenizer, kind, seed=cfg.train.seed, log=log,
                                                needed_by=f"reward loss '{cfg.loss.name}'")
    own = set(RM_LOSS_ARGS.get(cfg.loss.name, ())) | ({"listwise_target", "listwise_temperature"}
                                                      if cfg.loss.name == "listwise" else set())
    for note in unused_notes(cfg.loss, "loss.", [n for n in ("hinge_margin", "target_gap", "listwise_target",
                                                             "listwise_temperature") if n not in own],
                             f"reward loss '{cfg.loss.name}' does not use it") + data_notes(cfg.data,
                                                                                          has_eval=bool(eval_units)):
        log(f"note: {note}")
    if "margin" not in RM_LOSS_ARGS.get(cfg.loss.name, ()) and any(u.margin is not None for u in units):
        log(f"note: the training data's 'margin' fields are not used by reward loss '{cfg.loss.name}' (only bt "
            "reads them).")
    for name, us in (("data.train", units), ("data.eval", eval_units)):
        check_pooling_reproducible(us, pooling=cfg.loss.pooling, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, source=name)
    algo = RewardModelAlgorithm(cfg.loss, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    def collate_units(us):
        return algo.collate(us, pad_token_id=tokenizer.pad_token_id, packing=cfg.data.packing,
                            row_length=cfg.data.max_length)

    plan = UnitPlan(units, collate=collate_units, unit_sequences=lambda u: u.sequences,
                    micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                    epochs=cfg.train.epochs, max_steps=cfg.train.max_steps, seed=cfg.train.seed,
                    unit_targets=unit_targets,
                    tag=f"rm-{cfg.loss.name}")
    log(f"reward model: loss {cfg.loss.name} ({kind} data), pooling {cfg.loss.pooling}; plan: "
        f"{plan.num_steps()} optimizer steps of {cfg.train.micro_batch_size} x {cfg.train.grad_accum} units")

    def evaluate(m) -> dict:
        return evaluate_reward_model(m, algo, eval_units, collate_units)

    result = fit(model, algo, plan, cfg.train, tokenizer=tokenizer, accelerator=accelerator,
                 evaluate=evaluate if eval_units else None, run_config=dataclasses.asdict(cfg), log=log)
    return RMResult(fit=result, final_dir=result.final_dir, encode_summary=summary,
                    eval_metrics=result.eval_history[-1] if result.eval_history else {})
