"""Curves of an online RL run: reward, held-out / gold accuracy, KL to the reference, entropy.

Written to ``<output_dir>/curves.png`` at the end of every ``posttrain rl`` run (main process).
"""

from __future__ import annotations

from pathlib import Path


def _ema(values: list[float], alpha: float = 0.2) -> list[float]:
    out, acc = [], None
    for v in values:
        if v != v:  # NaN: keep the running value
            out.append(acc if acc is not None else v)
            continue
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def plot_rl_curves(history: list[dict], eval_history: list[dict], path: Path, *, title: str = "") -> Path:
    """Four panels over optimizer steps: reward (per function, EMA), accuracy (held-out greedy
    evaluations and the gold functions on the rollouts), KL to the reference (k1, k3), and the
    token entropy with the within-group distinct-completion rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in history if "reward/mean" in h]
    steps = [h["step"] for h in rows]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    ax = axes[0]
    ax.plot(steps, [h["reward/mean"] for h in rows], color="tab:blue", alpha=0.3, lw=1)
    ax.plot(steps, _ema([h["reward/mean"] for h in rows]), color="tab:blue", lw=1.8, label="reward (EMA)")
    for key in sorted({k for h in rows for k in h if k.startswith("reward/") and k.count("/") == 1}
                      - {"reward/mean", "reward/std"}):
        if key.startswith("reward/invalid_"):
            continue
        ax.plot(steps, _ema([h.get(key, float("nan")) for h in rows]), lw=1, label=key.split("/", 1)[1])
    ax.set_title("reward on the rollouts")
    ax.legend(fontsize=8)
    ax = axes[1]
    gold = [k for k in sorted({k for h in rows for k in h}) if k.startswith("gold/") and k != "gold/mean"]
    for key in gold:
        ax.plot(steps, _ema([100 * h.get(key, float("nan")) for h in rows]), lw=1.5,
                label=f"{key.split('/', 1)[1]} on rollouts (gold)")
    for key in sorted({k for e in eval_history for k in e if k.startswith(("eval_reward/", "heldout_accuracy"))}):
        pts = [(e["step"], e[key]) for e in eval_history if key in e]
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", lw=1.5, label=f"held-out {key.split('/')[-1]}")
    ax.set_ylim(0, 100)
    ax.set_title("accuracy (%)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:   # say why the panel is empty rather than leave a blank axis
        ax.text(0.5, 0.5, "no gold reward function (reward.gold)\nand no held-out evaluation (data.eval)\nin this run",
                ha="center", va="center", transform=ax.transAxes, fontsize=9, color="tab:gray")
    ax = axes[2]
    for key, color in (("kl_k1", "tab:red"), ("kl_k3", "tab:orange")):
        vals = [h.get(key) for h in history]
        if any(v is not None for v in vals):
            ax.plot([h["step"] for h in history], [v if v is not None else float("nan") for v in vals], color=color,
                    lw=1.2, label=f"{key[3:]} per token")
    ax.set_title("KL to the reference")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax = axes[3]
    ax.plot([h["step"] for h in history], [h.get("entropy", float("nan")) for h in history], color="tab:purple",
            lw=1.2, label="token entropy (nats)")
    ax2 = ax.twinx()
    ax2.plot(steps, [h.get("distinct_rate", float("nan")) for h in rows], color="tab:gray", lw=1, ls="--",
             label="distinct completions per group")
    ax2.set_ylim(0, 1.05)
    ax.set_title("entropy / diversity")
    ax.legend(loc="lower left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    for a in axes:
        a.set_xlabel("optimizer step")
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
