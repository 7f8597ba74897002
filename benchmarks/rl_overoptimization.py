"""Over-optimization against a learned reward model (reference note 001 section 9.2).

    python benchmarks/rl_overoptimization.py --sft runs/quickstart/sft/final --rm runs/quickstart/rm/final

Online RL whose only reward is the reward model trained by `posttrain rm` (the proxy), with the
tiny world's verifier logged beside it as the gold metric (``reward.gold=[world_correct]``,
computed on the same rollouts, never trained on). Plots gold accuracy and proxy reward against
sqrt(KL to the SFT model) and reports whether the loop's reward-hacking warning fired.
Writes ``<out>/overoptimization.png`` and ``<out>/overoptimization.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from posttrain.algorithms.rl import RLConfig, run_rl
from posttrain.config import load_config


def plot(points: list[dict], path: Path, *, title: str) -> None:
    """Left: proxy (reward-model score) and gold (verifier accuracy) on the rollouts per step, with
    the reward-hacking flag; right: gold accuracy against sqrt(KL to the SFT model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(v, k=5):
        return [sum(v[max(0, i - k + 1): i + 1]) / len(v[max(0, i - k + 1): i + 1]) for i in range(len(v))]

    steps = [p["step"] for p in points]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax.plot(steps, smooth([100 * p["gold"] for p in points]), color="tab:green", lw=1.8,
            label="gold: verifier accuracy (%)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gold accuracy on the rollouts (%)")
    ax2 = ax.twinx()
    ax2.plot(steps, smooth([p["proxy"] for p in points]), color="tab:blue", lw=1.8, label="proxy: reward-model score")
    ax2.set_ylabel("reward-model score")
    flagged = [p for p in points if p["hacking_flag"]]
    if flagged:
        ax.axvline(flagged[0]["step"], color="tab:red", ls="--", lw=1, label="reward-hacking warning")
    ax.legend(loc="lower left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("proxy and gold per step (5-step running means)")
    sc = bx.scatter([p["sqrt_kl"] for p in points], [100 * p["gold"] for p in points], c=steps, cmap="viridis", s=18)
    fig.colorbar(sc, ax=bx, label="step")
    bx.set_xlabel("sqrt(KL to the SFT model)  [sqrt(nats per answer)]")
    bx.set_ylabel("gold accuracy on the rollouts (%)")
    bx.set_title("gold accuracy vs sqrt(KL)")
    bx.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", required=True)
    ap.add_argument("--rm", required=True)
    ap.add_argument("--out", default="runs/rl-overoptimization")
    ap.add_argument("--algorithm", default="grpo")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from <out>/overoptimization.json")
    ap.add_argument("overrides", nargs="*", help="extra key=value (e.g. train.lr=3e-4 loss.kl_beta=0.01)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.plot_only:
        points = json.loads((out / "overoptimization.json").read_text())["points"]
        plot(points, out / "overoptimization.png", title=f"{args.algorithm} against a learned reward model")
        return
    lines: list[str] = []
    cfg = load_config(RLConfig, None, [
        f"algorithm={args.algorithm}", f"model.name_or_path={args.sft}", f"train.output_dir={out / 'run'}",
        "train.overwrite_output_dir=true", f"train.max_steps={args.steps}", "train.progress=false", "data.eval=null",
        "reward.functions=[reward_model]", f"reward.reward_model={args.rm}", "reward.gold=[world_correct]",
        "monitor.hacking_window=5", *args.overrides])
    res = run_rl(cfg, log=lambda line: (lines.append(line), print(line)))
    rows = [h for h in res.fit.history if "reward/mean" in h]
    points = [{"step": h["step"], "sqrt_kl": math.sqrt(max(0.0, h.get("rollout/kl_seq", 0.0))),
               "proxy": h["reward/mean"], "gold": h.get("gold/world_correct"),
               "hacking_flag": h.get("warning/hacking", 0)} for h in rows]
    warned = [ln for ln in lines if ln.startswith("warning: reward hacking")]
    out.mkdir(parents=True, exist_ok=True)
    (out / "overoptimization.json").write_text(json.dumps({"points": points, "warning": warned}, indent=2) + "\n")

    plot(points, out / "overoptimization.png", title=f"{args.algorithm} against a learned reward model")
    print(json.dumps({"first": points[0], "last": points[-1], "warning": warned[:1]}, indent=2))


if __name__ == "__main__":
    main()
