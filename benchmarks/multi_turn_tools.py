"""Does the tiny world's model learn to use a calculator? No-tool SFT vs tool SFT vs tool SFT + RL
(docs/multi_turn.md).

    python benchmarks/multi_turn_tools.py --out runs/multi-turn      # ~25 min on 2 cores

From the shipped base model (builtin:tiny-world-base), the same SFT recipe as the quickstart
(one epoch over ``--sft-examples`` conversations, lr 1e-3, packed rows of 384 tokens):

- ``sft-notool``: the world's worked solutions (one assistant turn, "a op b = c" lines, "#### n");
- ``sft-tool``: the same problems, a fixed half of them solved with the calculator (one call per
  step, the result as a tool turn, then "#### n"), the other half worked; every prompt lists the
  tool (builtin:world-tool-sft);
- ``rl-notool``: sft-notool + GRPO, single-turn (``--rl-steps`` steps of 16 prompts x 8 samples);
- ``rl-tool``: sft-tool + GRPO in the calculator environment (env.name=world-calculator), the
  same steps, prompts and samples.

Every model is evaluated greedily on the same ``--eval-problems`` held-out problems: the no-tool
models single-turn, the tool models as calculator episodes. Reported per model: accuracy overall
and per level, tool calls per problem, malformed-call rate, episode turns; written to
``<out>/results.json`` and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def sft(out: Path, name: str, data: Path, seed: int) -> Path:
    from posttrain.algorithms.sft import SFTConfig, run_sft
    from posttrain.config import load_config

    cfg = load_config(SFTConfig, None, [
        "model.name_or_path=builtin:tiny-world-base", f"data.train={data}", "data.eval=null", "data.max_length=384",
        f"train.output_dir={out / name}", "train.overwrite_output_dir=true", "train.progress=false",
        "train.lr=1e-3", "train.epochs=1", "train.micro_batch_size=4", "train.warmup_ratio=0.05",
        "train.min_lr_ratio=0.1", "train.save_every=0", f"train.seed={seed}"])
    t0 = time.time()
    res = run_sft(cfg, log=lambda s: None)
    print(f"[{name}] {res.fit.steps} steps in {time.time() - t0:.0f} s", flush=True)
    return Path(res.final_dir)


def rl(out: Path, name: str, start: Path, steps: int, tools: bool, seed: int) -> tuple[Path, list]:
    from posttrain.algorithms.rl import RLConfig, run_rl
    from posttrain.config import load_config

    args = [f"model.name_or_path={start}", "algorithm=grpo", f"train.output_dir={out / name}",
            "train.overwrite_output_dir=true", "train.progress=false", "train.save_every=0", "train.lr=3e-5",
            f"train.max_steps={steps}", "train.micro_batch_size=16", "rollout.group_size=8",
            "rollout.prompts_per_step=16", "rollout.max_new_tokens=64", "rollout.samples_every=10", "data.eval=null",
            f"train.seed={seed}"]
    if tools:
        args += ["env.name=world-calculator", "env.max_turns=6", "env.max_total_tokens=320", "data.max_prompt_length=128",
                 "data.train=builtin:world-problems"]
    t0 = time.time()
    res = run_rl(load_config(RLConfig, None, args), log=lambda s: None)
    print(f"[{name}] {steps} steps in {time.time() - t0:.0f} s", flush=True)
    return Path(res.final_dir), res.fit.history


def evaluate(model_dir: Path, tools: bool, n: int) -> dict:
    from posttrain.algorithms.online.prompts import encode_prompts
    from posttrain.algorithms.online.evaluate import evaluate_model
    from posttrain.algorithms.rl import RLConfig
    from posttrain.algorithms.rl.multiturn import EpisodeSampler, evaluate_episodes
    from posttrain.config import load_config
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.rewards import resolve_reward_functions
    from posttrain.rollout import SamplingParams
    from posttrain.world.sources import builtin_records

    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), dtype="float32", device="cpu")
    ds = builtin_records("builtin:world-problems-heldout", kinds=("prompts",), n=n, n_heldout=n, seed=0,
                         key="eval", what="prompts")
    prompts, _ = encode_prompts(ds, tok, max_prompt_length=256)
    fns = resolve_reward_functions(["world_correct"], None, options={}, tokenizer=tok, device="cpu")
    levels = [p.fields["level"] for p in prompts]
    if tools:
        cfg = load_config(RLConfig, None, ["env.name=world-calculator", "env.max_turns=6", "env.max_total_tokens=320",
                                           "rollout.max_new_tokens=64"])
        metrics, recs = evaluate_episodes(model, tok, EpisodeSampler(cfg), prompts, fns)
        correct = [r["rewards"]["world_correct"] or 0.0 for r in recs]
        extra = {"tool_calls": metrics["eval_episode/tool_calls"], "malformed_rate": metrics["eval_episode/malformed_rate"],
                 "turns": metrics["eval_episode/turns"], "truncated": 1 - metrics["eval_episode/end_done"]}
        calls_by_level = {lv: sum(r["tool_calls"] for r, x in zip(recs, levels) if x == lv) /
                          max(1, levels.count(lv)) for lv in (1, 2, 3, 4)}
        extra["tool_calls_by_level"] = calls_by_level
    else:
        res = evaluate_model(model, tok, prompts, fns, SamplingParams(96, temperature=0.0), shared=False)
        correct = [s["rewards"]["world_correct"] or 0.0 for s in res.samples]
        extra = {"tool_calls": 0.0, "malformed_rate": 0.0, "turns": 1.0,
                 "truncated": 1 - res.metrics["finished"]}
    acc = {"all": sum(correct) / len(correct)}
    for lv in (1, 2, 3, 4):
        rows = [c for c, x in zip(correct, levels) if x == lv]
        acc[f"level{lv}"] = sum(rows) / max(1, len(rows))
    del model
    return {"accuracy": acc, **extra, "problems": len(prompts)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/multi-turn")
    ap.add_argument("--sft-examples", type=int, default=8000)
    ap.add_argument("--tool-fraction", type=float, default=0.5)
    ap.add_argument("--rl-steps", type=int, default=40)
    ap.add_argument("--eval-problems", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="evaluate an arm's existing <out>/<arm>/final instead of "
                    "training it again")
    ap.add_argument("--only", nargs="*", default=None, help="run only these arms (sft-notool sft-tool rl-notool "
                    "rl-tool); the later ones reuse the earlier ones' models in --out")
    args = ap.parse_args(argv)

    from posttrain.data.formats import write_jsonl
    from posttrain.world.datasets import sft_record, tool_sft_records
    from posttrain.world.tasks import generate_problems

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = args.only or ["sft-notool", "sft-tool", "rl-notool", "rl-tool"]
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    notool_data, tool_data = out / "sft_notool.jsonl", out / "sft_tool.jsonl"
    if not notool_data.exists():
        write_jsonl(notool_data, [sft_record(p) for p in generate_problems(args.sft_examples, seed=args.seed,
                                                                           split="train")])
        write_jsonl(tool_data, tool_sft_records(args.sft_examples, seed=args.seed, split="train",
                                                tool_fraction=args.tool_fraction))
    for arm in arms:
        t0 = time.time()
        tools = arm.endswith("-tool")
        history = None
        if args.reuse and (out / arm / "final").exists():
            model_dir = out / arm / "final"
        elif arm.startswith("sft"):
            model_dir = sft(out, arm, tool_data if tools else notool_data, args.seed)
        else:
            start = out / arm.replace("rl", "sft") / "final"
            model_dir, history = rl(out, arm, start, args.rl_steps, tools, args.seed)
        r = evaluate(model_dir, tools, args.eval_problems)
        r["seconds"] = round(time.time() - t0, 1)
        if history:
            keys = ["reward/mean", "episode/tool_calls", "episode/malformed_rate", "episode/turns"]
            r["train_curve"] = [{k: h.get(k) for k in ["step", *keys] if k in h} for h in history]
        results[arm] = r
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps({arm: {k: v for k, v in r.items() if k != "train_curve"}}), flush=True)
    print("\n| model | all | L1 | L2 | L3 | L4 | tool calls / problem | malformed | turns |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arm, r in results.items():
        a = r["accuracy"]
        print(f"| {arm} | {a['all']:.1%} | {a['level1']:.1%} | {a['level2']:.1%} | {a['level3']:.1%} | "
              f"{a['level4']:.1%} | {r['tool_calls']:.2f} | {r['malformed_rate']:.1%} | {r['turns']:.2f} |")


if __name__ == "__main__":
    main()
