"""The online RL loss: the rollout buffer's samples, their collation and the algorithm the engine
steps (policy loss + KL + entropy, a critic's value loss)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data import EncodedExample
from ...models.logprobs import selected_log_probs
from ...ops import (
    aggregate_loss,
    exact_kl,
    get_policy_loss,
    kl_estimate,
    masked_sum,
    truncated_importance_weights,
    value_loss,
)
from .critic import critic_values
from .config import CriticConfig, RLLossConfig, check_sequence_level_aggregation
from ..sequences import collate_groups


# --------------------------------------------------------------------------- the rollout buffer


@dataclass
class Sample:
    """One completion of a rollout batch, with what the loss needs."""

    example: EncodedExample          # prompt + completion, labels on the completion
    n_tokens: int                    # completion tokens
    advantage: float
    trained: bool                    # False: excluded (invalid reward, or truncated with mask_truncated)
    rollout_logps: list[float]
    old_logps: list[float] | None = None
    ref_logps: list[float] | None = None
    # with a critic (token-level advantages): per completion token
    old_values: list[float] | None = None
    token_advantages: list[float] | None = None
    returns: list[float] | None = None
    process_rewards: list[float] | None = None  # per completion token (PRM step rewards at step ends)
    token_rewards: list[float] | None = None    # per completion token: per-token reward functions (teacher_logprob)


def _padded(values: torch.Tensor, seq: torch.Tensor, n_seq: int, width: int) -> torch.Tensor:
    """Flat per-token ``values`` (M,) of sequences ``seq`` (M,) -> ``(n_seq, width)``, each
    sequence's tokens left-aligned in order (zeros after). Differentiable in ``values``."""
    order = torch.argsort(seq, stable=True)
    seq_sorted = seq[order]
    counts = torch.bincount(seq_sorted, minlength=n_seq)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(seq)
    pos[order] = torch.arange(len(seq), device=seq.device) - starts[seq_sorted]
    out = values.new_zeros((n_seq, width))
    return out.index_put((seq, pos), values)


def per_sequence(values: torch.Tensor, batch: dict, n_seq: int) -> list[list[float]]:
    """Flat per-token ``values`` (M,) of a collated batch -> one list per sequence, in token order."""
    padded = _padded(values, batch["lp_seq"], n_seq, batch["mask"].shape[1]).cpu()
    counts = torch.bincount(batch["lp_seq"].cpu(), minlength=n_seq).tolist()
    return [padded[i, : counts[i]].tolist() for i in range(n_seq)]


