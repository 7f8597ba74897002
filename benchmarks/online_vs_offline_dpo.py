"""Online vs offline DPO on the tiny world at the same budget (docs/online_dpo.md).

    python benchmarks/online_vs_offline_dpo.py --sft runs/quickstart/sft/final     # ~15 min here

Every variant starts from the quickstart's SFT model and takes the same number of optimizer
steps on the same number of pairs (``--steps`` x 8 pairs, lr 5e-5, beta 0.1; the default 125
steps are the quickstart's DPO stage: one epoch of its 1000 pairs):

- offline DPO / DPOP: the world's fixed preference pairs (correct vs one-slip solution);
- online DPO: each step samples 8 prompts x 4 completions from the current policy, scores them
  with the world's verifier and pairs the best with the worst (ties skipped, more prompts
  drawn); reference = the SFT model (``initial``) or the policy at each step's start
  (``refresh``).

Reports held-out accuracy (200 problems, greedy), the chosen responses' log-ratio to the SFT
model at the end (likelihood displacement: negative = the preferred answers lost probability),
the steps the displacement monitor flagged, and wall time; writes ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", required=True, help="the SFT model (e.g. runs/quickstart/sft/final)")
    ap.add_argument("--steps", type=int, default=125)
    ap.add_argument("--out", default="runs/online-vs-offline-dpo")
    ap.add_argument("--variants", default="offline_dpo,offline_dpop,online_initial,online_refresh")
    args = ap.parse_args(argv)

    import torch

    from posttrain.algorithms.dpo import DPOConfig, run_preference
    from posttrain.algorithms.online_dpo import OnlineDPOConfig, run_online_dpo
    from posttrain.algorithms.sequences import collate_examples, reference_log_probs
    from posttrain.config import load_config
    from posttrain.data import EncodedExample
    from posttrain.data.chat import render_prompt
    from posttrain.rollout.sampler import sample_groups
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.world.evaluate import evaluate_problems
    from posttrain.world.tasks import generate_problems

    out = Path(args.out)
    tok = load_tokenizer(args.sft)
    problems = generate_problems(200, seed=0, split="heldout")
    common = [f"model.name_or_path={args.sft}", "train.lr=5e-5", "train.micro_batch_size=8", "loss.beta=0.1",
              "train.progress=false", "train.overwrite_output_dir=true", "train.save_every=0", "train.log_every=1"]
    # the displacement probe: the SFT model's own greedy answers to 100 held-out problems
    sft = load_causal_lm(args.sft, device="cpu")
    probe = generate_problems(100, seed=1, split="heldout")
    ids = [render_prompt(tok, p.question) for p in probe]
    rolls = sample_groups(sft, tok, ids, group_size=1, max_new_tokens=96, temperature=0.0)
    probe_ex = [EncodedExample(input_ids=r.prompt_ids + r.completion_ids,
                               labels=[-100] * len(r.prompt_ids) + r.completion_ids) for r in rolls]
    batch = collate_examples(probe_ex, pad_token_id=tok.pad_token_id, packing=False, row_length=512)
    with torch.no_grad():
        base_lp = reference_log_probs(sft, batch)
    rows = []
    for variant in args.variants.split(","):
        t0 = time.time()
        run_dir = out / variant
        if variant.startswith("offline"):
            loss = variant.split("_", 1)[1]
            cfg = load_config(DPOConfig, None, common + [f"train.output_dir={run_dir}", f"loss.name={loss}",
                                                         f"train.max_steps={args.steps}", "train.epochs=0",
                                                         "train.warmup_ratio=0.1",
                                                         f"data.world_examples={8 * args.steps}"])
            res = run_preference(cfg, log=lambda s: None)
        else:
            ref = variant.split("_", 1)[1]
            cfg = load_config(OnlineDPOConfig, None, common + [
                f"train.output_dir={run_dir}", f"online.reference={ref}", f"train.max_steps={args.steps}",
                "rollout.prompts_per_step=8", "rollout.group_size=4", "rollout.max_new_tokens=64",
                "data.eval=null", "rollout.samples_every=25", "train.warmup_ratio=0.1", "train.min_lr_ratio=0.1"])
            res = run_online_dpo(cfg, log=lambda s: None)
        seconds = time.time() - t0
        model = load_causal_lm(str(res.final_dir), device="cpu")
        acc = evaluate_problems(model, tok, problems).accuracy
        with torch.no_grad():
            lp = reference_log_probs(model, batch)
        probe_ratio = float((lp - base_lp).mean())
        flags = sum(int(h.get("likelihood_displacement", 0)) for h in res.fit.history)
        tail = [h["chosen_logratio"] for h in res.fit.history[-20:] if "chosen_logratio" in h]
        row = {"variant": variant, "accuracy": acc, "seconds": seconds, "sft_answers_logratio": probe_ratio,
               "chosen_logratio_last20": sum(tail) / len(tail) if tail else math.nan, "displacement_steps": flags}
        if not variant.startswith("offline"):
            hist = [h for h in res.fit.history if "pairs" in h]
            row["tied_prompts_per_step"] = sum(h["pairs/tied_prompts"] for h in hist) / len(hist)
            row["sampled_prompts_per_step"] = sum(h["pairs/sampled_prompts"] for h in hist) / len(hist)
            row["reward_first10"] = sum(h["reward/mean"] for h in hist[:10]) / len(hist[:10])
            row["reward_last10"] = sum(h["reward/mean"] for h in hist[-10:]) / len(hist[-10:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
