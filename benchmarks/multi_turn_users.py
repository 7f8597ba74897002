"""Over-fitting to a simulated user? SFT and GRPO with the tiny world's piece-by-piece user,
evaluated with that user and with a held-out user strategy (docs/multi_turn.md).

    python benchmarks/multi_turn_users.py --out runs/multi-turn-users      # ~15 min on 2 cores

- ``pieces-sft``: the shipped base model, SFT on ``builtin:world-pieces-sft`` (the training
  user's conversations: one sentence per turn, running totals, ``#### n``), the quickstart's SFT
  recipe;
- ``pieces-rl``: pieces-sft + GRPO in ``world-pieces`` (the training user), ``--rl-steps`` steps of
  16 prompts x 8 episodes, reward ``world_correct`` on the final reply only (turns earn nothing
  of their own: credit reaches an early turn only through the final answer).

Both are evaluated greedily on the same held-out problems with the training user
(``world-pieces``) and the held-out user (``world-pieces-heldout-user``: two sentences per turn,
other wording). Written to ``<out>/results.json`` with the training curve (reward per step).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def evaluate(model_dir: Path, env: str, n: int) -> dict:
    from posttrain.algorithms.online.prompts import encode_prompts
    from posttrain.algorithms.rl import RLConfig
    from posttrain.algorithms.rl.multiturn import EpisodeSampler, evaluate_episodes
    from posttrain.config import load_config
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.rewards import resolve_reward_functions
    from posttrain.world.sources import builtin_records

    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), dtype="float32", device="cpu")
    ds = builtin_records("builtin:world-pieces-heldout", kinds=("prompts",), n=n, n_heldout=n, seed=0, key="eval",
                         what="prompts")
    prompts, _ = encode_prompts(ds, tok, max_prompt_length=256)
    fns = resolve_reward_functions(["world_correct"], None, options={}, tokenizer=tok, device="cpu")
    cfg = load_config(RLConfig, None, [f"env.name={env}", "env.max_turns=8", "env.max_total_tokens=256",
                                       "rollout.max_new_tokens=32"])
    metrics, recs = evaluate_episodes(model, tok, EpisodeSampler(cfg), prompts, fns)
    levels = [p.fields["level"] for p in prompts]
    correct = [r["rewards"]["world_correct"] or 0.0 for r in recs]
    acc = {"all": sum(correct) / len(correct)}
    for lv in (1, 2, 3, 4):
        rows = [c for c, x in zip(correct, levels) if x == lv]
        acc[f"level{lv}"] = sum(rows) / max(1, len(rows))
    return {"accuracy": acc, "turns": metrics["eval_episode/turns"],
            "finished": metrics["eval_episode/end_done"], "problems": len(prompts)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/multi-turn-users")
    ap.add_argument("--sft-examples", type=int, default=8000)
    ap.add_argument("--rl-steps", type=int, default=60)
    ap.add_argument("--eval-problems", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from posttrain.algorithms.rl import RLConfig, run_rl
    from posttrain.algorithms.sft import SFTConfig, run_sft
    from posttrain.config import load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    t0 = time.time()
    sft = run_sft(load_config(SFTConfig, None, [
        "model.name_or_path=builtin:tiny-world-base", "data.train=builtin:world-pieces-sft", "data.eval=null",
        f"data.world_examples={args.sft_examples}", "data.max_length=256", f"train.output_dir={out / 'pieces-sft'}",
        "train.overwrite_output_dir=true", "train.progress=false", "train.lr=1e-3", "train.epochs=1",
        "train.micro_batch_size=4", "train.warmup_ratio=0.05", "train.min_lr_ratio=0.1", "train.save_every=0",
        f"train.seed={args.seed}"]), log=lambda s: None)
    results["pieces-sft"] = {"seconds": round(time.time() - t0, 1), "steps": sft.fit.steps}
    t0 = time.time()
    grpo = run_rl(load_config(RLConfig, None, [
        f"model.name_or_path={sft.final_dir}", "algorithm=grpo", f"train.output_dir={out / 'pieces-rl'}",
        "train.overwrite_output_dir=true", "train.progress=false", "train.save_every=0", "train.lr=3e-5",
        f"train.max_steps={args.rl_steps}", "train.micro_batch_size=16", "rollout.group_size=8",
        "rollout.prompts_per_step=16", "rollout.max_new_tokens=32", "rollout.samples_every=10",
        "data.train=builtin:world-pieces", "data.eval=null", "env.name=world-pieces", "env.max_turns=8",
        "env.max_total_tokens=256", f"train.seed={args.seed}"]), log=lambda s: None)
    results["pieces-rl"] = {"seconds": round(time.time() - t0, 1),
                            "train_curve": [{"step": h["step"], "reward": h.get("reward/mean"),
                                             "turns": h.get("episode/turns")} for h in grpo.fit.history
                                            if "reward/mean" in h]}
    for arm, model_dir in (("pieces-sft", sft.final_dir), ("pieces-rl", grpo.final_dir)):
        for env in ("world-pieces", "world-pieces-heldout-user"):
            results[arm][env] = evaluate(Path(model_dir), env, args.eval_problems)
            print(json.dumps({arm: {env: results[arm][env]}}), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| model | user | all | L1 | L2 | L3 | L4 | turns |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in ("pieces-sft", "pieces-rl"):
        for env in ("world-pieces", "world-pieces-heldout-user"):
            r = results[arm][env]
            a = r["accuracy"]
            print(f"| {arm} | {env} | {a['all']:.1%} | {a['level1']:.1%} | {a['level2']:.1%} | {a['level3']:.1%} | "
                  f"{a['level4']:.1%} | {r['turns']:.2f} |")
    curve = results["pieces-rl"]["train_curve"]
    k = max(1, len(curve) // 6)
    print("training reward (mean of 16 x 8 episodes):", ", ".join(f"step {c['step']}: {c['reward']:.3f}"
                                                                   for c in curve[::k]))


if __name__ == "__main__":
    main()
