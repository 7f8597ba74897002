"""Distillation on the tiny world at a fixed small budget (docs/distillation.md).

    python benchmarks/distill_tiny_world.py --teacher runs/quickstart/sft/final     # ~6 min here

The student starts from the tiny world's base model; the teacher is the quickstart's SFT model
(86.0% held-out). Every variant gets the same budget: ``--steps`` optimizer steps of the
quickstart's SFT recipe (packed rows of 4 x 256 tokens, lr 1e-3, warmup 5%, cosine to 10%):

- SFT on the world's reference solutions alone;
- token-level KD on the same data: forward KL, reverse KL, JSD (beta 0.5), temperature 1;
- SeqKD: SFT on the teacher's greedy answers to the same problems, kept only when the verifier
  accepts them;
- on-policy distillation: reverse KL on the student's own samples (temperature 1, at most 64
  tokens) at every step (``loss.on_policy_fraction=1``), starting from the ``sft`` variant's
  student when ``sft`` runs first (``--variants sft,on_policy``): from the base model it cannot
  work, since the base model's samples are not chat answers.

Reports held-out accuracy (200 problems, greedy) and wall time; writes ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", default="builtin:tiny-world-base")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="runs/distill-tiny-world")
    ap.add_argument("--variants", default="sft,forward_kl,reverse_kl,jsd,seqkd")
    args = ap.parse_args(argv)

    from posttrain.algorithms.distill import DistillConfig, run_distill
    from posttrain.algorithms.sft import SFTConfig, run_sft
    from posttrain.config import load_config
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.world.evaluate import evaluate_problems
    from posttrain.world.tasks import generate_problems

    out = Path(args.out)
    common = [f"model.name_or_path={args.student}", f"train.max_steps={args.steps}", f"train.lr={args.lr}",
              "train.micro_batch_size=4", "train.warmup_ratio=0.05", "train.min_lr_ratio=0.1", "train.epochs=0",
              "data.max_length=256", "data.eval=null", "train.progress=false", "train.overwrite_output_dir=true",
              "train.save_every=0"]
    tok = load_tokenizer(args.teacher)
    problems = generate_problems(200, seed=0, split="heldout")
    rows = []
    for variant in args.variants.split(","):
        t0 = time.time()
        run_dir = out / variant
        if variant == "sft":
            res = run_sft(load_config(SFTConfig, None, common + [f"train.output_dir={run_dir}"]), log=lambda s: None)
        else:
            if variant == "seqkd":
                mode = ["loss.mode=seqkd", "loss.filter=[world_correct]", "loss.max_new_tokens=96"]
            elif variant == "on_policy":
                # from the SFT variant's student when this run made one (listed before on_policy)
                sft_student = out / "sft" / "final"
                mode = ["loss.mode=on_policy", "loss.divergence=reverse_kl", "loss.on_policy_fraction=1",
                        "loss.sample_temperature=1.0", "loss.max_new_tokens=64"] + (
                    [f"model.name_or_path={sft_student}"] if sft_student.is_dir() else [])
            else:
                mode = [f"loss.divergence={variant}"]
            cfg = load_config(DistillConfig, None, common + [f"train.output_dir={run_dir}",
                                                             f"teacher.name_or_path={args.teacher}", *mode])
            res = run_distill(cfg, log=lambda s: None)
        seconds = time.time() - t0
        acc = evaluate_problems(load_causal_lm(str(res.final_dir), device="cpu"), tok, problems).accuracy
        rows.append({"variant": variant, "accuracy": acc, "seconds": seconds, "lr": args.lr})
        print(f"| {variant} | {100 * acc:.1f}% | {seconds:.0f} s |", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    old = json.loads(results.read_text())["rows"] if results.is_file() else []
    keep = [r for r in old if r["variant"] not in {x["variant"] for x in rows}]
    results.write_text(json.dumps({"steps": args.steps, "lr": args.lr, "rows": keep + rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
