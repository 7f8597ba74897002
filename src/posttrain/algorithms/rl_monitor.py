"""The online loop's state between iterations and its failure-mode monitors.

:class:`RLState` is an engine callback: it adds each iteration's rollout metrics to the step
record, prints the warnings (mode collapse, KL blow-up, reward hacking) and is saved in every
checkpoint (prompt cursor, KL coefficient, monitor windows), so a resumed run continues exactly.
"""

from __future__ import annotations

from .rl_config import MonitorConfig


class RLState:
    """What the loop carries between iterations, saved in every checkpoint (engine callback
    protocol): the prompt cursor, the KL coefficient, and the monitors' windows. As a callback
    it adds the iteration's rollout metrics to the first step record of each iteration and
    prints the failure-mode warnings."""

    def __init__(self, monitor: MonitorConfig, kl, *, log=print, gold: bool):
        self.cursor = 0
        self.kl = kl
        self.cfg = monitor
        self.log = log
        self.gold = gold
        self.pending: dict | None = None   # rollout metrics waiting for the next step record
        self.proxy: list[float] = []
        self.gold_acc: list[float] = []
        self.warned: dict[str, bool] = {"collapse": False, "kl": False, "hacking": False}
        self.entropy0: float | None = None  # the first iteration's entropy (collapse is a fall from it)
        self.no_reward_run = 0              # iterations in a row without a valid reward

    # -- engine callback
    def __call__(self, record: dict) -> None:
        if self.pending is not None:
            rollout_s = self.pending.get("time/rollout_total", 0.0)
            record.update(self.pending)
            record["time/train"] = max(0.0, record["step_seconds"] - rollout_s)
            self.pending = None
            self._check(record)
        for k in ("collapse", "kl_blowup", "hacking"):
            record.setdefault(f"warning/{k}", 0)

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
        return {"cursor": self.cursor, "kl": self.kl.state_dict(), "proxy": self.proxy, "gold": self.gold_acc,
                "warned": dict(self.warned), "entropy0": self.entropy0, "no_reward_run": self.no_reward_run}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        self.kl.load_state_dict(state["kl"])
        self.proxy = [float(x) for x in state.get("proxy", [])]
        self.gold_acc = [float(x) for x in state.get("gold", [])]
        self.warned.update(state.get("warned", {}))
        self.entropy0 = None if state.get("entropy0") is None else float(state["entropy0"])
        self.no_reward_run = int(state.get("no_reward_run", 0))
