"""Curves of a run, as PNG files: online RL (``curves.png`` of every ``posttrain rl`` and
``online-dpo`` run), offline preference optimization (``curves.png`` of every ``posttrain dpo``
run) and SFT (the quickstart's ``learning_curves.png``). Written by the main process at the end
of a run, from the engine's records (the lines of ``metrics.jsonl``).

The x axis counts the optimizer updates applied to the weights that produced a point. A training
record of step ``s`` is measured on the step's batch *before* its update (its loss, its
log-ratios, and for online RL the rollouts, sampled at the start of the step), so it is drawn at
``s - 1``: the first record is the starting model (x = 0), e.g. the reward of the SFT model's own
samples, or DPO's log-ratios of exactly 0. An evaluation record of step ``s`` comes after the
update, and is drawn at ``s``. Two records of one step (an evaluation repeated at the final step)
are drawn once, the later one.

Every line has a legend entry. A panel that has nothing to show says why instead of staying blank.
"""

from __future__ import annotations

import math
from pathlib import Path

# Reward functions that are 0/1 verifiers of correctness: their mean is an accuracy, drawn in the
# accuracy (%) panel. Every other reward (a reward model, a format or length term, a user's own
# function, a teacher's log-prob) is drawn in the reward panel under its own name.
VERIFIER_REWARDS = frozenset({"world_correct", "math_answer"})
# evaluation keys that are accuracies whatever the reward functions are (the quickstart's own
# held-out accuracy, an ``extra_eval`` of the world's evaluator)
ACCURACY_KEYS = ("heldout_accuracy",)


def _ema(values: list[float], alpha: float | None = None) -> list[float]:
    """Exponential moving average; ``alpha`` by default 4 / len (at least 0.1), so a short run's
    average does not lag far behind its points."""
    alpha = alpha if alpha is not None else min(1.0, max(0.1, 4 / max(1, len(values))))
    out, acc = [], None
    for v in values:
        if v is None or v != v:  # missing / NaN: keep the running value
            out.append(acc if acc is not None else float("nan"))
            continue
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else float("nan")


