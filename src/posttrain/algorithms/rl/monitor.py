"""The online loop's state between iterations and its failure-mode monitors.

:class:`RLState` is an engine callback: it adds each iteration's rollout metrics to the step
record, prints the warnings (mode collapse, KL blow-up, reward hacking) and is saved in every
checkpoint (prompt cursor, KL coefficient, monitor windows), so a resumed run continues exactly.
"""

from __future__ import annotations

import math

import torch

from ...data.formats import write_jsonl
from ...errors import TrainingError
from ...train.plan import rank_world

from ..online.stream import LoopState
from .config import MonitorConfig


class RLState(LoopState):
    """What the loop carries between iterations, saved in every checkpoint (engine callback
    protocol): the prompt cursor, the KL coefficient, and the monitors' windows. As a callback
    it adds the iteration's rollout metrics to the first step record of each iteration and
    prints the failure-mode warnings."""

    def __init__(self, monitor: MonitorConfig, kl, *, log=print, gold: bool):
        super().__init__()
        self.kl = kl
        self.cfg = monitor
        self.log = log
        self.gold = gold
        self.proxy: list[float] = []
        self.gold_acc: list[float] = []
        self.warned: dict[str, bool] = {"collapse": False, "kl": False, "hacking": False}
        self.entropy0: float | None = None  # the first iteration's entropy (collapse is a fall from it)
        self.no_reward_run = 0              # iterations in a row without a valid reward

    # -- engine callback
    def __call__(self, record: dict) -> None:
        super().__call__(record)
        for k in ("collapse", "kl_blowup", "hacking"):
            record.setdefault(f"warning/{k}", 0)

    def on_rollout_record(self, record: dict) -> None:
        record["time/train"] = max(0.0, record["step_seconds"] - record.get("time/rollout_total", 0.0))
        self._check(record)

    def _warn(self, key: str, text: str) -> None:
        """Print ``warning: text`` the first time ``key`` fires in this run."""
        if not self.warned.get(key):
            self.warned[key] = True
            self.log(f"warning: {text}")

    def _check(self, r: dict) -> None:
        c = self.cfg
        entropy = r.get("entropy")
        if self.entropy0 is None and entropy is not None:
            self.entropy0 = float(entropy)
        if (r.get("distinct_rate", 1.0) < c.collapse_distinct and entropy is not None and entropy < c.collapse_entropy
                and entropy < c.collapse_fall * (self.entropy0 or 0.0)):
            r["warning/collapse"] = 1
            self._warn("collapse", f"mode collapse at step {r['step']}: only {r['distinct_rate']:.0%} of the "
                       f"completions of a prompt differ and the token entropy fell to {entropy:.3f} nats (from "
                       f"{self.entropy0:.3f}); the policy has stopped exploring. Lower train.lr, add "
                       "loss.entropy_coef, raise rollout.temperature or loss.kl_beta.")
        kl = r.get("rollout/kl_seq")
        approx = r.get("approx_kl")
        if (kl is not None and kl > c.kl_max) or (approx is not None and approx > c.approx_kl_max):
            r["warning/kl_blowup"] = 1
            self._warn("kl", f"KL blow-up at step {r['step']}: KL to the reference {kl if kl is not None else 0:.3g} "
                       f"nats per sequence (limit {c.kl_max}), old-vs-new approximate KL "
                       f"{approx if approx is not None else 0:.3g} per token (limit {c.approx_kl_max}). Lower "
                       "train.lr, raise loss.kl_beta, or reduce loss.epochs.")
        if self.gold and c.hacking_window and "reward/mean" in r and "gold/mean" in r:
            self.proxy.append(r["reward/mean"])
            self.gold_acc.append(r["gold/mean"])
            w = c.hacking_window
            flag = 0
            if len(self.proxy) >= 2 * w:
                p0, p1 = sum(self.proxy[-2 * w:-w]) / w, sum(self.proxy[-w:]) / w
                g0, g1 = sum(self.gold_acc[-2 * w:-w]) / w, sum(self.gold_acc[-w:]) / w
                if p1 > p0 and g1 < g0 - c.hacking_gold_drop:
                    flag = 1
                    self._warn("hacking", f"reward hacking at step {r['step']}: the trained reward rose "
                               f"({p0:.3f} -> {p1:.3f}) while the gold metric fell ({g0:.3f} -> {g1:.3f}). "
                               "Stop here (the checkpoints before this point are better), raise loss.kl_beta, "
                               "or improve the reward model.")
                del self.proxy[:-2 * w], self.gold_acc[:-2 * w]
            r["warning/hacking"] = flag

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kl": self.kl.state_dict(), "proxy": self.proxy, "gold": self.gold_acc,
                "warned": dict(self.warned), "entropy0": self.entropy0, "no_reward_run": self.no_reward_run}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kl.load_state_dict(state["kl"])
        self.proxy = [float(x) for x in state.get("proxy", [])]
        self.gold_acc = [float(x) for x in state.get("gold", [])]
        self.warned.update(state.get("warned", {}))
        self.entropy0 = None if state.get("entropy0") is None else float(state["entropy0"])
        self.no_reward_run = int(state.get("no_reward_run", 0))


