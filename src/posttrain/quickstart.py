"""The quickstart: the built-in tiny world end to end, on a CPU, in a few minutes.

1. write the world's datasets (SFT conversations from the train split; held-out problems);
2. evaluate the shipped base model on the held-out problems (chat prompt, greedy);
3. SFT from the base model (assistant-only loss, packing), with held-out accuracy measured a
   few times along the way for the learning curves;
4. evaluate the SFT model the same way;
5. print a before/after table and write the run directory: data/, sft/ (metrics.jsonl,
   checkpoints/, final/), learning_curves.png, summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .algorithms.sft import SFTConfig, SFTDataConfig, run_sft
from .config import TrainConfig, option
from .models.loading import load_causal_lm, load_tokenizer
from .world.datasets import write_world_datasets
from .world.evaluate import EvalResult, evaluate_problems
from .world.tasks import generate_problems


def _default_sft() -> SFTConfig:
    return SFTConfig(
        data=SFTDataConfig(train="", eval="", max_length=256, packing=True),
        train=TrainConfig(output_dir="", lr=1e-3, epochs=1.0, micro_batch_size=4, grad_accum=1,
                          warmup_ratio=0.05, min_lr_ratio=0.1, save_every=0, log_every=1),
    )


@dataclass
class QuickstartConfig:
    """posttrain quickstart: evaluate the base model, SFT it, evaluate again."""

    output_dir: str = option("runs/quickstart", "Run directory.")
    seed: int = option(0, "Seed for data generation and training.")
    train_examples: int = option(8000, "SFT conversations generated from the train split.", min=1)
    eval_problems: int = option(200, "Held-out problems for the before/after table.", min=1)
    curve_points: int = option(3, "Held-out accuracy measurements during SFT (for the plot).", min=0)
    curve_problems: int = option(100, "Held-out problems per learning-curve measurement.", min=1)
    max_new_tokens: int = option(64, "Generation budget per answer.", min=1)
    sft: SFTConfig = field(default_factory=_default_sft)


def _fmt_pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def results_table(base: EvalResult, tuned: EvalResult) -> str:
    rows = [("held-out accuracy", base.accuracy, tuned.accuracy, True)]
    for level in sorted(base.per_level):
        rows.append((f"  level {level}", base.per_level[level], tuned.per_level.get(level, 0.0), True))
    rows.append(("format compliance", base.format_compliance, tuned.format_compliance, True))
    rows.append(("mean response tokens", base.mean_response_tokens, tuned.mean_response_tokens, False))
    lines = [f"{'':24}{'base':>10}{'SFT':>10}{'change':>10}", "-" * 54]
    for name, a, b, pct in rows:
        if pct:
            lines.append(f"{name:24}{_fmt_pct(a):>10}{_fmt_pct(b):>10}{100 * (b - a):>+9.1f}pt")
        else:
            lines.append(f"{name:24}{a:>10.1f}{b:>10.1f}{b - a:>+10.1f}")
    return "\n".join(lines)


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def plot_curves(history: list[dict], eval_history: list[dict], curve: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    axes[0].plot(steps, losses, color="tab:blue", alpha=0.3, lw=1)
    axes[0].plot(steps, _ema(losses), color="tab:blue", lw=1.5, label="train loss (EMA)")
    ev = [e for e in eval_history if "eval_loss" in e]
    if ev:
        axes[0].plot([e["step"] for e in ev], [e["eval_loss"] for e in ev], "o-", color="tab:orange", label="held-out loss")
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("NLL per response token")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("SFT loss")
    entropy = [h.get("entropy", float("nan")) for h in history]
    axes[1].plot(steps, entropy, lw=1, color="tab:purple", alpha=0.3)
    axes[1].plot(steps, _ema(entropy), lw=1.5, color="tab:purple")
    axes[1].set_xlabel("optimizer step")
    axes[1].set_ylabel("nats")
    axes[1].set_title("mean response-token entropy")
    if curve:
        axes[2].plot([c[0] for c in curve], [100 * c[1] for c in curve], "o-", color="tab:green")
    axes[2].set_xlabel("optimizer step")
    axes[2].set_ylabel("% correct")
    axes[2].set_ylim(0, 100)
    axes[2].set_title("held-out accuracy (greedy)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_quickstart(cfg: QuickstartConfig, log=print) -> dict:
    t0 = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log("posttrain quickstart: the built-in tiny world (arithmetic word problems, verifiable answers)")
    paths = write_world_datasets(out / "data", n_train=cfg.train_examples, n_heldout=cfg.eval_problems,
                                 seed=cfg.seed)
    log(f"data: {cfg.train_examples} SFT conversations, {cfg.eval_problems} held-out problems -> {out / 'data'}")

    sft = cfg.sft
    tokenizer = load_tokenizer(sft.model.name_or_path)
    model = load_causal_lm(sft.model.name_or_path, dtype=sft.model.dtype, device=sft.model.device,
                           attn_implementation=sft.model.attn_implementation)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"base model: {sft.model.name_or_path} ({model.config.model_type}, {n_params / 1e6:.1f}M parameters)")
    problems = generate_problems(cfg.eval_problems, seed=cfg.seed, split="heldout")
    curve_set = problems[: cfg.curve_problems]

    log(f"\n[1/3] evaluating the base model on {len(problems)} held-out problems (chat prompt, greedy)")
    base = evaluate_problems(model, tokenizer, problems, max_new_tokens=cfg.max_new_tokens, progress=True)
    log(f"      accuracy {_fmt_pct(base.accuracy).strip()}, format compliance "
        f"{_fmt_pct(base.format_compliance).strip()}")

    sft.data.train = str(paths["sft_train"])
    sft.data.eval = str(paths["sft_heldout"])
    sft.train.output_dir = str(out / "sft")
    sft.train.seed = cfg.seed
    curve: list[tuple[int, float]] = [(0, sum(s["correct"] for s in base.samples[: len(curve_set)]) / len(curve_set))]

    def extra_eval(m) -> dict:
        res = evaluate_problems(m, tokenizer, curve_set, max_new_tokens=cfg.max_new_tokens)
        return {"heldout_accuracy": res.accuracy, "format_compliance": res.format_compliance}

    log("\n[2/3] SFT: assistant-only loss, packed rows, AdamW + warmup/cosine")
    result = run_sft(sft, model=model, tokenizer=tokenizer, log=log, extra_eval=extra_eval,
                     eval_times=cfg.curve_points + 1)
    for e in result.fit.eval_history:
        if "heldout_accuracy" in e:
            curve.append((e["step"], e["heldout_accuracy"]))

    log(f"\n[3/3] evaluating the SFT model on the same {len(problems)} held-out problems")
    tuned = evaluate_problems(model, tokenizer, problems, max_new_tokens=cfg.max_new_tokens, progress=True)
    elapsed = time.time() - t0

    table = results_table(base, tuned)
    plot_path = out / "learning_curves.png"
    plot_curves(result.fit.history, result.fit.eval_history, curve, plot_path)
    summary = {
        "base": base.metrics(),
        "sft": tuned.metrics(),
        "sft_steps": result.fit.steps,
        "sft_seconds": round(result.fit.seconds, 1),
        "total_seconds": round(elapsed, 1),
        "learning_curve": curve,
        "data": result.encode_summary,
        "padding": result.padding_summary,
        "config": dataclasses.asdict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (out / "samples.jsonl").open("w") as fh:
        for b, s in zip(base.samples, tuned.samples):
            fh.write(json.dumps({"question": b["question"], "answer": b["answer"],
                                 "base": b["response"], "sft": s["response"]}) + "\n")
    log("\n" + table)
    ex = next((s for s in tuned.samples if s["correct"] and s["level"] >= 3), tuned.samples[0])
    log(f"\nexample (held-out): {ex['question']}\nSFT model: {ex['response']!r}")
    log(f"\nrun directory: {out}/  (summary.json, samples.jsonl, learning_curves.png, sft/metrics.jsonl, "
        f"sft/checkpoints/, sft/final/)")
    log(f"total time: {elapsed / 60:.1f} min")
    return summary
