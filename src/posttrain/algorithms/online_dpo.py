"""Online (iterative) DPO: preference pairs from the model's own samples, scored as they come.

    posttrain online-dpo --config cfg.yaml k=v ...

Each iteration::

    prompts --sample G >= 2 per prompt (the current policy)--> completions
            --reward functions (a verifier, a reward model ...)--> rewards
            --pair: the best completion of a prompt vs its worst (ties skipped and counted)--> pairs
            --reference log-probs (the initial policy, or the policy at this iteration's start)-->
            --online.steps_per_rollout optimizer steps, any paired loss of the DPO family-->

``rollout.prompts_per_step`` pairs per iteration: prompts whose samples all tie give no pair,
so more prompts are drawn (up to ``online.max_sampling_rounds`` extra rounds) and the
iteration trains on what it found. ``online.reference=refresh`` makes the reference the policy
at the start of each iteration (its log-probs come from the policy itself, so no second model
is held); ``initial`` keeps the starting policy (a frozen copy, or the adapter switched off).

It runs on the same engine as every method (checkpoints fall on iteration boundaries and
carry the prompt cursor, so a resume continues exactly), with the offline trainer's
likelihood-displacement monitor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig, TrainConfig, option, unused_notes, validated
from ..data import EncodedExample
from ..data.formats import write_jsonl
from ..errors import ConfigError, TrainingError
from ..models.loading import check_same_vocabulary, load_causal_lm, read_paths
from ..models.peft import apply_peft
from ..ops import get_preference_loss
from ..rewards import check_reward_fields
from ..rollout import SamplingParams, backend_for, generate_shared, requests
from ..rollout.config import check_backend
from ..train.checkpoint import weights_digest
from ..train.engine import FitResult, fit
from ..train.plan import rank_world, share_layout, write_on_main
from ..train.rundir import check_output_dir
from .dpo import DisplacementMonitor, PreferenceAlgorithm, PreferenceLossConfig, Unit, attach_reference
from ..train.curves import plot_rl_curves
from .online import (
    RewardConfig,
    RLDataConfig,
    RolloutConfig,
    build_rewards,
    check_reward_config,
    derive_seed,
    LoopState,
    load_prompt_sets,
    prompt_evaluator,
    refill_count,
    sampling_policy,
    score_rollouts,
)
from .sequences import collate_examples, reference_policy

# --------------------------------------------------------------------------- config


@dataclass
class OnlineConfig:
    """How sampling and training alternate."""

    steps_per_rollout: int = option(1, "k: optimizer steps on each iteration's pairs (split into k mini-batches, "
                                       "each pair used once) before sampling again.", min=1)
    reference: str = option("initial", "initial: the starting policy; refresh: the policy at the start of each "
                                       "iteration (no second model in memory).", choices=("initial", "refresh"))
    max_sampling_rounds: int = option(3, "Extra sampling rounds per iteration when tied groups leave fewer than "
                                         "rollout.prompts_per_step pairs.", min=0)


@dataclass
class OnlineDPOConfig:
    """posttrain online-dpo: DPO-family losses on pairs sampled from the current policy."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(group_size=4, prompts_per_step=8))
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        output_dir="runs/online-dpo", lr=5e-5, micro_batch_size=8, max_steps=100, epochs=0.0, warmup_ratio=0.0,
        min_lr_ratio=1.0))

    def validate(self) -> None:
        check_backend(self.rollout, self.train, "rollout")
        spec = get_preference_loss(self.loss.name)
        if spec.data != "paired":
            raise ConfigError(f"loss.name={self.loss.name} trains on {spec.data} data, but online DPO builds pairs "
                              "(the best vs the worst sample of a prompt).",
                              fix="use a paired loss: dpo, ipo, hinge, dpop, simpo or orpo.")
        if self.rollout.group_size < 2:
            raise ConfigError(f"rollout.group_size is {self.rollout.group_size}; a pair needs two samples of a prompt.",
                              fix="set rollout.group_size to 2 or more (4-8 is usual).")
        if self.loss.reference and self.online.reference == "refresh":
            raise ConfigError(f"loss.reference={self.loss.reference!r} names a fixed reference model, but "
                              "online.reference=refresh uses the policy at each iteration's start.",
                              fix="remove loss.reference, or set online.reference=initial.")
        if self.loss.precompute_reference:
            raise ConfigError("loss.precompute_reference=true: online DPO computes each iteration's reference "
                              "log-probs when it samples (always), so the key does not apply.",
                              fix="remove loss.precompute_reference.")
        if self.train.grad_accum != 1:
            raise ConfigError(f"train.grad_accum={self.train.grad_accum}: an optimizer step's micro-batches follow "
                              "from the iteration's pairs (rollout.prompts_per_step / online.steps_per_rollout pairs, "
                              "train.micro_batch_size pairs per forward pass).",
                              fix="remove train.grad_accum; set online.steps_per_rollout and train.micro_batch_size.")
        if self.train.epochs != 0:
            raise ConfigError(f"train.epochs={self.train.epochs}: online DPO counts optimizer steps "
                              "(train.max_steps), since each iteration samples new pairs.",
                              fix="set train.epochs=0 and train.max_steps=N.")
        k = self.online.steps_per_rollout
        if k > self.rollout.prompts_per_step:
            raise ConfigError(f"online.steps_per_rollout={k} is more than rollout.prompts_per_step="
                              f"{self.rollout.prompts_per_step}: a step would have no pair.",
                              fix="lower online.steps_per_rollout or raise rollout.prompts_per_step.")
        for key in ("max_steps", "save_every"):
            if getattr(self.train, key) % k:
                raise ConfigError(f"train.{key}={getattr(self.train, key)} is not a multiple of "
                                  f"online.steps_per_rollout={k} (checkpoints and the end fall on sampling "
                                  "boundaries, so a resume continues exactly).",
                                  fix=f"set train.{key} to a multiple of {k}.")
        check_reward_config(self.reward, command="online-dpo")


