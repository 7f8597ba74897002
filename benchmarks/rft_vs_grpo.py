"""Rejection-sampling fine-tuning vs GRPO on the tiny world at the same sampling budget
(docs/rft.md).

    python benchmarks/rft_vs_grpo.py --sft runs/quickstart/sft/final     # ~12 min here

Both start from the quickstart's SFT model and sample ``--samples`` completions in all
(temperature 1, at most 64 new tokens, the world's verifier as reward):

- RFT: rounds of 1000 prompts x 8 samples; keep the correct, finished, distinct samples (at most
  4 per prompt); one epoch of SFT on them (lr 1e-4, packed rows of 8 x 320 tokens);
- GRPO: the quickstart's RL stage settings (16 prompts x 8 samples per step, lr 2e-5, k3 KL in
  the loss with beta 0.04), run for ``--samples / 128`` steps, evaluated as often as RFT has
  rounds.

Reports held-out accuracy (200 problems, greedy) after each round / at the same sample counts,
the reward on the training samples and the wall time; writes ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", required=True, help="the SFT model (e.g. runs/quickstart/sft/final)")
    ap.add_argument("--samples", type=int, default=32000, help="sampled completions per method")
    ap.add_argument("--out", default="runs/rft-vs-grpo")
    args = ap.parse_args(argv)

    from posttrain.algorithms.rft import RFTConfig, run_rft
    from posttrain.algorithms.rl import RLConfig, run_rl
    from posttrain.config import load_config

    out = Path(args.out)
    per_round = 1000 * 8
    rounds = max(1, args.samples // per_round)
    t0 = time.time()
    rft = run_rft(load_config(RFTConfig, None, [
        f"model.name_or_path={args.sft}", f"train.output_dir={out / 'rft'}", "train.overwrite_output_dir=true",
        "train.progress=false", "train.save_every=0", f"sampling.rounds={rounds}", "sampling.prompts_per_round=1000",
        "sampling.samples_per_prompt=8"]), log=lambda s: None)
    rft_seconds = time.time() - t0
    rows = [{"method": "rft", "samples": r["round"] * per_round, "accuracy": r["eval_reward/world_correct"],
             "train_reward": r.get("reward_mean"), "pass_at_8": r.get("pass_at_k"), "kept": r.get("kept")}
            for r in rft.rounds]
    for r in rows:
        print(json.dumps(r), flush=True)
    steps = args.samples // 128
    t0 = time.time()
    grpo = run_rl(load_config(RLConfig, None, [
        "algorithm=grpo", f"model.name_or_path={args.sft}", f"train.output_dir={out / 'grpo'}",
        "train.overwrite_output_dir=true", "train.progress=false", "train.save_every=0", "train.lr=2e-5",
        f"train.max_steps={steps}", "train.micro_batch_size=16", "rollout.group_size=8", "rollout.prompts_per_step=16",
        "rollout.max_new_tokens=64", "rollout.samples_every=0"]), log=lambda s: None, eval_times=rounds)
    grpo_seconds = time.time() - t0
    hist = grpo.fit.history
    grpo_rows = [{"method": "grpo", "samples": e["step"] * 128, "accuracy": e["eval_reward/world_correct"],
                  "train_reward": sum(h["reward/mean"] for h in hist[max(0, e["step"] - 10):e["step"]])
                  / len(hist[max(0, e["step"] - 10):e["step"]])}
                 for e in grpo.fit.eval_history]
    for r in grpo_rows:
        print(json.dumps(r), flush=True)
    rows += grpo_rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({
        "samples": args.samples, "rft_seconds": rft_seconds, "grpo_seconds": grpo_seconds, "rows": rows}, indent=2)
        + "\n")
    print(f"rft {rft_seconds:.0f} s, grpo {grpo_seconds:.0f} s")


if __name__ == "__main__":
    main()