def pad_rows(lists: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros((len(lists), width), dtype=torch.float32)
    for i, v in enumerate(lists):
        out[i, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


# --------------------------------------------------------------------------- the algorithm


class OnlineRLAlgorithm:
    """The per-micro-batch loss of the online loop (see the module docstring)."""

    def __init__(self, loss: RLLossConfig, *, temperature: float, max_new_tokens: int,
                 critic: CriticConfig | None = None):
        self.cfg = loss
        self.critic_cfg = critic
        self.spec = get_policy_loss(loss.policy_loss)
        check_sequence_level_aggregation(loss)   # the loop reads the loss's declaration
        self.hparams = {h: getattr(loss, h) for h in self.spec.hyperparameters}
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.kl_in_loss = loss.kl_beta > 0 and loss.kl_placement == "loss"
        self.kl_beta = loss.kl_beta  # the adaptive controller updates this between iterations
        # loss.kl_estimator=exact: the full-vocabulary KL at each sampled state needs the reference's logits in
        # the loss itself (set by run_rl: the frozen reference, or the adapter-disabled view of a LoRA policy)
        self.exact_kl = self.kl_in_loss and loss.kl_estimator == "exact"
        self.reference = None

    def counts(self, batch: dict) -> dict[str, int]:
        mask = batch["mask"]
        return {"tokens": int(mask.sum()), "sequences": int((mask.sum(-1) > 0).sum()),
                "input_tokens": int(batch["num_input_tokens"])}

    def loss(self, model, batch: dict, totals: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        critic = getattr(model, "critic", None)
        model = getattr(model, "policy", model)
        where = dict(attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"),
                     temperature=self.temperature)
        out = selected_log_probs(model, batch["input_ids"], batch["lp_rows"], batch["lp_targets"], return_entropy=True,
                                 return_logits=self.exact_kl, **where)
        mask = batch["mask"]
        n_seq, width = mask.shape
        logp = _padded(out["log_probs"], batch["lp_seq"], n_seq, width)
        entropy = _padded(out["entropy"].detach(), batch["lp_seq"], n_seq, width)
        old = batch["old_logps"] if "old_logps" in batch else logp.detach()
        per_token, m = self.spec.fn(logp, old, batch["advantages"], mask, **self.hparams)
        tis = {}
        if "tis_weights" in batch:
            per_token = per_token * batch["tis_weights"]
        elif "rollout_logps" in batch:   # one update per rollout batch: pi_old is this forward's own log-probs
            w, tis = truncated_importance_weights(logp.detach(), batch["rollout_logps"], mask, cap=self.cfg.tis_cap,
                                                  level=self.cfg.tis_level, mode=self.cfg.tis_mode)
            per_token = per_token * w
        n_tok = totals["tokens"].clamp(min=1)
        metrics = {k: masked_sum(v.detach().float(), mask) / n_tok for k, v in m.items()}
        if tis:   # the rollout / trainer mismatch of the trained tokens (per-token means over the step)
            metrics["tis_capped"] = masked_sum(tis["is_capped"], mask) / n_tok
            metrics["tis_logprob_abs_diff"] = masked_sum(tis["logprob_abs_diff"], mask) / n_tok
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
            metrics["kl_k1"] = masked_sum(kl_estimate(logp.detach(), ref, "k1"), mask) / n_tok
            metrics["kl_k3"] = masked_sum(kl_estimate(logp.detach(), ref, "k3"), mask) / n_tok
            if self.exact_kl:
                kl = _padded(self._exact_kl(batch, out.pop("logits"), where), batch["lp_seq"], n_seq, width)
                metrics["kl_exact"] = masked_sum(kl.detach(), mask) / n_tok
                per_token = per_token + self.kl_beta * kl
            elif self.kl_in_loss:
                per_token = per_token + self.kl_beta * kl_estimate(logp, ref, self.cfg.kl_estimator)
        if self.cfg.entropy_coef:
            ent_grad = _padded(out["entropy"], batch["lp_seq"], n_seq, width)
            per_token = per_token - self.cfg.entropy_coef * ent_grad
        metrics["entropy"] = masked_sum(entropy, mask) / n_tok
        loss = aggregate_loss(per_token, mask, self.cfg.aggregation, num_tokens=totals["tokens"],
                              num_sequences=totals["sequences"], normalize_constant=float(self.max_new_tokens))
        if critic is not None:
            values = _padded(critic_values(critic, batch), batch["lp_seq"], n_seq, width)
            v_loss, vm = value_loss(values, batch["old_values"], batch["returns"], mask,
                                    clip_eps=self.critic_cfg.value_clip)
            v_loss = masked_sum(v_loss, mask) / n_tok  # token mean over the whole optimizer step
            metrics["value_loss"] = v_loss.detach()
            metrics["value_clipped"] = masked_sum(vm["value_clipped"], mask) / n_tok
            metrics["policy_loss"] = loss.detach()
            loss = loss + self.critic_cfg.vf_coef * v_loss
        return loss, metrics

    def _exact_kl(self, batch: dict, logits: torch.Tensor, where: dict) -> torch.Tensor:
        """KL(π_θ(·|s_t) ‖ π_ref(·|s_t)) over the whole vocabulary at each sampled state ``(M,)`` (both
        temperature-scaled, as sampled), differentiable in the policy's ``logits`` ``(M, V)``
        (:func:`posttrain.ops.exact_kl`, chunked; the reference's logits are constants)."""
        if self.reference is None:
            raise RuntimeError("loss.kl_estimator=exact needs the reference model on the algorithm (run_rl sets it)")
        with torch.no_grad():
            ref = selected_log_probs(self.reference, batch["input_ids"], batch["lp_rows"], batch["lp_targets"],
                                     return_logits=True, **where)["logits"]
        return exact_kl(logits, ref)


def collate_samples(groups: list[list[Sample]], *, pad_token_id: int, attn_implementation: str,
                    row_length: int, with_old: bool, with_ref: bool, with_values: bool = False) -> dict:
    """A micro-batch of whole prompt groups: prefix-shared documents (one prompt, G completions)
    where the attention takes a 4-D mask, plus ``(S, L)`` per-token tensors in sequence order."""
    ids, start = [], 0
    for g in groups:
        ids.append(list(range(start, start + len(g))))
        start += len(g)
    batch = collate_groups([[s.example for s in g] for g in groups], ids, pad_token_id=pad_token_id, packing=True,
                           row_length=row_length, share_prefix=True, attn_implementation=attn_implementation)
    flat = [s for g in groups for s in g]
    width = max(s.n_tokens for s in flat)
    mask = torch.zeros((len(flat), width), dtype=torch.float32)
    for i, s in enumerate(flat):
        if s.trained:
            mask[i, : s.n_tokens] = 1.0
    batch["mask"] = mask
    if flat[0].token_advantages is not None:  # token-level advantages (GAE, REINFORCE++)
        batch["advantages"] = pad_rows([s.token_advantages for s in flat], width)
    else:
        batch["advantages"] = torch.tensor([s.advantage for s in flat], dtype=torch.float32)
    if with_values:  # the critic's targets and its old predictions
        batch["returns"] = pad_rows([s.returns for s in flat], width)
        batch["old_values"] = pad_rows([s.old_values for s in flat], width)
    if with_old:
        batch["old_logps"] = pad_rows([s.old_logps for s in flat], width)
    if with_ref:
        batch["ref_logps"] = pad_rows([s.ref_logps for s in flat], width)
    batch["num_input_tokens"] = sum(len(s.example) for s in flat)
    return batch