# --------------------------------------------------------------------------- pairing


@dataclass
class Pairing:
    """``pairs``: (prompt position, chosen sample, rejected sample); ``tied``: prompts whose valid
    rewards are all equal; ``too_few_valid``: prompts with fewer than two valid rewards."""

    pairs: list[tuple[int, int, int]]
    tied: int
    too_few_valid: int


def best_worst_pairs(rewards: list[list[float | None]]) -> Pairing:
    """Pair each prompt's highest-reward sample with its lowest (None / NaN rewards are left out).
    Among equal rewards the earliest sample is taken for both ends, so a result is a function of
    the rewards and the sampling order. A prompt whose valid rewards all tie gives no pair."""
    pairs, tied, few = [], 0, 0
    for i, row in enumerate(rewards):
        valid = [(r, j) for j, r in enumerate(row) if r is not None and math.isfinite(r)]
        if len(valid) < 2:
            few += 1
            continue
        best = max(valid, key=lambda t: (t[0], -t[1]))
        worst = min(valid, key=lambda t: (t[0], t[1]))
        if best[0] == worst[0]:
            tied += 1
            continue
        pairs.append((i, best[1], worst[1]))
    return Pairing(pairs=pairs, tied=tied, too_few_valid=few)


# --------------------------------------------------------------------------- the loop


