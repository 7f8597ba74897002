"""The rollout side of online RL: sample, score, baseline, old / reference log-probs, advantages."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...models.loading import check_same_vocabulary
from ...models.logprobs import selected_log_probs
from ...ops import (
    gae_advantages,
    get_advantage_estimator,
    kl_estimate,
    kl_penalized_token_rewards,
    masked_sum,
    truncated_importance_weights,
)
from ...rollout import Rollout, RolloutBackend, SamplingParams, backend_for, my_share, place_groups, requests
from ...train.engine import to_device
from ...train.plan import gather_objects, rank_world
from .critic import critic_values
from .config import RLConfig, RLLossConfig
from .monitor import RLState
from ..online.prompts import PromptItem
from ..online.scoring import score_rollouts
from ..online.stream import derive_seed, refill_count
from .loss import OnlineRLAlgorithm, Sample, collate_samples, pad_rows, per_sequence
from .monitor import check_signal, rollout_metrics, write_samples, zero_variance


# --------------------------------------------------------------------------- the runner


@dataclass
class ScoredGroup:
    """One prompt's ``G`` rollouts and their scores (``total``, ``valid``, ``fn/<name>``,
    ``gold/<name>``, ... : ``G`` rows each)."""

    prompt: int
    rollouts: list[Rollout]
    scores: dict


@dataclass
class Draw:
    """An iteration's sampling: the groups trained on, the rounds it took, the groups dynamic
    sampling dropped, and each round's scores (for the metrics)."""

    groups: list[ScoredGroup]
    rounds: int
    dropped: int
    parts: list[dict]


def _cat(groups: list[ScoredGroup], key: str) -> torch.Tensor:
    return torch.cat([g.scores[key] for g in groups])


# estimator keyword -> loss.* config key where the names differ
_ESTIMATOR_KEYS = {"eps": "advantage_eps", "whiten": "whiten_advantages"}


