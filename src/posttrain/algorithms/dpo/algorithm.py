"""The preference algorithm the engine steps, the likelihood-displacement monitor, and the
reference / evaluation passes over units."""

from __future__ import annotations


import torch

from ...train.engine import to_device
from ..sequences import collate_examples, collate_groups, reference_log_probs, sequence_log_probs
from .data import Unit


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