class PairPlan:
    """The engine's plan: iteration ``k`` covers optimizer steps ``k*K .. (k+1)*K - 1``
    (K = online.steps_per_rollout); its first step samples and pairs with the current weights,
    then the pairs are shuffled (seeded) into K mini-batches of micro-batches.

    With N processes every process holds all the iteration's pairs (the sampling is split and
    exchanged, ``generate_shared``; pairing and reference log-probs are computed on the whole
    batch everywhere) and trains its share of each step's micro-batches, r, r+N, ...
    (:func:`posttrain.train.plan.share_layout`: a short share is padded with a zero-weight copy)."""

    samples_from_model = True  # the engine refuses to shard it (train.sharding)

    def __init__(self, cfg: OnlineDPOConfig, *, model, reference, tokenizer, prompts, functions, gold, algo,
                 state: LoopState, log, out_dir: Path):
        self.cfg = cfg
        self.model, self.reference, self.tokenizer = model, reference, tokenizer
        self.backend = backend_for(cfg.rollout, model, tokenizer, key="rollout.backend",
                                   batch_size=cfg.rollout.batch_size,
                                   max_model_len=cfg.data.max_prompt_length + max(cfg.rollout.max_new_tokens,
                                                                                   cfg.rollout.eval_max_new_tokens))
        self.prompts, self.functions, self.gold = prompts, functions, gold
        self.algo, self.state, self.log, self.out_dir = algo, state, log, out_dir
        self.k = cfg.online.steps_per_rollout
        self.seed = cfg.train.seed
        self.attn = str(getattr(model.config, "_attn_implementation", "sdpa"))
        self.row_length = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
        self.iteration = -1
        self.units: list[Unit] = []
        self.last: list[dict] = []
        self.rank, self.world = rank_world()

    def num_steps(self) -> int:
        return self.cfg.train.max_steps

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(["online-dpo", self.cfg.train.max_steps, self.k, self.seed]).encode())
        for p in self.prompts:
            h.update(json.dumps([p.ids, p.fields], sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def _next_prompts(self, n: int) -> list[int]:
        return self.state.next_prompts(len(self.prompts), n,
                                       lambda epoch: derive_seed("online-dpo-prompts", self.seed, epoch))

    def collate_units(self, units: list[Unit]) -> dict:
        return self.algo.collate(units, pad_token_id=self.tokenizer.pad_token_id, packing=True,
                                 row_length=self.row_length, share_prefix=True, attn_implementation=self.attn)

    def collate_seqs(self, seqs: list[EncodedExample]) -> dict:
        return collate_examples(seqs, pad_token_id=self.tokenizer.pad_token_id, packing=True,
                                row_length=self.row_length)

    @torch.no_grad()
    def sample_pairs(self, k: int) -> list[Unit]:
        ro, want = self.cfg.rollout, self.cfg.rollout.prompts_per_step
        t0 = time.time()
        G = ro.group_size
        units: list[Unit] = []
        records: list[dict] = []
        stats = dict(prompts=0, tied=0, too_few_valid=0)
        rewards_all, gold_all, chosen_r, rejected_r = [], [], [], []
        rounds = 0
        while True:
            n = refill_count(want, len(units), stats["prompts"], rounds)
            idx = self._next_prompts(n)
            stats["prompts"] += n
            self.backend.sync_weights(self.model)   # the last optimizer step's weights (vLLM: copied in)
            rolls = generate_shared(
                self.backend, requests([self.prompts[i].ids for i in idx]),
                SamplingParams(ro.max_new_tokens, ro.temperature, ro.top_p, ro.top_k, n=G,
                               seed=derive_seed("online-dpo-sample", self.seed, k, rounds)))
            self.backend.release()   # GPU vLLM: the engine sleeps while the trainer runs
            items = [self.prompts[i] for i in idx for _ in range(G)]
            res = score_rollouts(self.functions, items, rolls, max_new_tokens=ro.max_new_tokens)
            rewards_all.append(res.total[res.valid])
            if self.gold:
                g = score_rollouts(self.gold, items, rolls, max_new_tokens=ro.max_new_tokens)
                gold_all.append(g.total[torch.isfinite(g.total)])
            rows = [[float(v) for v in res.total[i * G:(i + 1) * G]] for i in range(len(idx))]
            pairing = best_worst_pairs(rows)
            stats["tied"] += pairing.tied
            stats["too_few_valid"] += pairing.too_few_valid
            for p, c, r in pairing.pairs:
                if len(units) >= want:
                    break
                rc, rr = rolls[p * G + c], rolls[p * G + r]
                units.append(Unit([rc.training_example(), rr.training_example()]))
                chosen_r.append(rows[p][c])
                rejected_r.append(rows[p][r])
                records.append({"iteration": k + 1, "prompt": self.prompts[idx[p]].text, "chosen": rc.text,
                                "rejected": rr.text, "chosen_reward": rows[p][c], "rejected_reward": rows[p][r]})
            rounds += 1
            if len(units) >= want or rounds > self.cfg.online.max_sampling_rounds:
                break
        if not units:
            raise TrainingError(
                f"online DPO iteration {k + 1}: all {stats['prompts']} sampled prompts gave no pair ({stats['tied']} "
                f"with tied rewards, {stats['too_few_valid']} with fewer than two valid rewards) after {rounds} "
                "sampling rounds, so there is nothing to train on. Checkpoints before this iteration are kept.",
                fix="raise rollout.group_size or rollout.temperature, raise online.max_sampling_rounds, or check that "
                "the reward functions can tell completions apart (a reward that only says right/wrong ties on "
                "prompts the model always or never solves).")
        if len(units) < want:
            self.log(f"note: iteration {k + 1}: found {len(units)} of {want} pairs after {rounds} sampling rounds "
                     f"({stats['tied']} prompts tied); training on those.")
        # reference log-probs: the initial policy, or the policy as it is now (refresh)
        ref_model = self.reference if self.reference is not None else self.model
        was = self.model.training
        self.model.eval()
        try:
            attach_reference(units, ref_model, self.collate_seqs)
        finally:
            self.model.train(was)
        rewards = torch.cat(rewards_all) if rewards_all else torch.zeros(0)
        m = {"iteration": k + 1, "pairs": float(len(units)), "pairs/tied_prompts": float(stats["tied"]),
             "pairs/too_few_valid": float(stats["too_few_valid"]), "pairs/sampled_prompts": float(stats["prompts"]),
             "sampling_rounds": float(rounds),
             "reward/mean": float(rewards.mean()) if rewards.numel() else float("nan"),
             "reward/chosen": sum(chosen_r) / len(chosen_r), "reward/rejected": sum(rejected_r) / len(rejected_r),
             "time/rollout_total": time.time() - t0}
        if gold_all:
            g = torch.cat(gold_all)
            m["gold/mean"] = float(g.mean()) if g.numel() else float("nan")
        self.state.pending = m
        every = ro.samples_every
        if every and k % every == 0:
            write_on_main(write_jsonl, self.out_dir / "pairs.jsonl", records, append=True)
        return units

    def batches(self, step: int) -> list[dict]:
        it = step // self.k
        if it != self.iteration:
            self.iteration = it
            self.units = self.sample_pairs(it)
        self.last = []
        for ids in share_layout(self.micro_batch_layout(it, step % self.k), self.rank, self.world):
            batch = self.collate_units([self.units[i if i >= 0 else ~i] for i in ids])
            if ids[0] < 0:  # [~i]: a zero-weight copy of pair i (PreferenceAlgorithm counts it as nothing)
                batch["zero_weight"] = True
            self.last.append(batch)
        return self.last

    def micro_batch_layout(self, iteration: int, mb: int) -> list[list[int]]:
        """The pair indices of each micro-batch of the iteration's mini-batch ``mb`` (its seeded
        shuffle, every K-th pair, chunks of ``train.micro_batch_size``), for all processes."""
        order = list(range(len(self.units)))
        random.Random(derive_seed("online-dpo-order", self.seed, iteration)).shuffle(order)
        chosen = order[mb::self.k] or order  # fewer pairs than steps: a step repeats the whole set
        size = self.cfg.train.micro_batch_size
        return [chosen[j:j + size] for j in range(0, len(chosen), size)]

    def probe_batches(self) -> list[dict]:
        return self.last


@dataclass
class OnlineDPOResult:
    fit: FitResult
    final_dir: Path | None
    eval_metrics: dict = dataclasses.field(default_factory=dict)


def run_online_dpo(cfg: OnlineDPOConfig, *, model=None, tokenizer=None, log=print, extra_eval=None,
                   eval_times: int | None = None) -> OnlineDPOResult:
    """Run online DPO as configured (see the module docstring)."""
    cfg = validated(cfg, OnlineDPOConfig)
    log = log or (lambda line: None)
    check_output_dir(cfg.train.output_dir, resume=cfg.train.resume, overwrite=cfg.train.overwrite_output_dir,
                     protect=read_paths(cfg.model, **{"loss.reference": cfg.loss.reference,
                                                      "reward.reward_model": cfg.reward.reward_model,
                                                      "reward.process_reward_model": cfg.reward.process_reward_model}))
    spec = get_preference_loss(cfg.loss.name)
    accelerator, tokenizer, model = sampling_policy(cfg, model=model, tokenizer=tokenizer,
                                                   max_new_tokens=cfg.rollout.max_new_tokens,
                                                   new_tokens_key="rollout.max_new_tokens")
    model = apply_peft(model, cfg.model.peft, log=log)
    prompts, eval_prompts, source = load_prompt_sets(cfg.data, tokenizer, seed=cfg.train.seed, log=log)
    functions, gold = build_rewards(cfg.reward, tokenizer, accelerator.device,
                                    max_new_tokens=cfg.rollout.max_new_tokens)
    check_reward_fields(functions + gold, set(prompts[0].fields), source)

    reference = None
    inputs = {}
    if spec.needs_reference and cfg.online.reference == "initial":
        if cfg.loss.reference:
            reference = load_causal_lm(cfg.loss.reference, dtype=cfg.model.dtype, device=str(accelerator.device),
                                       attn_implementation=cfg.model.attn_implementation, key="loss.reference")
            check_same_vocabulary(reference, model, key="loss.reference")
            for p in reference.parameters():
                p.requires_grad_(False)
            reference.eval()
            inputs["reference_weights_sha256"] = weights_digest(reference)
        else:
            reference = reference_policy(model)
    hparams = cfg.loss.hyperparameters(spec.hyperparameters)
    algo = PreferenceAlgorithm(spec, hparams, reference=None)  # reference log-probs travel in the batches
    state = LoopState()
    out_dir = Path(cfg.train.output_dir)
    plan = PairPlan(cfg, model=model, reference=reference, tokenizer=tokenizer, prompts=prompts, functions=functions,
                    gold=gold, algo=algo, state=state, log=log, out_dir=out_dir)
    log(f"online {spec.name}: {cfg.train.max_steps} optimizer steps, {cfg.train.max_steps // plan.k} iterations of "
        f"{cfg.rollout.prompts_per_step} pairs (best vs worst of {cfg.rollout.group_size} samples); reference: "
        + ("none" if not spec.needs_reference else cfg.online.reference) + f"; hyper-parameters {hparams}")
    notes = unused_notes(cfg.rollout, "rollout.", ["mask_truncated"], "every pair is trained on whole")
    notes += unused_notes(cfg.loss, "loss.", ["displacement_window"], "loss.displacement_window is only read "
                          "with a reference") if not spec.needs_reference else []
    if "reward_model" not in cfg.reward.functions + cfg.reward.gold:
        notes += unused_notes(cfg.reward, "reward.", ["reward_model", "reward_model_batch_size"],
                              "no reward_model function is used")
    for note in notes:
        log(f"note: {note}")

    evaluate = prompt_evaluator(tokenizer, eval_prompts, functions + gold,
                                max_new_tokens=cfg.rollout.eval_max_new_tokens, extra_eval=extra_eval,
                                backend=plan.backend if plan.backend.serving_engine else None)
    monitor = DisplacementMonitor(cfg.loss.displacement_window, cfg.loss.displacement_threshold, log=log)
    result = fit(model, algo, plan, cfg.train, tokenizer=tokenizer, accelerator=accelerator,
                 evaluate=evaluate, run_config=dataclasses.asdict(cfg), inputs=inputs, log=log,
                 callbacks=[state, monitor], eval_times=eval_times, eval_at_start=True)
    if accelerator.is_main_process and result.history:
        plot_rl_curves(result.history, result.eval_history, out_dir / "curves.png", title=f"posttrain online-dpo "
                       f"({spec.name})")
    return OnlineDPOResult(fit=result, final_dir=result.final_dir,
                           eval_metrics=result.eval_history[-1] if result.eval_history else {})


__all__ = ["OnlineConfig", "OnlineDPOConfig", "OnlineDPOResult", "Pairing", "best_worst_pairs", "run_online_dpo"]