def _train_points(history: list[dict], key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """(x, y) of a training key, x = the record's step - 1 (updates applied when it was measured)."""
    rows = _last_per_step([h for h in history if key in h])
    return [h["step"] - 1 for h in rows], [scale * _num(h[key]) for h in rows]


def _eval_points(eval_history: list[dict], key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """(x, y) of an evaluation key, x = the record's step (after that many updates), one per step."""
    rows = sorted(_last_per_step([e for e in eval_history if key in e]), key=lambda e: e["step"])
    return [e["step"] for e in rows], [scale * _num(e[key]) for e in rows]


def _last_per_step(records: list[dict]) -> list[dict]:
    """One record per step (the later of two at the same step), in the records' order."""
    by_step: dict = {}
    for r in records:
        by_step[r["step"]] = r
    return list(by_step.values())


def _raw_and_ema(ax, xs, ys, color, label: str, *, lw: float = 1.8) -> None:
    ax.plot(xs, ys, color=color, alpha=0.3, lw=1, label=f"{label}, per step")
    ax.plot(xs, _ema(ys), color=color, lw=lw, label=f"{label} (EMA)")


def _legend_or_note(ax, note: str, **kw) -> None:
    handles = ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(fontsize=7 if len(handles) > 5 else 8, ncol=2 if len(handles) > 6 else 1, **kw)
    else:  # say why the panel is empty rather than leave a blank axis
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="tab:gray")


def _save(fig, path: Path, dpi: int = 100) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def _subplots(n: int, width: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, n, figsize=(width, 4.2))


def _finish(fig, axes, title: str, xlabel: str = "optimizer updates applied") -> None:
    from matplotlib.ticker import MaxNLocator

    for a in axes:
        a.set_xlabel(xlabel)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()


# --------------------------------------------------------------------------- online RL


def _is_verifier(key: str) -> bool:
    return key.split("/", 1)[-1] in VERIFIER_REWARDS


def rl_figure(history: list[dict], eval_history: list[dict], *, title: str = ""):
    """The figure of :func:`plot_rl_curves` (for tests: its axes, lines and legends)."""
    rows = [h for h in history if "reward/mean" in h]
    fig, axes = _subplots(4, 19)
    colors = iter(["tab:green", "tab:olive", "tab:cyan", "tab:brown", "tab:pink", "tab:gray"] * 4)
    keys = sorted({k for h in rows for k in h})
    functions = [k for k in keys if k.startswith("reward/") and k.count("/") == 1
                 and k not in ("reward/mean", "reward/std") and not k.startswith("reward/invalid_")]
    gold = [k for k in keys if k.startswith("gold/") and k != "gold/mean"] or [k for k in keys if k == "gold/mean"]
    eval_keys = sorted({k for e in eval_history for k in e if k.startswith("eval_reward/")})
    accuracy_eval = [k for k in sorted({k for e in eval_history for k in e}) if k in ACCURACY_KEYS]

    # reward panel: what the run trains on, and every continuous reward by name
    ax = axes[0]
    if rows:
        names = [k.split("/", 1)[1] for k in functions]
        what = names[0] if len(names) == 1 else "total (weighted)"
        xs, ys = _train_points(rows, "reward/mean")
        _raw_and_ema(ax, xs, ys, "tab:blue", f"trained reward: {what}")
    if len(functions) > 1:
        for key in functions:
            if not _is_verifier(key):
                xs, ys = _train_points(rows, key)
                ax.plot(xs, _ema(ys), lw=1.2, color=next(colors), label=f"{key} (EMA)")
    for key in gold:
        if not _is_verifier(key):
            xs, ys = _train_points(rows, key)
            ax.plot(xs, _ema(ys), lw=1.2, ls="--", color=next(colors), label=f"gold {key.split('/', 1)[1]} (EMA)")
    for key in eval_keys:
        if not _is_verifier(key):
            xs, ys = _eval_points(eval_history, key)
            ax.plot(xs, ys, "o-", lw=1.2, color=next(colors), label=f"held-out {key.split('/', 1)[1]} (greedy)")
    ax.set_title("reward on the rollouts")
    _legend_or_note(ax, "no reward logged")

    # accuracy panel: 0/1 verifiers only (on the rollouts, gold, held-out)
    ax = axes[1]
    for key in [k for k in functions if _is_verifier(k)] + [k for k in gold if _is_verifier(k)]:
        xs, ys = _train_points(rows, key, 100)
        src = "gold " if key.startswith("gold/") else ""
        ax.plot(xs, _ema(ys), lw=1.5, color=next(colors),
                label=f"{src}{key.split('/', 1)[1]} on the rollouts (samples, EMA)")
    for key in [k for k in eval_keys if _is_verifier(k)] + accuracy_eval:
        xs, ys = _eval_points(eval_history, key, 100)
        name = "accuracy" if key in ACCURACY_KEYS else key.split("/", 1)[1]
        ax.plot(xs, ys, "o-", lw=1.5, color=next(colors), label=f"held-out {name} (greedy)")
    ax.set_ylim(0, 100)
    ax.set_title("accuracy (%)")
    _legend_or_note(ax, "no 0/1 verifier among the rewards\n(" + ", ".join(sorted(VERIFIER_REWARDS))
                    + ")\nand no held-out evaluation (data.eval)")

    ax = axes[2]
    for key, color in (("kl_k1", "tab:red"), ("kl_k3", "tab:orange")):
        xs, ys = _train_points(history, key)
        if xs:
            ax.plot(xs, ys, color=color, lw=1.2, label=f"{key[3:]} per token")
    ax.set_title("KL to the reference")
    _legend_or_note(ax, "no KL to the reference logged\n(online RL: loss.kl_beta=0 loads no reference)")

    ax = axes[3]
    xs, ys = _train_points(history, "entropy")
    if xs:
        ax.plot(xs, ys, color="tab:purple", lw=1.2, label="token entropy (nats)")
    ax.set_ylabel("nats")
    ax2 = ax.twinx()
    xs, ys = _train_points(rows, "distinct_rate")
    if xs:
        ax2.plot(xs, ys, color="tab:gray", lw=1, ls="--", label="distinct completions per group")
    ax2.set_ylim(0, 1.05)
    ax.set_title("entropy / diversity")
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(loc="upper right", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left", fontsize=8)
    else:
        _legend_or_note(ax, "no entropy or diversity logged", loc="lower left")
    _finish(fig, axes, title)
    return fig


def plot_rl_curves(history: list[dict], eval_history: list[dict], path: Path, *, title: str = "") -> Path:
    """Four panels: the reward on the rollouts (the trained reward, per step and EMA; continuous
    reward and gold functions by name; held-out evaluations of continuous rewards), accuracy (%)
    (only 0/1 verifiers, :data:`VERIFIER_REWARDS`: on the rollouts, as gold functions and on the
    held-out prompts, plus ``heldout_accuracy`` evaluation points), KL to the reference (k1, k3
    per token) and the token entropy with the within-group distinct-completion rate. The first
    rollout point is the starting model's (x = 0; see the module docstring)."""
    return _save(rl_figure(history, eval_history, title=title), path)


# --------------------------------------------------------------------------- preference optimization


def preference_figure(history: list[dict], eval_history: list[dict], *, title: str = ""):
    """The figure of :func:`plot_preference_curves` (for tests)."""
    fig, axes = _subplots(4, 19)
    keys = {k for h in history for k in h}

    ax = axes[0]
    if "chosen_logratio" in keys:
        pairs = (("chosen_logratio", "tab:green", "chosen"), ("rejected_logratio", "tab:red", "rejected"))
        ax.set_title("log-ratio vs the reference (nats per response)")
        ax.axhline(0.0, color="black", lw=0.8, label="reference (0)")
    elif "logratio" in keys:  # KTO: one log-ratio per (desirable or undesirable) example
        pairs = (("logratio", "tab:blue", "example"),)
        ax.set_title("log-ratio vs the reference (nats per response)")
        ax.axhline(0.0, color="black", lw=0.8, label="reference (0)")
    else:  # reference-free losses (simpo, orpo): the log-probabilities themselves
        pairs = (("chosen_logps", "tab:green", "chosen"), ("rejected_logps", "tab:red", "rejected"))
        ax.set_title("log-probability (nats per response; no reference)")
    for key, color, name in pairs:
        xs, ys = _train_points(history, key)
        if xs:
            _raw_and_ema(ax, xs, ys, color, f"{name}, train")
        xs, ys = _eval_points(eval_history, f"eval_{key}")
        if xs:
            ax.plot(xs, ys, "o" if name != "rejected" else "s", ms=7 if name != "rejected" else 5, color=color,
                    markeredgecolor="black", label=f"{name}, held-out")
    flagged = [h["step"] - 1 for h in history if h.get("likelihood_displacement")]
    if flagged:
        ax.plot(flagged, [0.0] * len(flagged), "v", color="tab:orange", ms=5,
                label="likelihood-displacement warning")
    _legend_or_note(ax, "no log-probabilities logged")

    ax = axes[1]
    xs, ys = _train_points(history, "margins")
    if xs:
        _raw_and_ema(ax, xs, ys, "tab:blue", "train")
        ax.axhline(0.0, color="black", lw=0.8, label="no preference (0)")
    xs, ys = _eval_points(eval_history, "eval_margins")
    if xs:
        ax.plot(xs, ys, "o-", color="tab:orange", label="held-out")
    ax.set_title("implicit reward margin (chosen - rejected)")
    _legend_or_note(ax, "this loss logs no pairwise margin")

    ax = axes[2]
    xs, ys = _train_points(history, "accuracy", 100)
    if xs:
        _raw_and_ema(ax, xs, ys, "tab:blue", "train")
    xs, ys = _eval_points(eval_history, "eval_accuracy", 100)
    if xs:
        ax.plot(xs, ys, "o-", color="tab:orange", label="held-out")
    ax.set_ylim(-2, 102)
    ax.set_title("preference accuracy (%: margin > 0)")
    _legend_or_note(ax, "this loss logs no preference accuracy")

    ax = axes[3]
    xs, ys = _train_points(history, "loss")
    if xs:
        _raw_and_ema(ax, xs, ys, "tab:blue", "train")
    xs, ys = _eval_points(eval_history, "eval_loss")
    if xs:
        ax.plot(xs, ys, "o-", color="tab:orange", label="held-out")
    ax.set_title("loss")
    _legend_or_note(ax, "no loss logged")
    _finish(fig, axes, title)
    return fig


def plot_preference_curves(history: list[dict], eval_history: list[dict], path: Path, *, title: str = "") -> Path:
    """Four panels of an offline preference run (the dpo family, KTO, tilt): the chosen and rejected
    log-ratios against the reference (train per step and EMA, held-out points; the
    likelihood-displacement warnings marked; KTO: the examples' log-ratio; reference-free losses:
    the log-probabilities), the implicit reward margin, the preference accuracy (%) and the loss.
    The first training point is the starting model (x = 0: log-ratios exactly 0 when the
    reference is the starting model; see the module docstring)."""
    return _save(preference_figure(history, eval_history, title=title), path)


# --------------------------------------------------------------------------- SFT


def sft_figure(history: list[dict], eval_history: list[dict], curve: list[tuple[int, float]]):
    """The figure of :func:`plot_sft_curves` (for tests)."""
    fig, axes = _subplots(3, 14)
    ax = axes[0]
    xs, ys = _train_points(history, "loss")
    _raw_and_ema(ax, xs, ys, "tab:blue", "train loss", lw=1.5)
    xs, ys = _eval_points(eval_history, "eval_loss")
    if xs:
        ax.plot(xs, ys, "o-", color="tab:orange", label="held-out loss")
    ax.set_ylabel("NLL per response token")
    ax.set_yscale("log")
    ax.set_title("SFT loss")
    ax.legend(fontsize=8)
    ax = axes[1]
    xs, ys = _train_points(history, "entropy")
    if xs:
        _raw_and_ema(ax, xs, ys, "tab:purple", "entropy", lw=1.5)
    ax.set_ylabel("nats")
    ax.set_title("mean response-token entropy")
    _legend_or_note(ax, "no entropy logged")
    ax = axes[2]
    points: dict[int, float] = {}
    for s, a in curve:  # one point per step: the later one
        points[int(s)] = float(a)
    points = dict(sorted(points.items()))
    if points:
        ax.plot(list(points), [100 * a for a in points.values()], "o-", color="tab:green",
                label="held-out accuracy (greedy)")
    ax.set_ylabel("% correct")
    ax.set_ylim(0, 100)
    ax.set_title("held-out accuracy (greedy)")
    _legend_or_note(ax, "no accuracy measured")
    _finish(fig, axes, "")
    return fig


def plot_sft_curves(history: list[dict], eval_history: list[dict], curve: list[tuple[int, float]],
                    path: Path) -> Path:
    """Three panels of an SFT run: train loss (per step and EMA; held-out loss points), the mean
    response-token entropy, and held-out accuracy ``curve`` (``(updates applied, accuracy)``
    pairs, one point per step)."""
    return _save(sft_figure(history, eval_history, curve), path, dpi=110)