class RLRunner:
    """Everything the rollout side needs: models, prompts, reward functions, settings."""

    def __init__(self, cfg: RLConfig, loss: RLLossConfig, *, model, tokenizer, reference, prompts, rewards, gold,
                 algorithm: OnlineRLAlgorithm, state: RLState, out_dir: Path, log, critic=None):
        self.cfg, self.loss = cfg, loss
        self.model, self.tokenizer, self.reference = model, tokenizer, reference
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
        self.episodes = None   # multi-turn episodes (env.name set)
        if cfg.env.name:
            from .multiturn import EpisodeSampler

            self.episodes = EpisodeSampler(cfg)
        self.row_length = cfg.data.max_prompt_length + (cfg.env.max_total_tokens if self.episodes is not None
                                                         else cfg.rollout.max_new_tokens)
        # the rollout backend; with vLLM it also plays the held-out evaluation (the own sampler
        # evaluates through its own batched path)
        self.backend: RolloutBackend = backend_for(
            cfg.rollout, model, tokenizer, key="rollout.backend", batch_size=cfg.rollout.batch_size,
            max_model_len=max(self.row_length, cfg.data.max_prompt_length + cfg.rollout.eval_max_new_tokens))
        self.eval_backend = self.backend if self.backend.serving_engine else None
        # the old log-probs: a pass of their own where the policy moves before a sample is trained (several
        # updates per rollout batch) or the KL goes into the reward. With one update, TIS reads pi_old as
        # the trained forward's own (detached) log-probs in the loss: the same values, one pass fewer.
        self.needs_old = loss.epochs * loss.mini_batches > 1 or (loss.kl_beta > 0 and loss.kl_placement == "reward")
        self.tis_in_loss = loss.tis_cap is not None and not self.needs_old
        self.pad_id = tokenizer.pad_token_id
        self.process = None
        if cfg.reward.process_weight > 0:
            from ...rewards.process import StepScorer

            self.process = StepScorer(cfg.reward.process_reward_model, tokenizer=tokenizer,
                                      device=str(next(model.parameters()).device),
                                      batch_size=cfg.reward.reward_model_batch_size, key="reward.process_reward_model")
            check_same_vocabulary(self.process.model, model, key="reward.process_reward_model")
            from ...models.loading import check_same_tokenizer

            check_same_tokenizer(cfg.reward.process_reward_model, tokenizer, key="reward.process_reward_model",
                                 why="process rewards are placed at the policy's token positions",
                                 fix="train the PRM from the policy's model family (posttrain prm "
                                 "model.name_or_path=<the policy>), or score whole solutions with reward.functions="
                                 "[prm] and reward.process_weight=0.")

    # -- prompts
    def _next_prompts(self, n: int) -> list[int]:
        """The next ``n`` prompt indices in a seeded per-epoch order (the cursor is checkpointed)."""
        return self.state.next_prompts(len(self.prompts), n, lambda epoch: derive_seed("rl-prompts", self.seed, epoch))

    def collate(self, groups: list[list[Sample]]) -> dict:
        batch = collate_samples(groups, pad_token_id=self.pad_id, attn_implementation=self.attn,
                                row_length=self.row_length, with_old=self.needs_old, with_ref=self.reference is not None,
                                with_values=self.critic is not None)
        if self.tis_in_loss:    # the loss weighs with its own detached log-probs as pi_old
            flat = [s for g in groups for s in g]
            batch["rollout_logps"] = pad_rows([s.rollout_logps for s in flat], batch["mask"].shape[1])
        elif self.loss.tis_cap is not None:
            batch["tis_weights"] = self.tis(groups)[0]
        return batch

    def tis(self, groups) -> tuple[torch.Tensor, dict]:
        """The truncated / masked importance weights of ``groups``' tokens and their metrics."""
        flat = [s for g in groups for s in g]
        width = max(s.n_tokens for s in flat)
        mask = torch.zeros((len(flat), width))
        for i, s in enumerate(flat):
            mask[i, : s.n_tokens] = 1.0
        w, metrics = truncated_importance_weights(pad_rows([s.old_logps for s in flat], width),
                                                  pad_rows([s.rollout_logps for s in flat], width), mask,
                                                  cap=self.loss.tis_cap, level=self.loss.tis_level,
                                                  mode=self.loss.tis_mode)
        return w, {k: v[mask.bool()] for k, v in metrics.items()}

    # -- one rollout batch
    @torch.no_grad()
    def rollout(self, k: int, layout) -> list[list[Sample]]:
        """Rollout batch ``k``: its groups of samples, advantages attached. ``layout(n_groups)``: this
        process's first-epoch micro-batches (group indices), where the old / reference log-probs
        are computed."""
        t0 = time.time()
        times = {"generate": 0.0, "score": 0.0, "logprobs": 0.0}
        self.backend.sync_weights(self.model)              # the weights of the last optimizer step (vLLM: copied in)
        draw = self._draw(k, times)                        # sample and score (dynamic sampling: until enough)
        kept = draw.groups
        baseline = self._baseline(kept, times)             # ReMax: the greedy completion's reward
        self.backend.release()                             # GPU vLLM: free the engine's memory while the trainer runs
        groups = self._samples(kept)
        total, valid = _cat(kept, "total"), _cat(kept, "valid")
        # what the token-level estimators put at the last token: the sequence reward less the per-token functions'
        seq_total = _cat(kept, "seq_total") if "seq_total" in kept[0].scores else total
        process_metrics = self._process_rewards(kept, groups, times)
        t = time.time()
        if self.needs_old or self.reference is not None or self.critic is not None:
            self._attach_logprobs(groups, layout(len(groups)))   # through the training layout
        times["logprobs"] += time.time() - t
        kl_seq = self._kl_seq(groups)
        adv_metrics = self._advantages(kept, groups, total, seq_total, valid, baseline, kl_seq)
        # adaptive KL: update beta from this iteration's KL (KL in the reward: from the next iteration on;
        # KL in the loss: already for this iteration's optimizer steps)
        if kl_seq is not None:
            self.state.kl.update(float(kl_seq[valid].mean()) if valid.any() else 0.0, len(kl_seq))
            self.algorithm.kl_beta = self.state.kl.value  # the in-loss coefficient of this iteration's steps
        times["total"] = time.time() - t0
        self.state.pending = rollout_metrics(self, k, kept, groups, total, valid, kl_seq, adv_metrics, times,
                                             draw.dropped, draw.rounds, draw.parts)
        self.state.pending.update(process_metrics)
        if self.backend.mismatch is not None:   # vLLM: the check after this iteration's sync
            self.state.pending["mismatch/engine_check"] = self.backend.mismatch
        if self.episodes is not None:
            from ..online.episodes import episode_metrics, log_invalid

            eps = [r for g in kept for r in g.rollouts]
            self.state.pending.update(episode_metrics(eps))
            log_invalid(eps, self.log, f"iteration {k + 1}")
        write_samples(self, k, kept, groups)
        check_signal(self, k, self.state.pending, valid)
        return groups

    def _draw(self, k: int, times: dict) -> Draw:
        """Sample and score ``rollout.prompts_per_step`` prompt groups. With dynamic sampling, groups
        whose rewards are all equal are dropped and more prompts drawn, up to
        ``loss.dynamic_sampling_rounds`` extra rounds."""
        ro, loss = self.cfg.rollout, self.loss
        G, want = ro.group_size, ro.prompts_per_step
        kept: list[ScoredGroup] = []
        dropped: list[ScoredGroup] = []
        parts, rounds, drawn = [], 0, 0
        while True:
            n = refill_count(want, len(kept), drawn, rounds)
            idx = self._next_prompts(n)
            drawn += n
            rolls, scored = self._sample_scored(idx, G, ro.temperature, derive_seed("rl-sample", self.seed, k, rounds),
                                                times)
            parts.append(scored)
            for gi, i in enumerate(idx):
                rows = slice(gi * G, (gi + 1) * G)
                group = ScoredGroup(i, rolls[rows], {k2: v[rows] for k2, v in scored.items() if torch.is_tensor(v)})
                if loss.dynamic_sampling and G > 1 and zero_variance(group.scores["total"], group.scores["valid"]):
                    dropped.append(group)
                else:
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
        return Draw(kept, rounds, len(dropped), parts)

    def _baseline(self, kept: list[ScoredGroup], times: dict) -> torch.Tensor | None:
        """ReMax's baseline: the greedy completion of each prompt, scored the same way (per sample)."""
        if not self.estimator.needs_baseline:
            return None
        _, bs = self._sample_scored([g.prompt for g in kept], 1, 0.0, 0, times)
        base = torch.where(bs["valid"], bs["total"], torch.full_like(bs["total"], float("nan")))
        return base.repeat_interleave(self.cfg.rollout.group_size)

    def _samples(self, kept: list[ScoredGroup]) -> list[list[Sample]]:
        """The training samples: the sampled tokens as they are, trained unless the reward is invalid
        (or the completion truncated with rollout.mask_truncated)."""
        mask_truncated = self.cfg.rollout.mask_truncated
        groups: list[list[Sample]] = []
        for g in kept:
            group = []
            for j, r in enumerate(g.rollouts):
                trained = bool(g.scores["valid"][j]) and not (mask_truncated and not r.finished)
                # n_tokens: the trained (policy) tokens; an episode's environment tokens carry no label
                group.append(Sample(example=r.training_example(), n_tokens=len(r.log_probs), advantage=0.0,
                                    trained=trained, rollout_logps=r.log_probs))
                if "token_rewards" in g.scores:  # per-token reward functions (teacher_logprob), token-level estimators
                    group[-1].token_rewards = g.scores["token_rewards"][j, : len(r.completion_ids)].tolist()
                elif self._turn_token_rewards():
                    group[-1].token_rewards = self.episodes.turn_token_rewards(r)
            groups.append(group)
        return groups

    def _turn_token_rewards(self) -> bool:
        """Whether per-turn rewards go to the turns' last tokens (env.credit=turn, token-level estimator)."""
        return self.episodes is not None and self.episodes.credit == "turn" and (
            self.estimator.token_level or self.estimator.needs_critic)

    def _process_rewards(self, kept: list[ScoredGroup], groups: list[list[Sample]], times: dict) -> dict:
        """The PRM's per-step rewards of every sample (reward.process_weight > 0), and their metrics."""
        if self.process is None:
            return {}
        from ...rewards.process import process_token_rewards

        t = time.time()
        rewards, mismatched = process_token_rewards(
            self.process, [self.prompts[g.prompt].text for g in kept for _ in g.rollouts],
            [r.completion_ids for g in kept for r in g.rollouts], mode=self.cfg.reward.process_mode)
        for smp, r in zip((s for g in groups for s in g), rewards):
            smp.process_rewards = r
        times["score"] += time.time() - t
        return {"process/reward_sum": sum(sum(r) for r in rewards) / max(1, len(rewards)),
                "process/reencode_mismatch": float(mismatched)}

    def _kl_seq(self, groups: list[list[Sample]]) -> torch.Tensor | None:
        """Per-sequence KL to the reference (sum over tokens of log pi_old - log pi_ref), when there is one."""
        if self.reference is None:
            return None
        flat = [s for g in groups for s in g]
        pol = [s.old_logps if s.old_logps is not None else s.rollout_logps for s in flat]
        return torch.tensor([sum(a - b for a, b in zip(p, s.ref_logps)) for p, s in zip(pol, flat)])

    def _advantages(self, kept, groups, total, seq_total, valid, baseline, kl_seq) -> dict:
        """Attach the estimator's advantages to the samples (per token for GAE / REINFORCE++);
        returns its metrics."""
        loss = self.loss
        if self.estimator.needs_critic:
            return self._token_advantages(groups, seq_total, valid)
        if self.estimator.token_level:
            return self._token_returns_advantages(groups, seq_total, valid, self.cfg.rollout.group_size)
        reward_for_adv = total
        if kl_seq is not None and loss.kl_placement == "reward" and loss.kl_beta > 0:
            beta = self.state.kl.value
            flat = [s for g in groups for s in g]
            est = torch.tensor([float(kl_estimate(torch.tensor(s.old_logps), torch.tensor(s.ref_logps),
                                                  loss.kl_estimator).sum()) for s in flat])
            reward_for_adv = total - beta * est
        if self.episodes is not None and self.episodes.credit == "turn":
            eps = [r for g in kept for r in g.rollouts]
            final = reward_for_adv - _cat(kept, "env_reward")   # the reward functions' part (less any KL)
            rows, metrics = self.episodes.turn_advantages(self.estimator, self.est_hparams, eps, final, valid,
                                                          self.cfg.rollout.group_size)
            for s, row in zip((s for g in groups for s in g), rows):
                s.token_advantages = row
            return metrics
        adv, metrics = self.estimator.fn(reward_for_adv, valid, group_size=self.cfg.rollout.group_size,
                                         baseline=baseline, **self.est_hparams)
        for s, a in zip((s for g in groups for s in g), adv.tolist()):
            s.advantage = float(a)
        return metrics

    def _sample_scored(self, idx: list[int], G: int, temperature: float, seed: int, times: dict):
        """``G`` rollouts of each prompt ``idx[p]`` (group id ``p``) and their scores. With N
        processes, process r samples and scores groups r, r+N, ... and the shares are exchanged,
        so every process returns the whole batch (the same as a single process would)."""
        ro = self.cfg.rollout
        _, world = rank_world()
        mine = my_share(len(idx))
        t = time.time()
        sampling = SamplingParams(ro.max_new_tokens, temperature, ro.top_p, ro.top_k, n=G, seed=seed)
        if self.episodes is not None:
            rolls = self.episodes.sample(self.backend, self.tokenizer, [self.prompts[idx[p]] for p in mine], sampling,
                                         mine, model=self.model)
        else:
            rolls = self.backend.generate(requests([self.prompts[idx[p]].ids for p in mine], mine), sampling)
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
            kl = kl_estimate(pad_rows([s.old_logps for s in flat], width), pad_rows([s.ref_logps for s in flat], width),
                             loss.kl_estimator)
        process = torch.zeros_like(mask)
        if self.process is not None:
            process = self.cfg.reward.process_weight * pad_rows([s.process_rewards for s in flat], width) * mask
        if flat[0].token_rewards is not None:
            process = process + pad_rows([s.token_rewards for s in flat], width) * mask
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
        values = pad_rows([s.old_values for s in flat], width)
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
        if self.episodes is not None:
            if self._turn_token_rewards():   # the final reward at the last token, the turns' at theirs
                out["seq_total"] = out["total"].clone()
            self.episodes.add_scores(out, rolls)
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
        return per_sequence(critic_values(self.critic, batch), batch, n_seq)

    def _seq_logps(self, model, batch: dict, n_seq: int) -> list[list[float]]:
        out = selected_log_probs(model, batch["input_ids"], batch["lp_rows"], batch["lp_targets"],
                                 attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"),
                                 temperature=self.cfg.rollout.temperature)
        return per_sequence(out["log_probs"], batch, n_seq)
