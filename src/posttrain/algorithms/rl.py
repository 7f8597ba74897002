"""Online RL on one loop: GRPO and its fixes (Dr. GRPO, DAPO, GSPO), RLOO, ReMax, REINFORCE++, PPO.

    posttrain rl --config cfg.yaml algorithm=grpo ...       (or: posttrain grpo ...)

Every method here is the same loop, parametrized by an advantage estimator, a policy loss, a
KL placement and a loss aggregation (all pure functions in :mod:`posttrain.ops`)::

    prompts --sample G per prompt--> completions (+ rollout log-probs, finished/truncated)
            --reward functions--> rewards (weighted; None / NaN excluded and counted)
            --policy / reference forward, the one log-prob path--> old, ref log-probs (+ critic values)
            --advantage estimator--> advantages (per token with a critic: GAE)
            --loss.epochs x loss.mini_batches--> policy loss (+ KL in the loss, - entropy bonus)
            --aggregate_loss (global counts)--> the shared engine step (+ value loss with a critic)

A preset (``algorithm=grpo`` ...) only fills the ``loss.*`` keys left unset (null); any part
can be changed on its own (``algorithm=grpo loss.policy_loss=cispo``). The loop reads what the
estimator and the loss *declare* (groups, a greedy baseline, old log-probs) and never tests a
preset's name.

How the loop sits on the engine: the engine asks the plan for each optimizer step's
micro-batches. The RL plan samples a new rollout batch at the first optimizer step of each
*iteration* (``loss.epochs * loss.mini_batches`` optimizer steps train on one rollout batch),
with the weights of that moment, so the engine's accumulation, clipping, NaN guard,
checkpoints and logging are shared with every other method. Rollouts are seeded from
(seed, iteration); checkpoints fall on iteration boundaries and carry the loop's state (the
prompt cursor, the adaptive KL coefficient, the monitors), so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import unused_notes, validated
from ..data import EncodedExample, load_records
from ..data.chat import render_prompt
from ..errors import ConfigError, DataError, TrainingError
from ..models.loading import (
    accelerator_for,
    check_model_fits,
    check_same_vocabulary,
    load_policy,
    read_paths,
    tokenizer_for,
)
from ..models.logprobs import selected_log_probs
from ..models.peft import apply_peft
from ..ops import (
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    exact_kl,
    gae_advantages,
    get_advantage_estimator,
    get_policy_loss,
    kl_estimate,
    kl_penalized_token_rewards,
    masked_sum,
    truncated_importance_weights,
    value_loss,
)
from ..rewards import check_reward_fields, compute_rewards, resolve_reward_functions
from ..rollout import HFSampler, Rollout, RolloutBackend, SamplingParams, my_share, place_groups, requests
from ..train.engine import FitResult, fit, to_device
from ..data.fields import check_builtin
from ..train.plan import gather_objects, rank_world, share_layout, spread_eval_every
from ..train.rundir import check_output_dir
from .critic import (
    PolicyWithCritic,
    check_critic_fits,
    critic_from_policy,
    critic_values,
)
from .rl_config import (
    BUILTIN_PROMPTS,
    CRITIC_INITS,
    PRESETS,
    CriticConfig,
    MonitorConfig,
    RewardConfig,
    RLConfig,
    RLDataConfig,
    RLLossConfig,
    RolloutConfig,
    check_sequence_level_aggregation,
)
from .rl_monitor import RLState
from .rl_report import plot_rl_curves
from .sequences import collate_groups, reference_policy

# --------------------------------------------------------------------------- prompt data


@dataclass
class PromptItem:
    """A training prompt: token ids, its text for the reward functions, and the record's fields."""

    ids: list[int]
    text: str
    fields: dict
    prompt: str | list | None = None   # the record's prompt as given (string or messages)


def world_problem_records(n: int, *, split: str, seed: int) -> list[dict]:
    from ..world.datasets import problem_record
    from ..world.tasks import generate_problems

    return [problem_record(p) for p in generate_problems(n, seed=seed, split=split)]


def load_prompt_source(spec: str, cfg: RLDataConfig, seed: int, key: str = "data.train"):
    check_builtin(spec, cfg.fields, key)
    if not str(spec).strip():
        raise ConfigError(f"Config key '{key}' is empty.", fix=f"set {key} to a JSONL / Parquet file or {BUILTIN_PROMPTS}.")
    if spec in (BUILTIN_PROMPTS, BUILTIN_PROMPTS + "-heldout"):
        split = "heldout" if spec.endswith("-heldout") else "train"
        n = cfg.world_examples if split == "train" else cfg.world_eval_examples
        return load_records(world_problem_records(n, split=split, seed=seed), "prompt_answer")
    if spec.startswith("builtin:"):
        raise ConfigError(f"Unknown built-in prompt set '{spec}'; built-in RL prompts are {BUILTIN_PROMPTS} and "
                          f"{BUILTIN_PROMPTS}-heldout.", fix="use one of those or a file path.")
    ds = load_records(spec, fields=cfg.fields)
    if not all("prompt" in r for r in ds.records[:1]):
        raise DataError(f"{ds.source} holds {ds.format} records, which have no 'prompt' field to sample from.",
                        fix=f"give {key} records with a 'prompt' (e.g. {{\"prompt\": ..., \"answer\": ...}}).")
    return ds