def check_signal(runner, k: int, m: dict, valid: torch.Tensor) -> None:
    """Warn when an iteration carries no learning signal, and stop when no valid reward has arrived
    for ``monitor.no_reward_steps`` iterations in a row (the policy gradient is zero throughout)."""
    mon, state = runner.cfg.monitor, runner.state
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
    group_based = runner.estimator.needs_groups or bool(runner.est_hparams.get("subtract_group_mean"))
    zero = m.get("zero_variance_groups", 0.0)
    if not group_based or runner.cfg.rollout.group_size < 2 or runner.loss.dynamic_sampling:
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

def rollout_metrics(runner, k, kept, groups, total, valid, kl_seq, adv_metrics, times, dropped_groups, rounds,
             parts) -> dict:
    flat = [s for g in groups for s in g]
    rolls = [r for g in kept for r in g.rollouts]
    lengths = torch.tensor([float(s.n_tokens) for s in flat])
    truncated = sum(1 for r in rolls if not r.finished)
    m: dict[str, float] = {"iteration": k + 1}
    v = valid
    m["reward/mean"] = float(total[v].mean()) if v.any() else float("nan")
    m["reward/std"] = float(total[v].std()) if int(v.sum()) > 1 else 0.0
    for key in kept[0].scores:
        if key.startswith(("fn/", "gold/")):
            vals = torch.cat([g.scores[key] for g in kept])
            ok = torch.isfinite(vals)
            name = key.split("/", 1)[1]
            prefix = "reward" if key.startswith("fn/") else "gold"
            m[f"{prefix}/{name}"] = float(vals[ok].mean()) if ok.any() else float("nan")
    if "gold" in kept[0].scores:
        gold = torch.cat([g.scores["gold"] for g in kept])
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
    distinct = [len({tuple(r.completion_ids) for r in g.rollouts}) / len(g.rollouts) for g in kept]
    m["distinct_rate"] = sum(distinct) / len(distinct)
    G = runner.cfg.rollout.group_size
    zero = sum(1 for g in kept if zero_variance(g.scores["total"], g.scores["valid"])) if G > 1 else 0
    m["zero_variance_groups"] = (zero + dropped_groups) / max(1, len(kept) + dropped_groups)
    if runner.loss.dynamic_sampling:
        m["dynamic_sampling/rounds"] = float(rounds)
        m["dynamic_sampling/dropped_groups"] = float(dropped_groups)
    if kl_seq is not None:
        m["rollout/kl_seq"] = float(kl_seq[v].mean()) if v.any() else 0.0
    m["kl_beta"] = float(runner.state.kl.value)
    if any(s.old_logps is not None for s in flat):
        diffs = [abs(a - b) for s in flat for a, b in zip(s.old_logps, s.rollout_logps)]
        ratios = [math.exp(a - b) for s in flat for a, b in zip(s.old_logps, s.rollout_logps)]
        m["mismatch/logprob_abs_diff"] = sum(diffs) / max(1, len(diffs))
        m["mismatch/max_ratio"] = max(ratios) if ratios else 1.0
        if runner.loss.tis_cap is not None:   # what the importance weights did this iteration
            w, tm = runner.tis(groups)
            m["mismatch/tis_capped"] = float(tm["is_capped"].float().mean()) if tm["is_capped"].numel() else 0.0
            m["mismatch/tis_weight_mean"] = float(w[w > 0].mean()) if (w > 0).any() else 0.0
    for key, val in adv_metrics.items():
        m[f"advantage/{key}"] = float(val.float().mean()) if torch.is_tensor(val) else float(val)
    for key, val in times.items():
        m[f"time/rollout_{key}"] = val
    if truncated / max(1, len(rolls)) > 0.5 and not runner.state.warned.get("truncation"):
        runner.state.warned["truncation"] = True
        runner.log(f"warning: {truncated} of {len(rolls)} completions hit rollout.max_new_tokens="
                 f"{runner.cfg.rollout.max_new_tokens} without stopping; their rewards are of unfinished "
                 "answers. Raise rollout.max_new_tokens, or set rollout.mask_truncated=true.")
    return m

def write_samples(runner, k: int, kept, groups) -> None:
    every = runner.cfg.rollout.samples_every
    if not every or k % every or rank_world()[0] != 0:   # only rank 0 writes
        return
    records = []
    for sg, g in zip(kept, groups):
        for j, (r, s) in enumerate(zip(sg.rollouts, g)):
            reward = float(sg.scores["total"][j])
            record = {"iteration": k + 1, "prompt": runner.prompts[sg.prompt].text, "completion": r.text,
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
            if hasattr(r, "messages"):  # a multi-turn episode: the whole conversation and how it ended
                record.update(messages=r.messages, end=r.end, turns=r.n_turns, turn_rewards=r.turn_rewards,
                              turn_ends=r.turn_ends,   # policy tokens up to each turn's end (token_advantages' index)
                              tool_calls=r.tool_calls, malformed_calls=r.malformed_calls, error=r.error)
            records.append(record)
    write_jsonl(runner.out_dir / "samples.jsonl", records, append=True)


def zero_variance(total: torch.Tensor, valid: torch.Tensor) -> bool:
    vals = total[valid]
    return vals.numel() < 2 or bool((vals == vals[0]).all())

