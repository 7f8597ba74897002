"""Every online-RL preset from the same SFT checkpoint on the same budget (docs/online_rl.md).

    python benchmarks/rl_presets.py --sft runs/quickstart/sft/final --steps 40 --out runs/rl-presets

For each preset: ``posttrain rl algorithm=<preset>`` with identical rollout settings (prompts
per step, G, max_new_tokens, temperature), learning rate and step count, then the tiny world's
held-out evaluation (200 problems, greedy). Reported: held-out accuracy overall and at levels
3 and 4, the KL to the SFT model (nats per completion, k1 on the last rollouts), token entropy
and mean completion length at the end, and wall time. A table in Markdown is printed and
written to ``<out>/table.md`` (plus ``results.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from posttrain.algorithms.rl import PRESETS, RLConfig, run_rl
from posttrain.config import load_config
from posttrain.models.loading import load_causal_lm, load_tokenizer
from posttrain.world.evaluate import evaluate_problems
from posttrain.world.tasks import generate_problems


def _tail_mean(rows: list[dict], key: str, frac: float = 0.2) -> float | None:
    vals = [r[key] for r in rows if key in r]
    if not vals:
        return None
    k = max(1, int(len(vals) * frac))
    return sum(vals[-k:]) / k


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", required=True, help="SFT model directory (e.g. runs/quickstart/sft/final)")
    ap.add_argument("--out", default="runs/rl-presets")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--eval-problems", type=int, default=200)
    ap.add_argument("overrides", nargs="*", help="extra key=value for every run (e.g. train.lr=1e-4)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(args.sft)
    problems = generate_problems(args.eval_problems, seed=0, split="heldout")
    sft_model = load_causal_lm(args.sft)
    base = evaluate_problems(sft_model, tok, problems, max_new_tokens=64)
    rows = [{"preset": "SFT (start)", "accuracy": base.accuracy, "level3": base.per_level.get(3),
             "level4": base.per_level.get(4), "kl": 0.0, "entropy": None,
             "length": base.mean_response_tokens, "seconds": 0.0}]
    for preset in args.presets.split(","):
        model = load_causal_lm(args.sft)
        cfg = load_config(RLConfig, None, [
            f"algorithm={preset}", f"model.name_or_path={args.sft}", f"train.output_dir={out / preset}",
            "train.overwrite_output_dir=true", f"train.max_steps={args.steps}", "train.progress=false",
            "data.eval=null", *args.overrides])
        t0 = time.time()
        res = run_rl(cfg, model=model, tokenizer=tok, log=lambda line: None)
        seconds = time.time() - t0
        ev = evaluate_problems(model, tok, problems, max_new_tokens=64)
        hist = res.fit.history
        row = {"preset": preset, "accuracy": ev.accuracy, "level3": ev.per_level.get(3),
               "level4": ev.per_level.get(4), "kl": _tail_mean(hist, "rollout/kl_seq"),
               "entropy": _tail_mean(hist, "entropy"), "length": ev.mean_response_tokens, "seconds": seconds,
               "reward_first": sum(h["reward/mean"] for h in hist[:5]) / min(5, len(hist)),
               "reward_last": _tail_mean(hist, "reward/mean")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")

    def pct(x):
        return "" if x is None else f"{100 * x:.1f}%"

    def num(x, fmt=".3f"):
        return "" if x is None else format(x, fmt)

    lines = ["| preset | held-out accuracy | level 3 | level 4 | KL to SFT (nats/answer) | entropy | mean tokens | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {pct(r['accuracy'])} | {pct(r['level3'])} | {pct(r['level4'])} | "
                     f"{num(r['kl'])} | {num(r['entropy'])} | {num(r['length'], '.1f')} | {r['seconds']:.0f} s |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