def prompt_text(prompt) -> str:
    """What the reward functions see as the prompt: the string, or the last user message's text."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return str(users[-1] if users else prompt[-1].get("content", ""))


def encode_prompts(ds, tokenizer, *, max_prompt_length: int) -> tuple[list[PromptItem], int]:
    """Chat-render every record's prompt; records over ``max_prompt_length`` tokens are dropped
    (returned count)."""
    items, dropped = [], 0
    for i, r in enumerate(ds.records):
        try:
            ids = render_prompt(tokenizer, r["prompt"])
        except DataError as e:
            raise DataError(f"{ds.where(i, 'prompt')}: {e}", fix="correct the prompt.") from None
        if len(ids) > max_prompt_length:
            dropped += 1
            continue
        fields = {k: v for k, v in r.items() if k != "prompt"}
        items.append(PromptItem(ids=ids, text=prompt_text(r["prompt"]), fields=fields, prompt=r["prompt"]))
    return items, dropped


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


def _per_sequence(values: torch.Tensor, batch: dict, n_seq: int) -> list[list[float]]:
    """Flat per-token ``values`` (M,) of a collated batch -> one list per sequence, in token order."""
    padded = _padded(values, batch["lp_seq"], n_seq, batch["mask"].shape[1]).cpu()
    counts = torch.bincount(batch["lp_seq"].cpu(), minlength=n_seq).tolist()
    return [padded[i, : counts[i]].tolist() for i in range(n_seq)]


def _rows(lists: list[list[float]], width: int) -> torch.Tensor:
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
        if "tis_weights" in batch:
            per_token = per_token * batch["tis_weights"]
        n_tok = totals["tokens"].clamp(min=1)
        metrics = {k: masked_sum(v.detach().float(), mask) / n_tok for k, v in m.items()}
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
        batch["advantages"] = _rows([s.token_advantages for s in flat], width)
    else:
        batch["advantages"] = torch.tensor([s.advantage for s in flat], dtype=torch.float32)
    if with_values:  # the critic's targets and its old predictions
        batch["returns"] = _rows([s.returns for s in flat], width)
        batch["old_values"] = _rows([s.old_values for s in flat], width)
    if with_old:
        batch["old_logps"] = _rows([s.old_logps for s in flat], width)
    if with_ref:
        batch["ref_logps"] = _rows([s.ref_logps for s in flat], width)
    batch["num_input_tokens"] = sum(len(s.example) for s in flat)
    return batch


# --------------------------------------------------------------------------- the plan (rollouts)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "little") % (2**63)


def epoch_order_indices(n: int, start: int, count: int, epoch_seed) -> list[int]:
    """Positions ``start .. start+count-1`` of the endless sequence of shuffles of ``range(n)``,
    epoch ``e`` shuffled by ``random.Random(epoch_seed(e))`` (a new order per pass over the data)."""
    out, orders = [], {}
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(epoch_seed(epoch)).shuffle(orders[epoch])
        out.append(orders[epoch][i])
    return out


class RolloutPlan:
    """The engine's plan for online RL: iteration ``k`` covers optimizer steps
    ``k * E * M ... (k + 1) * E * M - 1`` (E = loss.epochs, M = loss.mini_batches). Its first step
    samples the rollout batch with the current weights; each epoch shuffles the batch's groups
    (seeded) into M mini-batches of whole groups, each split into micro-batches of
    ``micro_batch_size`` groups.

    With N processes, every process holds the whole rollout batch (each samples and scores a
    share of the groups, then they exchange them) and process r trains micro-batches r, r+N, ...
    of each optimizer step. A step with fewer micro-batches than processes has its groups
    re-split into N micro-batches; a process whose share is short (fewer groups than processes, or
    a number of micro-batches that is not a multiple of N) runs a zero-weight copy of a group, so
    every process runs the same number of forward / backward passes
    (:func:`posttrain.train.plan.share_layout`)."""

    samples_from_model = True  # the engine refuses to shard it (train.sharding)

    def __init__(self, runner: RLRunner, total_steps: int):
        self.r = runner
        self.total = total_steps
        self.per_iter = runner.loss.epochs * runner.loss.mini_batches
        self.iteration = -1
        self.groups: list[list[Sample]] = []
        self.last: list[dict] = []
        self.rank, self.world = rank_world()

    def num_steps(self) -> int:
        return self.total

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(["rl", self.total, self.per_iter, self.r.seed]).encode())
        for p in self.r.prompts:
            h.update(json.dumps([p.ids, p.fields], sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def micro_batch_layout(self, iteration: int, epoch: int, mb: int, n_groups: int) -> list[list[int]]:
        """The group indices of each micro-batch of mini-batch ``mb`` in ``epoch`` of ``iteration``
        (the epoch's seeded shuffle, every ``M``-th group, chunks of ``micro_batch_size``), for all
        processes (:meth:`share` gives this process its share)."""
        order = list(range(n_groups))
        random.Random(_seed("rl-epoch", self.r.seed, iteration, epoch)).shuffle(order)
        m = self.r.loss.mini_batches
        # dynamic sampling can keep fewer groups than mini-batches: an empty share takes the whole batch
        chosen = order[mb::m] or order
        size = self.r.micro_batch_size
        return [chosen[i:i + size] for i in range(0, len(chosen), size)]

    def share(self, micro: list[list[int]]) -> list[list[int]]:
        """This process's micro-batches of a step's ``micro`` (:func:`posttrain.train.plan.share_layout`:
        micro-batches r, r+N, ..., the same number on every process; ``~i`` (negative) stands for a
        zero-weight copy of group ``i``)."""
        return share_layout(micro, self.rank, self.world)

    def first_epoch_layout(self, iteration: int, n_groups: int) -> list[list[int]]:
        """This process's micro-batches of the first epoch, in training order."""
        out = []
        for mb in range(self.r.loss.mini_batches):
            out.extend(self.share(self.micro_batch_layout(iteration, 0, mb, n_groups)))
        return out

    def batches(self, step: int) -> list[dict]:
        k = step // self.per_iter
        if k != self.iteration:
            self.iteration = k
            self.groups = self.r.rollout(k, self)
        epoch, mb = divmod(step % self.per_iter, self.r.loss.mini_batches)
        layout = self.share(self.micro_batch_layout(self.iteration, epoch, mb, len(self.groups)))
        self.last = []
        for ids in layout:
            batch = self.r.collate([group_of(self.groups, i) for i in ids])
            if all(i < 0 for i in ids):  # a zero-weight copy: no work to count
                batch["num_input_tokens"] = 0
            self.last.append(batch)
        return self.last

    def probe_batches(self) -> list[dict]:
        """The engine's end-of-run probe: the last step's micro-batches (no new rollout)."""
        return self.last


def group_of(groups: list[list[Sample]], i: int) -> list[Sample]:
    """Group ``i``, or for ``~i`` a copy of it that trains nothing (zero weight)."""
    if i >= 0:
        return groups[i]
    return [dataclasses.replace(s, trained=False) for s in groups[~i]]


# --------------------------------------------------------------------------- the runner


# estimator keyword -> loss.* config key where the names differ
_ESTIMATOR_KEYS = {"eps": "advantage_eps", "whiten": "whiten_advantages"}


class RLRunner:
    """Everything the rollout side needs: models, prompts, reward functions, settings."""

    def __init__(self, cfg: RLConfig, loss: RLLossConfig, *, model, tokenizer, reference, prompts, rewards, gold,
                 algorithm: OnlineRLAlgorithm, state: RLState, out_dir: Path, log, critic=None):
        self.cfg, self.loss = cfg, loss
        self.model, self.tokenizer, self.reference = model, tokenizer, reference
        self.backend: RolloutBackend = HFSampler(model, tokenizer, batch_size=cfg.rollout.batch_size)
        self.critic = critic
        self.prompts: list[PromptItem] = prompts
        self.rewards, self.gold = rewards, gold
        self.algorithm, self.state = algorithm, state
        self.seed = cfg.train.seed
        self.micro_batch_size = cfg.train.micro_batch_size
        self.estimator = get_advantage_estimator(loss.advantage)
        self.est_hparams = {h: getattr(loss, _ESTIMATOR_KEYS.get(h, h)) for h in self.estimator.hyperparameters}
        self.out_dir = out_dir
        self.log = log
        self.attn = str(getattr(model.config, "_attn_implementation", "sdpa"))
        self.row_length = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
        self.needs_old = loss.epochs * loss.mini_batches > 1 or loss.tis_cap is not None or \
            (loss.kl_beta > 0 and loss.kl_placement == "reward")
        self.pad_id = tokenizer.pad_token_id
        self.process = None
        if cfg.reward.process_weight > 0:
            from ..rewards.process import StepScorer

            self.process = StepScorer(cfg.reward.process_reward_model, tokenizer=tokenizer,
                                      device=str(next(model.parameters()).device),
                                      batch_size=cfg.reward.reward_model_batch_size, key="reward.process_reward_model")
            check_same_vocabulary(self.process.model, model, key="reward.process_reward_model")
            from ..models.loading import check_same_tokenizer

            check_same_tokenizer(cfg.reward.process_reward_model, tokenizer, key="reward.process_reward_model",
                                 why="process rewards are placed at the policy's token positions",
                                 fix="train the PRM from the policy's model family (posttrain prm "
                                 "model.name_or_path=<the policy>), or score whole solutions with reward.functions="
                                 "[prm] and reward.process_weight=0.")

    # -- prompts
    def _next_prompts(self, n: int) -> list[int]:
        """The next ``n`` prompt indices in a seeded per-epoch order (the cursor is checkpointed)."""
        out = epoch_order_indices(len(self.prompts), self.state.cursor, n,
                                  lambda epoch: _seed("rl-prompts", self.seed, epoch))
        self.state.cursor += n
        return out

    def collate(self, groups: list[list[Sample]]) -> dict:
        batch = collate_samples(groups, pad_token_id=self.pad_id, attn_implementation=self.attn,
                                row_length=self.row_length, with_old=self.needs_old, with_ref=self.reference is not None,
                                with_values=self.critic is not None)
        if self.loss.tis_cap is not None:
            batch["tis_weights"] = self._tis(groups)
        return batch

    def _tis(self, groups) -> torch.Tensor:
        flat = [s for g in groups for s in g]
        width = max(s.n_tokens for s in flat)
        mask = torch.zeros((len(flat), width))
        for i, s in enumerate(flat):
            mask[i, : s.n_tokens] = 1.0
        w, _ = truncated_importance_weights(_rows([s.old_logps for s in flat], width),
                                            _rows([s.rollout_logps for s in flat], width), mask,
                                            cap=self.loss.tis_cap, level=self.loss.tis_level)
        return w

    # -- one rollout batch
    @torch.no_grad()
    def rollout(self, k: int, plan: RolloutPlan) -> list[list[Sample]]:
        ro, loss = self.cfg.rollout, self.loss
        t0 = time.time()
        times = {"generate": 0.0, "score": 0.0, "logprobs": 0.0}
        G = ro.group_size
        kept: list[tuple[list[int], list[Rollout], dict]] = []  # (prompt idx, rollouts, reward rows)
        metrics_parts = []
        rounds = 0
        want = ro.prompts_per_step
        dropped_groups = 0
        drawn = 0
        dropped: list = []
        while True:
            # later rounds draw enough prompts to fill the batch at the keep rate seen so far
            missing = want - len(kept)
            n = want if rounds == 0 else min(4 * want, math.ceil(missing / max(len(kept) / drawn, 0.25)))
            idx = self._next_prompts(n)
            drawn += n
            rolls, scored = self._sample_scored(idx, G, ro.temperature, _seed("rl-sample", self.seed, k, rounds), times)
            metrics_parts.append(scored)
            for gi, i in enumerate(idx):
                rows = slice(gi * G, (gi + 1) * G)
                group = (i, rolls[rows], {k2: v[rows] for k2, v in scored.items() if torch.is_tensor(v)})
                if loss.dynamic_sampling and G > 1 and _zero_variance(group[2]["total"], group[2]["valid"]):
                    dropped_groups += 1
                    dropped.append(group)
                    continue
                kept.append(group)
            rounds += 1
            if not loss.dynamic_sampling or len(kept) >= want or rounds > loss.dynamic_sampling_rounds:
                break
        kept = kept[:want]
        if loss.dynamic_sampling and len(kept) < want:
            self.log(f"note: iteration {k + 1}: dynamic sampling found {len(kept)} of {want} prompt groups with "
                     f"differing rewards after {rounds} rounds; training on those.")
        if not kept:  # nothing to learn from: train on zero-advantage groups (a no-op gradient), say so
            kept = dropped[:want]
            self.log(f"warning: iteration {k + 1}: every sampled group had identical rewards after {rounds} sampling "
                     "rounds, so this iteration's gradient is zero. Raise loss.dynamic_sampling_rounds, "
                     "rollout.temperature or rollout.group_size, or check that the rewards can tell completions apart.")
        # baseline rollouts (ReMax): the greedy completion of each prompt, scored the same way
        baseline = None
        if self.estimator.needs_baseline:
            _, bs = self._sample_scored([g[0] for g in kept], 1, 0.0, 0, times)
            base = torch.where(bs["valid"], bs["total"], torch.full_like(bs["total"], float("nan")))
            baseline = base.repeat_interleave(G)
        # samples
        groups: list[list[Sample]] = []
        for _, rolls, rows in kept:
            group = []
            for j, r in enumerate(rolls):
                ex = EncodedExample(input_ids=r.prompt_ids + r.completion_ids,
                                    labels=[-100] * len(r.prompt_ids) + r.completion_ids)
                trained = bool(rows["valid"][j]) and not (ro.mask_truncated and not r.finished)
                group.append(Sample(example=ex, n_tokens=len(r.completion_ids), advantage=0.0,
                                    trained=trained, rollout_logps=r.log_probs))
                if "token_rewards" in rows:  # per-token reward functions (teacher_logprob), token-level estimators
                    group[-1].token_rewards = rows["token_rewards"][j, : len(r.completion_ids)].tolist()
            groups.append(group)
        total = torch.cat([g[2]["total"] for g in kept])
        valid = torch.cat([g[2]["valid"] for g in kept])
        # what the token-level estimators put at the last token: the sequence reward less the per-token functions'
        seq_total = torch.cat([g[2]["seq_total"] for g in kept]) if "seq_total" in kept[0][2] else total
        process_metrics = {}
        if self.process is not None:
            from ..rewards.process import process_token_rewards

            t = time.time()
            flat_rolls = [r for g in kept for r in g[1]]
            rewards, mismatched = process_token_rewards(
                self.process, [self.prompts[i].text for i, rolls, _ in kept for _ in rolls],
                [r.completion_ids for r in flat_rolls], mode=self.cfg.reward.process_mode)
            for smp, r in zip((s for g in groups for s in g), rewards):
                smp.process_rewards = r
            times["score"] += time.time() - t
            process_metrics = {"process/reward_sum": sum(sum(r) for r in rewards) / max(1, len(rewards)),
                               "process/reencode_mismatch": float(mismatched)}
        # old / reference log-probs through the training layout
        t = time.time()
        if self.needs_old or self.reference is not None or self.critic is not None:
            self._attach_logprobs(groups, plan.first_epoch_layout(k, len(groups)))
        times["logprobs"] += time.time() - t
        kl_seq = None
        if self.reference is not None:
            flat = [s for g in groups for s in g]
            pol = [s.old_logps if s.old_logps is not None else s.rollout_logps for s in flat]
            kl_seq = torch.tensor([sum(a - b for a, b in zip(p, s.ref_logps)) for p, s in zip(pol, flat)])
        reward_for_adv = total
        if self.estimator.needs_critic:
            adv_metrics = self._token_advantages(groups, seq_total, valid)
        elif self.estimator.token_level:
            adv_metrics = self._token_returns_advantages(groups, seq_total, valid, G)
        elif kl_seq is not None and loss.kl_placement == "reward" and loss.kl_beta > 0:
            beta = self.state.kl.value
            flat = [s for g in groups for s in g]
            est = torch.tensor([float(kl_estimate(torch.tensor(s.old_logps), torch.tensor(s.ref_logps),
                                                  loss.kl_estimator).sum()) for s in flat])
            reward_for_adv = total - beta * est
        if not self.estimator.token_level:
            adv, adv_metrics = self.estimator.fn(reward_for_adv, valid, group_size=G, baseline=baseline,
                                                 **self.est_hparams)
            for s, a in zip((s for g in groups for s in g), adv.tolist()):
                s.advantage = float(a)
        # adaptive KL: update beta from this iteration's KL (KL in the reward: from the next iteration on;
        # KL in the loss: already for this iteration's optimizer steps)
        if kl_seq is not None:
            self.state.kl.update(float(kl_seq[valid].mean()) if valid.any() else 0.0, len(kl_seq))
            self.algorithm.kl_beta = self.state.kl.value  # the in-loss coefficient of this iteration's steps
        times["total"] = time.time() - t0
        self.state.pending = self._metrics(k, kept, groups, total, valid, kl_seq, adv_metrics, times,
                                           dropped_groups, rounds, metrics_parts)
        self.state.pending.update(process_metrics)
        self._write_samples(k, kept, groups)
        self._check_signal(k, self.state.pending, valid)
        return groups

    def _check_signal(self, k: int, m: dict, valid: torch.Tensor) -> None:
        """Warn when an iteration carries no learning signal, and stop when no valid reward has arrived
        for ``monitor.no_reward_steps`` iterations in a row (the policy gradient is zero throughout)."""
        mon, state = self.cfg.monitor, self.state
        if not bool(valid.any()):
            state.no_reward_run += 1
            why = ", ".join(f"{key.split('reward/invalid_', 1)[1]}: {int(v)}" for key, v in m.items()
                            if key.startswith("reward/invalid_") and v) or "none counted"
            text = (f"iteration {k + 1}: no valid reward: every one of the {len(valid)} completions got a NaN or "
                    f"None reward (invalid per function: {why}), so nothing is trained this iteration")
            if mon.no_reward_steps and state.no_reward_run >= mon.no_reward_steps:
                raise TrainingError(
                    f"{text}; that is {state.no_reward_run} iterations in a row (monitor.no_reward_steps="
                    f"{mon.no_reward_steps}), so the run stops.",
                    fix="check the reward functions on a few samples (samples.jsonl has the completions): a reward "
                    "returns None / NaN only for completions it cannot score (e.g. no parseable answer; raise "
                    "rollout.max_new_tokens if they are cut off), and its record fields must be present; "
                    "monitor.no_reward_steps=0 only warns.")
            state._warn("no_reward", f"{text}. The run stops after monitor.no_reward_steps="
                            f"{mon.no_reward_steps} such iterations in a row. Check the reward functions "
                            "(samples.jsonl has the completions).")
            return
        state.no_reward_run = 0
        group_based = self.estimator.needs_groups or bool(self.est_hparams.get("subtract_group_mean"))
        zero = m.get("zero_variance_groups", 0.0)
        if not group_based or self.cfg.rollout.group_size < 2 or self.loss.dynamic_sampling:
            return
        if zero >= 1.0:
            state._warn("zero_variance_all", (
                f"iteration {k + 1}: every prompt group had identical rewards, so the group-relative "
                "advantages and this iteration's policy gradient are zero (the KL and entropy terms aside). "
                "Set loss.dynamic_sampling=true (resample such groups), raise rollout.temperature or "
                "rollout.group_size, or use harder prompts / a reward that tells the completions apart."))
        elif k == 0 and mon.zero_variance_warn and zero >= mon.zero_variance_warn:
            state._warn("zero_variance", (
                f"iteration {k + 1}: {zero:.0%} of the prompt groups had identical rewards (at or above "
                f"monitor.zero_variance_warn={mon.zero_variance_warn}); those groups give no gradient, so the "
                "policy starts too peaked (or the prompts too easy or too hard) to learn much. Set "
                "loss.dynamic_sampling=true, raise rollout.temperature or rollout.group_size, or pick prompts "
                "the model solves only sometimes."))

    def _sample_scored(self, idx: list[int], G: int, temperature: float, seed: int, times: dict):
        """``G`` rollouts of each prompt ``idx[p]`` (group id ``p``) and their scores. With N
        processes, process r samples and scores groups r, r+N, ... and the shares are exchanged,
        so every process returns the whole batch (the same as a single process would)."""
        ro = self.cfg.rollout
        _, world = rank_world()
        mine = my_share(len(idx))
        t = time.time()
        rolls = self.backend.generate(
            requests([self.prompts[idx[p]].ids for p in mine], mine),
            SamplingParams(ro.max_new_tokens, temperature, ro.top_p, ro.top_k, n=G, seed=seed))
        times["generate"] += time.time() - t
        t = time.time()
        scored = self._score([idx[p] for p in mine], rolls) if mine else None
        times["score"] += time.time() - t
        if world == 1:
            return rolls, scored
        parts = [part for part in gather_objects((mine, rolls, scored)) if part[0]]
        full = place_groups([(ps, rs) for ps, rs, _ in parts], len(idx), G)
        merged: dict = {"invalid_counts": {}}
        for key, v in parts[0][2].items():
            if torch.is_tensor(v):
                out = torch.empty((len(idx) * G, *v.shape[1:]), dtype=v.dtype)
                for ps, _, sc in parts:
                    rows = torch.tensor([p * G + j for p in ps for j in range(G)])
                    out[rows] = sc[key]
                merged[key] = out
        for _, _, sc in parts:
            for name, c in sc["invalid_counts"].items():
                merged["invalid_counts"][name] = merged["invalid_counts"].get(name, 0) + c
        return full, merged

    def _token_shaping(self, flat: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mask, kl, process)`` ``(B, T)`` of a rollout batch for the token-level estimators: the
        trained tokens, the per-token KL estimate when the KL sits in the reward (zeros otherwise; the
        caller multiplies by beta) and the per-token rewards: the PRM's step rewards (times
        reward.process_weight) at the tokens that end the steps, plus the per-token reward functions'
        values at every token (teacher_logprob's log p_T - log p_S; weighted); zeros without either."""
        loss = self.loss
        width = max(s.n_tokens for s in flat)
        mask = torch.zeros((len(flat), width))
        for i, s in enumerate(flat):
            if s.trained:
                mask[i, : s.n_tokens] = 1.0
        kl = torch.zeros_like(mask)
        if self.reference is not None and loss.kl_placement == "reward":
            kl = kl_estimate(_rows([s.old_logps for s in flat], width), _rows([s.ref_logps for s in flat], width),
                             loss.kl_estimator)
        process = torch.zeros_like(mask)
        if self.process is not None:
            process = self.cfg.reward.process_weight * _rows([s.process_rewards for s in flat], width) * mask
        if flat[0].token_rewards is not None:
            process = process + _rows([s.token_rewards for s in flat], width) * mask
        return mask, kl, process

    def _token_returns_advantages(self, groups: list[list[Sample]], total: torch.Tensor, valid: torch.Tensor,
                                  G: int) -> dict:
        """REINFORCE++ (critic-free, per token): the return-to-go of ``-beta * k`` per token (+ process
        rewards) plus the sequence reward, whitened over the batch's trained tokens."""
        flat = [s for g in groups for s in g]
        mask, kl, process = self._token_shaping(flat)
        beta = self.state.kl.value if self.loss.kl_placement == "reward" else 0.0
        token_rewards = torch.where(mask != 0, -beta * kl, torch.zeros_like(kl)) + process
        adv, metrics = self.estimator.fn(total, valid, group_size=G, token_rewards=token_rewards, mask=mask,
                                         **self.est_hparams)
        for i, s in enumerate(flat):
            s.token_advantages = adv[i, : s.n_tokens].tolist()
        return metrics

    def _token_advantages(self, groups: list[list[Sample]], total: torch.Tensor, valid: torch.Tensor) -> dict:
        """GAE over per-token rewards: the sequence reward at the last token, ``-beta * k`` on every
        token when the KL sits in the reward; values from the critic before this iteration's updates.
        Excluded samples take part in no statistic (whitening included)."""
        flat = [s for g in groups for s in g]
        mask, kl, process = self._token_shaping(flat)
        width = mask.shape[1]
        scores = torch.where(valid, total, torch.zeros_like(total)).float()
        beta = self.state.kl.value if self.reference is not None and self.loss.kl_placement == "reward" else 0.0
        token_rewards = kl_penalized_token_rewards(scores, kl, mask, beta) + process
        values = _rows([s.old_values for s in flat], width)
        adv, returns = gae_advantages(token_rewards, values, mask, **self.est_hparams)
        for i, s in enumerate(flat):
            s.token_advantages = adv[i, : s.n_tokens].tolist()
            s.returns = returns[i, : s.n_tokens].tolist()
        n = mask.sum().clamp(min=1)
        v_mean, r_mean = float(masked_sum(values, mask) / n), float(masked_sum(returns, mask) / n)
        r_var = float(masked_sum((returns - r_mean) ** 2, mask) / n)
        resid = returns - values
        resid_mean = float(masked_sum(resid, mask) / n)
        resid_var = float(masked_sum((resid - resid_mean) ** 2, mask) / n)
        return {"value_mean": v_mean, "return_mean": r_mean,
                # 1 - Var(R - V) / Var(R): how much of the returns the old values explain (1 = all)
                "explained_variance": 1.0 - resid_var / r_var if r_var > 0 else float("nan"),
                "token_mean": float(masked_sum(adv, mask) / n)}

    def _score(self, idx: list[int], rolls: list[Rollout]) -> dict:
        G = len(rolls) // max(1, len(idx))
        prompts = [self.prompts[i] for i in idx for _ in range(G)]
        max_new = self.cfg.rollout.max_new_tokens
        res = score_rollouts(self.rewards, prompts, rolls, max_new_tokens=max_new)
        out = {"total": res.total, "valid": res.valid, "invalid_counts": res.invalid_counts}
        for name, v in res.per_function.items():
            out[f"fn/{name}"] = v
        if res.per_token and self.estimator.token_level:
            out.update(self._placed_token_rewards(res, len(rolls)))
        if self.gold:
            g = score_rollouts(self.gold, prompts, rolls, max_new_tokens=max_new)
            out["gold"] = g.total
            for name, v in g.per_function.items():
                out[f"gold/{name}"] = v
        return out

    def _placed_token_rewards(self, res, n: int) -> dict:
        """For the token-level estimators: the per-token reward functions' values (weighted, summed over
        such functions; ``(n, rollout.max_new_tokens)``, 0 after a completion's end and on invalid
        rows) go to the tokens, and ``seq_total`` (the other functions' weighted sum, NaN where
        invalid) is what goes to the last token; ``total`` keeps the full reward for the logs."""
        dense = torch.zeros((n, self.cfg.rollout.max_new_tokens), dtype=torch.float64)
        seq = torch.zeros(n, dtype=torch.float64)
        for f in self.rewards:
            if f.name in res.per_token:
                for i, u in enumerate(res.per_token[f.name]):
                    if u is not None and bool(res.valid[i]):
                        dense[i, : len(u)] += f.weight * torch.tensor(u, dtype=torch.float64)
            else:
                seq += f.weight * torch.where(res.valid, res.per_function[f.name].double(), 0.0)
        return {"token_rewards": dense.float(), "seq_total": torch.where(res.valid, seq, math.nan).float()}

    def _attach_logprobs(self, groups: list[list[Sample]], layout: list[list[int]]) -> None:
        """Old (policy before this iteration's updates) and reference log-probs, computed on the
        first epoch's micro-batches (``layout``), so the first mini-batch's ratio is exactly 1."""
        was = self.model.training
        self.model.eval()
        if self.critic is not None:
            self.critic.eval()
        done: set[int] = set()
        try:
            for ids in layout:
                # an empty mini-batch share repeats the batch; ~i is a zero-weight copy
                ids = [i for i in ids if i >= 0 and i not in done]
                done.update(ids)
                if not ids:
                    continue
                mb = [groups[i] for i in ids]
                batch = to_device(collate_samples(mb, pad_token_id=self.pad_id, attn_implementation=self.attn,
                                                  row_length=self.row_length, with_old=False, with_ref=False),
                                  next(self.model.parameters()).device)
                flat = [s for g in mb for s in g]
                if self.needs_old:
                    for s, v in zip(flat, self._seq_logps(self.model, batch, len(flat))):
                        s.old_logps = v
                if self.reference is not None:
                    for s, v in zip(flat, self._seq_logps(self.reference, batch, len(flat))):
                        s.ref_logps = v
                if self.critic is not None:
                    for s, v in zip(flat, self._seq_values(batch, len(flat))):
                        s.old_values = v
        finally:
            self.model.train(was)
            if self.critic is not None:
                self.critic.train(was)
        if rank_world()[1] > 1:  # each process computed its own micro-batches: exchange them
            mine = {i: [(s.old_logps, s.ref_logps, s.old_values) for s in groups[i]] for i in sorted(done)}
            for part in gather_objects(mine):
                for i, rows in part.items():
                    for s, (old, ref, values) in zip(groups[i], rows):
                        s.old_logps, s.ref_logps, s.old_values = old, ref, values

    def _seq_values(self, batch: dict, n_seq: int) -> list[list[float]]:
        return _per_sequence(critic_values(self.critic, batch), batch, n_seq)

    def _seq_logps(self, model, batch: dict, n_seq: int) -> list[list[float]]:
        out = selected_log_probs(model, batch["input_ids"], batch["lp_rows"], batch["lp_targets"],
                                 attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"),
                                 temperature=self.cfg.rollout.temperature)
        return _per_sequence(out["log_probs"], batch, n_seq)

    def _metrics(self, k, kept, groups, total, valid, kl_seq, adv_metrics, times, dropped_groups, rounds,
                 parts) -> dict:
        flat = [s for g in groups for s in g]
        rolls = [r for g in kept for r in g[1]]
        lengths = torch.tensor([float(s.n_tokens) for s in flat])
        truncated = sum(1 for r in rolls if not r.finished)
        m: dict[str, float] = {"iteration": k + 1}
        v = valid
        m["reward/mean"] = float(total[v].mean()) if v.any() else float("nan")
        m["reward/std"] = float(total[v].std()) if int(v.sum()) > 1 else 0.0
        for key in kept[0][2]:
            if key.startswith(("fn/", "gold/")):
                vals = torch.cat([g[2][key] for g in kept])
                ok = torch.isfinite(vals)
                name = key.split("/", 1)[1]
                prefix = "reward" if key.startswith("fn/") else "gold"
                m[f"{prefix}/{name}"] = float(vals[ok].mean()) if ok.any() else float("nan")
        if "gold" in kept[0][2]:
            gold = torch.cat([g[2]["gold"] for g in kept])
            ok = torch.isfinite(gold)
            m["gold/mean"] = float(gold[ok].mean()) if ok.any() else float("nan")
        invalid = {}
        for part in parts:
            for name, c in part["invalid_counts"].items():
                invalid[name] = invalid.get(name, 0) + c
        for name, c in invalid.items():
            m[f"reward/invalid_{name}"] = float(c)
        m["samples_excluded"] = float(sum(1 for s in flat if not s.trained))
        m["response_length/mean"] = float(lengths.mean())
        m["response_length/max"] = float(lengths.max())
        m["truncated_rate"] = truncated / max(1, len(rolls))
        distinct = [len({tuple(r.completion_ids) for r in g[1]}) / len(g[1]) for g in kept]
        m["distinct_rate"] = sum(distinct) / len(distinct)
        G = self.cfg.rollout.group_size
        zero = sum(1 for g in kept if _zero_variance(g[2]["total"], g[2]["valid"])) if G > 1 else 0
        m["zero_variance_groups"] = (zero + dropped_groups) / max(1, len(kept) + dropped_groups)
        if self.loss.dynamic_sampling:
            m["dynamic_sampling/rounds"] = float(rounds)
            m["dynamic_sampling/dropped_groups"] = float(dropped_groups)
        if kl_seq is not None:
            m["rollout/kl_seq"] = float(kl_seq[v].mean()) if v.any() else 0.0
        m["kl_beta"] = float(self.state.kl.value)
        if any(s.old_logps is not None for s in flat):
            diffs = [abs(a - b) for s in flat for a, b in zip(s.old_logps, s.rollout_logps)]
            ratios = [math.exp(a - b) for s in flat for a, b in zip(s.old_logps, s.rollout_logps)]
            m["mismatch/logprob_abs_diff"] = sum(diffs) / max(1, len(diffs))
            m["mismatch/max_ratio"] = max(ratios) if ratios else 1.0
        for key, val in adv_metrics.items():
            m[f"advantage/{key}"] = float(val.float().mean()) if torch.is_tensor(val) else float(val)
        for key, val in times.items():
            m[f"time/rollout_{key}"] = val
        if truncated / max(1, len(rolls)) > 0.5 and not self.state.warned.get("truncation"):
            self.state.warned["truncation"] = True
            self.log(f"warning: {truncated} of {len(rolls)} completions hit rollout.max_new_tokens="
                     f"{self.cfg.rollout.max_new_tokens} without stopping; their rewards are of unfinished "
                     "answers. Raise rollout.max_new_tokens, or set rollout.mask_truncated=true.")
        return m

    def _write_samples(self, k: int, kept, groups) -> None:
        every = self.cfg.rollout.samples_every
        if not every or k % every or rank_world()[0] != 0:   # only rank 0 writes
            return
        path = self.out_dir / "samples.jsonl"
        with path.open("a", encoding="utf-8") as fh:
            for (i, rolls, rows), g in zip(kept, groups):
                for j, (r, s) in enumerate(zip(rolls, g)):
                    reward = float(rows["total"][j])
                    record = {"iteration": k + 1, "prompt": self.prompts[i].text, "completion": r.text,
                              "reward": reward if math.isfinite(reward) else None,
                              "advantage": s.advantage, "finished": r.finished, "tokens": s.n_tokens}
                    if s.token_advantages is not None:  # per completion token (GAE, REINFORCE++)
                        record.update(advantage=None, token_advantages=s.token_advantages)
                        if s.returns is not None:
                            record.update(returns=s.returns, values=s.old_values)
                    if s.process_rewards is not None:
                        record["process_rewards"] = s.process_rewards
                    if s.token_rewards is not None:  # the per-token reward functions' values (teacher_logprob)
                        record["token_rewards"] = s.token_rewards
                    fh.write(json.dumps(record) + "\n")


def _zero_variance(total: torch.Tensor, valid: torch.Tensor) -> bool:
    vals = total[valid]
    return vals.numel() < 2 or bool((vals == vals[0]).all())


def score_rollouts(functions, prompts: list[PromptItem], rolls: list[Rollout], *, max_new_tokens: int):
    """Rewards of ``rolls`` (``rolls[i]`` completes ``prompts[i]``): every function sees the prompt
    text, the completion text, ``completion_ids``, ``finished``, ``max_new_tokens``,
    ``prompt_ids`` (the chat-rendered prompt) and the prompt record's other fields. Returns a
    :class:`posttrain.rewards.base.RewardResult`."""
    fields = {name: [p.fields.get(name) for p in prompts] for name in (prompts[0].fields if prompts else ())}
    return compute_rewards(functions, [p.text for p in prompts], [r.text for r in rolls],
                           completion_ids=[r.completion_ids for r in rolls], finished=[r.finished for r in rolls],
                           max_new_tokens=max_new_tokens, prompt_ids=[r.prompt_ids for r in rolls], **fields)


def load_prompt_sets(data: RLDataConfig, tokenizer, *, seed: int, log) -> tuple[list[PromptItem], list[PromptItem], str]:
    """The training prompts (chat-rendered, over-long ones dropped and counted), the held-out
    prompts (``data.eval``; ``auto``: the world's held-out problems for the world's prompts) and
    the training source's name."""
    train_ds = load_prompt_source(data.train, data, seed)
    prompts, dropped = encode_prompts(train_ds, tokenizer, max_prompt_length=data.max_prompt_length)
    log(f"train prompts {train_ds.source}: {len(prompts)} prompts"
        + (f", {dropped} longer than data.max_prompt_length={data.max_prompt_length} dropped" if dropped else ""))
    if not prompts:
        raise DataError(f"No training prompts are left from {train_ds.source}.",
                        fix="raise data.max_prompt_length or check the data.")
    eval_spec = data.eval
    if eval_spec == "auto":
        eval_spec = BUILTIN_PROMPTS + "-heldout" if data.train == BUILTIN_PROMPTS else None
    eval_prompts: list[PromptItem] = []
    if eval_spec:
        eval_ds = load_prompt_source(eval_spec, data, seed, key="data.eval")
        eval_prompts, _ = encode_prompts(eval_ds, tokenizer, max_prompt_length=data.max_prompt_length)
    return prompts, eval_prompts, train_ds.source


def build_rewards(reward: RewardConfig, tokenizer, device, *, max_new_tokens: int, overlong: bool = False,
                  teacher=None, policy=None, temperature: float = 1.0, attn_implementation: str | None = "sdpa"):
    """The trained reward functions (``reward.functions`` with their weights, plus DAPO's overlong
    punishment when ``overlong``) and the gold functions (logged only). ``teacher`` (the
    ``teacher.*`` section), ``policy`` and the sampling ``temperature``: for ``teacher_logprob``."""
    names, weights = list(reward.functions), list(reward.weights or [1.0] * len(reward.functions))
    if overlong and "overlong" not in names:
        names.append("overlong")
        weights.append(1.0)
    options = {"overlong_buffer": reward.overlong_buffer or max(1, max_new_tokens // 5),
               "reward_model": reward.reward_model, "reward_model_batch_size": reward.reward_model_batch_size,
               "process_reward_model": reward.process_reward_model,
               "process_aggregation": reward.process_aggregation}
    if teacher is not None:
        options.update(teacher_model=teacher.name_or_path, teacher_dtype=teacher.dtype,
                       teacher_batch_size=teacher.batch_size, teacher_temperature=temperature,
                       teacher_attn_implementation=attn_implementation, policy=policy)
    functions = resolve_reward_functions(names, weights, options=options, tokenizer=tokenizer, device=device)
    gold = resolve_reward_functions(list(reward.gold), None, options=options, tokenizer=tokenizer,
                                    device=device) if reward.gold else []
    return functions, gold


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_prompts(model, tokenizer, prompts: list[PromptItem], functions, *, max_new_tokens: int,
                     batch_size: int = 64) -> dict[str, float]:
    """Greedy completions of held-out prompts, scored with ``functions``: mean reward per function
    (``eval_reward/<name>``) and the mean completion length."""
    if not prompts:
        return {}
    rolls = HFSampler(model, tokenizer, batch_size=batch_size).generate(
        requests([p.ids for p in prompts]), SamplingParams(max_new_tokens, temperature=0.0))
    res = score_rollouts(functions, prompts, rolls, max_new_tokens=max_new_tokens)
    out = {}
    for name, v in res.per_function.items():
        ok = torch.isfinite(v)
        out[f"eval_reward/{name}"] = float(v[ok].mean()) if ok.any() else float("nan")
    out["eval_response_length"] = sum(len(r.completion_ids) for r in rolls) / len(rolls)
    return out


def prompt_evaluator(tokenizer, eval_prompts: list[PromptItem], functions, *, max_new_tokens: int, extra_eval=None):
    """The engine's ``evaluate(model)`` for the sampling methods: greedy held-out completions scored
    with ``functions`` (:func:`evaluate_prompts`), plus ``extra_eval(model)``; None when there is
    nothing to evaluate. A policy trained beside a critic is evaluated alone."""
    if not eval_prompts and extra_eval is None:
        return None

    def evaluate(m) -> dict:
        m = getattr(m, "policy", m)
        metrics = evaluate_prompts(m, tokenizer, eval_prompts, functions,
                                   max_new_tokens=max_new_tokens) if eval_prompts else {}
        if extra_eval is not None:
            metrics.update(extra_eval(m))
        return metrics

    return evaluate


# --------------------------------------------------------------------------- entry point


@dataclass
class RLResult:
    fit: FitResult
    final_dir: Path | None
    loss: RLLossConfig
    eval_metrics: dict = dataclasses.field(default_factory=dict)


def _unused(cfg: RLConfig, loss: RLLossConfig) -> list[str]:
    notes = []
    spec = get_policy_loss(loss.policy_loss)
    for h in ("clip_eps_high", "dual_clip"):
        if getattr(cfg.loss, h) is not None and h not in spec.hyperparameters:
            notes.append(f"loss.{h}={getattr(cfg.loss, h)!r} is not used: policy loss '{loss.policy_loss}' "
                         f"takes {', '.join(spec.hyperparameters) or 'no hyper-parameters'}.")
    if loss.kl_beta == 0:
        notes += unused_notes(cfg.loss, "loss.", ["kl_estimator", "kl_placement", "kl_target"], "loss.kl_beta is 0")
    if not loss.dynamic_sampling:
        notes += unused_notes(cfg.loss, "loss.", ["dynamic_sampling_rounds"], "dynamic sampling is off")
    if loss.tis_cap is None:
        notes += unused_notes(cfg.loss, "loss.", ["tis_level"], "loss.tis_cap is not set")
    if loss.advantage != "reinforce_pp":
        notes += unused_notes(cfg.loss, "loss.", ["subtract_group_mean"], "it applies to loss.advantage=reinforce_pp")
    if "reward_model" not in cfg.reward.functions + cfg.reward.gold:
        notes += unused_notes(cfg.reward, "reward.", ["reward_model"], "no reward_model function is used")
    if "prm" not in cfg.reward.functions + cfg.reward.gold:
        notes += unused_notes(cfg.reward, "reward.", ["process_aggregation"], "no prm function is used")
    if cfg.reward.process_weight == 0:
        notes += unused_notes(cfg.reward, "reward.", ["process_mode"], "reward.process_weight is 0")
        if "prm" not in cfg.reward.functions + cfg.reward.gold:
            notes += unused_notes(cfg.reward, "reward.", ["process_reward_model"], "no prm function is used and "
                                  "reward.process_weight is 0")
    if not {"reward_model", "prm"} & set(cfg.reward.functions + cfg.reward.gold) and cfg.reward.process_weight == 0:
        notes += unused_notes(cfg.reward, "reward.", ["reward_model_batch_size"], "no model scores the rewards")
    if not cfg.teacher.name_or_path:
        notes += unused_notes(cfg.teacher, "teacher.", ["dtype", "batch_size"], "teacher.name_or_path is not set")
    return notes


def run_rl(cfg: RLConfig, *, model=None, tokenizer=None, log=print, extra_eval=None,
           eval_times: int | None = None) -> RLResult:
    """Run online RL as configured (see the module docstring)."""
    cfg = validated(cfg, RLConfig)
    log = log or (lambda line: None)
    loss = cfg.loss.resolved(cfg.algorithm)
    critic_dir = cfg.critic.init if cfg.critic.init not in (None, "none", *CRITIC_INITS) else None
    check_output_dir(cfg.train.output_dir, resume=cfg.train.resume, overwrite=cfg.train.overwrite_output_dir,
                     protect=read_paths(cfg.model, **{"reward.reward_model": cfg.reward.reward_model,
                                                      "reward.process_reward_model": cfg.reward.process_reward_model,
                                                      "critic.init": critic_dir,
                                                      "teacher.name_or_path": cfg.teacher.name_or_path}))
    torch.manual_seed(cfg.train.seed)
    accelerator = accelerator_for(cfg.model)
    tokenizer = tokenizer or tokenizer_for(cfg.model)
    if model is None:
        model = load_policy(cfg.model, accelerator)
    check_model_fits(model, tokenizer, cfg.model, max_length=cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
                     parts={"data.max_prompt_length": cfg.data.max_prompt_length,
                            "rollout.max_new_tokens": cfg.rollout.max_new_tokens})
    if tokenizer.pad_token_id is None:
        raise ConfigError("The tokenizer has no pad token.", fix="set model.pad_token (e.g. to its EOS token).")
    # the critic (only for estimators that need one) copies the policy's backbone before any adapter is added
    critic = None
    if get_advantage_estimator(loss.advantage).needs_critic:
        critic = build_critic(cfg, model, tokenizer, device=str(accelerator.device), log=log)
    model = apply_peft(model, cfg.model.peft, log=log)

    prompts, eval_prompts, train_source = load_prompt_sets(cfg.data, tokenizer, seed=cfg.train.seed, log=log)
    functions, gold = build_rewards(cfg.reward, tokenizer, accelerator.device, max_new_tokens=cfg.rollout.max_new_tokens,
                                    overlong=loss.overlong_penalty, teacher=cfg.teacher, policy=model,
                                    temperature=cfg.rollout.temperature,
                                    attn_implementation=cfg.model.attn_implementation)
    check_reward_fields(functions + gold, set(prompts[0].fields), train_source)

    # reference (only when the KL term is on)
    reference = None
    if loss.kl_beta > 0:
        reference = reference_policy(model)
    kl = (AdaptiveKLController(loss.kl_beta, loss.kl_target, loss.kl_horizon) if loss.kl_target is not None
          else FixedKLController(loss.kl_beta))
    algorithm = OnlineRLAlgorithm(loss, temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                                  critic=cfg.critic)
    algorithm.reference = reference
    # the critic (only for estimators that need one): trained beside the policy by the same engine
    trained = model
    if critic is not None:
        trained = PolicyWithCritic(model, critic, critic_lr=cfg.critic.lr or cfg.train.lr)
    state = RLState(cfg.monitor, kl, log=log, gold=bool(gold))
    out_dir = Path(cfg.train.output_dir)
    runner = RLRunner(cfg, loss, model=model, tokenizer=tokenizer, reference=reference, prompts=prompts,
                      rewards=functions, gold=gold, algorithm=algorithm, state=state, out_dir=out_dir, log=log,
                      critic=critic)
    plan = RolloutPlan(runner, cfg.train.max_steps)
    parts = {k: getattr(loss, k) for k in ("advantage", "policy_loss", "aggregation", "kl_beta")}
    log(f"algorithm {cfg.algorithm}: " + ", ".join(f"{k}={v}" for k, v in parts.items())
        + (f", kl {loss.kl_estimator} in the {loss.kl_placement}" if loss.kl_beta > 0 else "")
        + f"; {cfg.train.max_steps} optimizer steps, {cfg.train.max_steps // plan.per_iter} rollout batches of "
        f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size} samples")
    for note in _unused(cfg, loss):
        log(f"note: {note}")

    evaluate = prompt_evaluator(tokenizer, eval_prompts, functions + gold,
                                max_new_tokens=cfg.rollout.eval_max_new_tokens, extra_eval=extra_eval)
    engine_cfg = cfg.train.engine()
    if eval_times:
        engine_cfg.eval_every = spread_eval_every(plan.num_steps(), eval_times)
    run_config = dataclasses.asdict(cfg)
    run_config["resolved_loss"] = dataclasses.asdict(loss)
    inputs = {"reward_model_sha256": _file_digest(cfg.reward.reward_model)} if cfg.reward.reward_model else {}
    if cfg.reward.process_reward_model:
        inputs["process_reward_model_sha256"] = _file_digest(cfg.reward.process_reward_model)
    if critic_dir:
        inputs["critic_init_sha256"] = _file_digest(critic_dir)
    if cfg.teacher.name_or_path:
        inputs["teacher_sha256"] = _file_digest(cfg.teacher.name_or_path)
    result = fit(trained, algorithm, plan, engine_cfg, tokenizer=tokenizer, accelerator=accelerator,
                 evaluate=evaluate, run_config=run_config, inputs=inputs, log=log,
                 callbacks=[state])
    if accelerator.is_main_process and result.history:
        plot_rl_curves(result.history, result.eval_history, out_dir / "curves.png", title=f"posttrain {cfg.algorithm}")
    return RLResult(fit=result, final_dir=result.final_dir, loss=loss,
                    eval_metrics=result.eval_history[-1] if result.eval_history else {})


def build_critic(cfg: RLConfig, policy, tokenizer, *, device: str, log):
    """The value model as ``critic.init`` says (see :mod:`posttrain.algorithms.critic`)."""
    from .rm import load_reward_model

    init = cfg.critic.init or "policy"
    if init == "policy":
        critic = critic_from_policy(policy, pad_token_id=tokenizer.pad_token_id)
        log("critic: the policy's backbone with a zero value head")
    else:
        path = cfg.reward.reward_model if init == "reward_model" else init
        key = "reward.reward_model" if init == "reward_model" else "critic.init"
        critic = load_reward_model(path, tokenizer, dtype=cfg.model.dtype, device=device,
                                   attn_implementation=cfg.model.attn_implementation, key=key)
        check_critic_fits(critic, policy, source=init)
        log(f"critic: from {path}")
    critic.train()
    return critic


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    p = Path(path)
    for f in sorted(p.glob("*.safetensors")) if p.is_dir() else []:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


__all__ = ["PRESETS", "MonitorConfig", "RLConfig", "RLDataConfig", "RLLossConfig", "RLResult", "RLState",
           "RewardConfig", "RolloutConfig", "run_rl"]
