"""Constitutional AI on the tiny world: a trained judge and reviser, the loop, and what it gains
(docs/cai.md).

    python benchmarks/cai_tiny_world.py --sft runs/quickstart/sft/final     # ~30 min here

1. Train the world's **judge** and **reviser** with ``posttrain sft`` from the SFT model on the
   records the world builds by construction (``builtin:world-judge``: Yes/No and A/B answers
   under a principle; ``builtin:world-revise``: critique "Step k is wrong." and the rewritten
   solution), in exactly the templates and conversation layout the loop uses. Their held-out
   accuracy on fresh records of the same kind is reported.
2. Run ``posttrain cai`` with the world constitution (arithmetic, answer-line) from the SFT
   model: one response per prompt at temperature 1, ``--rounds`` critique/revision rounds, the
   judge scoring and comparing, SFT on the revisions. Logged: the judge's agreement with the
   gold verifier, revision success / breakage, pairs and their gold agreement, held-out
   accuracy before and after.
3. ``posttrain dpo`` (sigmoid, beta 0.1) on the loop's AI-labelled pairs.jsonl, and two controls
   of the SFT stage with the same optimizer settings: SFT on the policy's own unrevised
   responses to the same prompts, and SFT on the gold worked solutions of those prompts.

Writes ``<out>/<tag>/results.json``; held-out accuracy is over the world's 200 held-out problems.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", required=True, help="the SFT model (e.g. runs/quickstart/sft/final)")
    ap.add_argument("--out", default="runs/cai")
    ap.add_argument("--prompts", type=int, default=1024, help="prompts answered and revised")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--role-examples", type=int, default=6000, help="records to train the judge / reviser on")
    ap.add_argument("--lr", type=float, default=3e-5, help="learning rate of the SFT stage (and its controls)")
    ap.add_argument("--skip-roles", action="store_true", help="reuse the trained judge and reviser in <out>")
    ap.add_argument("--reasoning-judge", action="store_true",
                    help="train and use a reasoning judge (builtin:world-judge-reasoning, judge.reasoning=true): it "
                    "writes the worked solution before its verdict")
    ap.add_argument("--pairs", default="compare", choices=("compare", "score"), help="judge.pairs of the loop")
    ap.add_argument("--tag", default="loop", help="subdirectory of <out> for the loop and what trains on it")
    args = ap.parse_args(argv)

    from posttrain.algorithms.cai import CAIConfig, run_cai
    from posttrain.algorithms.dpo import DPOConfig, run_preference
    from posttrain.algorithms.sft import SFTConfig, run_sft
    from posttrain.config import load_config
    from posttrain.data.chat import render_prompt
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.rewards.judge import final_line, parse_choice, parse_verdict
    from posttrain.rollout.sampler import sample_groups
    from posttrain.world import feedback as fb
    from posttrain.world.evaluate import evaluate_problems
    from posttrain.world.tasks import generate_problems

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"sft": args.sft, "prompts": args.prompts, "rounds": args.rounds}
    heldout = generate_problems(200, seed=0, split="heldout")

    def accuracy(path) -> float:
        m = load_causal_lm(str(path), device="cpu")
        return evaluate_problems(m, load_tokenizer(str(path)), heldout, max_new_tokens=96).accuracy

    # 1. the roles
    judge_dir = "judge-reasoning" if args.reasoning_judge else "judge"
    roles = {judge_dir: "builtin:world-judge" + ("-reasoning" if args.reasoning_judge else ""),
             "reviser": "builtin:world-revise"}
    for name, data in roles.items():
        if args.skip_roles:
            continue
        t0 = time.time()
        cfg = load_config(SFTConfig, None, [
            f"model.name_or_path={args.sft}", f"data.train={data}", f"data.world_examples={args.role_examples}",
            "data.max_length=512", "train.lr=3e-4", "train.micro_batch_size=4", "train.warmup_ratio=0.05",
            f"train.output_dir={out / name}", "train.overwrite_output_dir=true", "train.save_every=0",
            "train.progress=false"])
        res = run_sft(cfg, log=lambda s: None)
        results[f"{name}/seconds"] = time.time() - t0
        results[f"{name}/eval_loss"] = res.eval_metrics.get("eval_loss")
        print(f"{name}: trained in {results[f'{name}/seconds']:.0f}s, eval loss {results[f'{name}/eval_loss']}")

    # held-out role accuracy on fresh records of the kind they were trained on
    for name in (judge_dir, "reviser"):
        path = out / name / "final"
        m, tok = load_causal_lm(str(path), device="cpu"), load_tokenizer(str(path))
        recs = (fb.revise_records(400, seed=7, split="heldout") if name == "reviser" else
                fb.judge_records(400, seed=7, split="heldout", reasoning=args.reasoning_judge))
        ids = [render_prompt(tok, r["prompt"]) for r in recs]
        long = name == "reviser" or args.reasoning_judge
        rolls = sample_groups(m, tok, ids, group_size=1, max_new_tokens=96 if long else 8,
                              temperature=0.0, batch_size=64)
        gold = [final_line(r["completion"][0]["content"]) if name != "reviser" else r["completion"][0]["content"]
                for r in recs]
        if name != "reviser":
            name = "judge"
            parsed = [parse_choice(final_line(r.text)) if g in "AB" else parse_verdict(final_line(r.text))
                      for r, g in zip(rolls, gold)]
            want = [g if g in "AB" else g == "Yes" for g in gold]
            results["judge/heldout_accuracy"] = sum(p == w for p, w in zip(parsed, want)) / len(gold)
            results["judge/heldout_unparseable"] = sum(p is None for p in parsed)
        else:
            crit = [(r.text.strip() == g.strip()) for r, g in zip(rolls[::2], gold[::2])]
            rev = [(r.text.strip() == g.strip()) for r, g in zip(rolls[1::2], gold[1::2])]
            results["reviser/heldout_critique_exact"] = sum(crit) / len(crit)
            results["reviser/heldout_revision_exact"] = sum(rev) / len(rev)
        print({k: v for k, v in results.items() if k.startswith(name)})

    # 2. the loop (+ SFT on the revisions)
    base = [f"model.name_or_path={args.sft}", f"sampling.prompts={args.prompts}", f"revise.rounds={args.rounds}",
            f"data.world_examples={max(4000, args.prompts)}", f"train.lr={args.lr}", "train.micro_batch_size=8",
            "train.progress=false", "train.save_every=0", "train.overwrite_output_dir=true"]
    t0 = time.time()
    loop = out / args.tag
    cai = run_cai(load_config(CAIConfig, None, base + [
        f"revise.model={out / 'reviser' / 'final'}", f"judge.model={out / judge_dir / 'final'}",
        f"train.output_dir={loop}", f"judge.pairs={args.pairs}"] + (["judge.reasoning=true", "judge.max_new_tokens=96"] if args.reasoning_judge
                                       else [])))
    results["loop"] = {**cai.summary, "seconds": time.time() - t0}
    print(f"loop done in {time.time() - t0:.0f}s")

    # 3. DPO on the AI-labelled pairs; controls of the SFT stage
    t0 = time.time()
    n_pairs = len((loop / "pairs.jsonl").read_text().splitlines())
    dpo = None if not n_pairs else run_preference(load_config(DPOConfig, None, [
        f"model.name_or_path={args.sft}", f"data.train={loop / 'pairs.jsonl'}", "data.eval=null",
        "loss.name=dpo", "loss.beta=0.1", "train.lr=5e-5", "train.micro_batch_size=8",
        f"train.output_dir={loop / 'dpo'}", "train.overwrite_output_dir=true", "train.save_every=0",
        "train.progress=false"]), log=lambda s: None)
    results["dpo_on_pairs"] = {"pairs": n_pairs, "accuracy": accuracy(loop / "dpo" / "final") if dpo else None,
                               "steps": dpo.fit.steps if dpo else 0, "seconds": time.time() - t0}
    samples = [json.loads(ln) for ln in (loop / "samples.jsonl").read_text().splitlines()]
    problems = {p.question: p for p in generate_problems(max(4000, args.prompts), seed=0, split="train")}
    controls = {
        "sft_on_responses": [r["response"] for r in samples],
        "sft_on_gold": [problems[r["prompt"]].solution for r in samples],
    }
    for name, texts in controls.items():
        recs = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": t}]} for r, t in zip(samples, texts)
                if r["final"] is not None]   # the same prompts as the revisions
        path = loop / f"{name}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in recs))
        t0 = time.time()
        run_sft(load_config(SFTConfig, None, [
            f"model.name_or_path={args.sft}", f"data.train={path}", "data.eval=null", "data.max_length=352",
            f"train.lr={args.lr}", "train.micro_batch_size=8", "train.warmup_ratio=0.0", "train.min_lr_ratio=1.0",
            f"train.output_dir={loop / name}", "train.overwrite_output_dir=true", "train.save_every=0",
            "train.progress=false"]), log=lambda s: None)
        results[name] = {"accuracy": accuracy(loop / name / "final"), "records": len(recs), "seconds": time.time() - t0}
    results["sft_model_accuracy"] = accuracy(args.sft)
    (loop / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    s = results["loop"]
    print("\n| model | held-out accuracy |\n|---|---|")
    print(f"| SFT model (start) | {100 * results['sft_model_accuracy']:.1f}% |")
    print(f"| + SFT on the loop's revisions (posttrain cai) | {100 * s['after/eval_reward/world_correct']:.1f}% |")
    dpo_acc = results["dpo_on_pairs"]["accuracy"]
    print(f"| + DPO on the loop's {n_pairs} AI-labelled pairs | "
          + (f"{100 * dpo_acc:.1f}% |" if dpo_acc is not None else "not run (no pairs) |"))
    print(f"| control: + SFT on the unrevised responses | {100 * results['sft_on_responses']['accuracy']:.1f}% |")
    print(f"| control: + SFT on the gold solutions | {100 * results['sft_on_gold']['accuracy']:.1f}% |")


if __name__ == "__main__":
    main()
