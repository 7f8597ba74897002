"""Monte-Carlo step labels on the tiny world: their variance as K grows, and their agreement with
the world's gold step labels (docs/best_of_n.md).

    python benchmarks/prm_mc_labels.py --policy runs/quickstart/sft/final     # ~2 min here

For ``--records`` stepwise world records (half worked solutions, half one-slip solutions) the
policy completes every step prefix ``--k`` times (temperature 1). For K = 1, 2, 4, ... the K_max
rollouts of a prefix are cut into K_max / K disjoint groups, each giving one soft estimate; the
table reports the mean (over prefixes) of those estimates' variance next to the binomial
prediction p(1-p)/K (p: the K_max estimate), and how often the hard (any success) and soft
(> 0.5) labels agree with the gold labels. Writes ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True)
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--out", default="runs/prm-mc-labels")
    args = ap.parse_args(argv)

    from posttrain.algorithms.prm import PRMLabelConfig, monte_carlo_labels
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.rewards import compute_rewards, resolve_reward_functions
    from posttrain.rollout.sampler import sample_groups
    from posttrain.world.preferences import step_records

    tok = load_tokenizer(args.policy)
    policy = load_causal_lm(args.policy, device="cpu")
    recs = step_records(args.records, seed=7, split="train")
    steps = [r["completions"] for r in recs]
    labels = PRMLabelConfig(source="mc", policy=args.policy, k=args.k)
    # per-rollout outcomes are needed for the sub-sampling, so sample here with the same recipe
    from posttrain.data.chat import render_prompt

    fns = resolve_reward_functions(["world_correct"], None, tokenizer=tok, device="cpu")
    jobs, prefixes, texts = [], [], []
    for r, st in zip(recs, steps):
        pids = render_prompt(tok, r["prompt"])
        for i in range(len(st) - 1):
            t = "\n".join(st[: i + 1]) + "\n"
            jobs.append((r, i))
            texts.append(t)
            prefixes.append(pids + list(tok(t, add_special_tokens=False)["input_ids"]))
    rolls = sample_groups(policy, tok, prefixes, group_size=args.k, max_new_tokens=64, temperature=1.0, seed=5)
    comps = [texts[j // args.k] + ro.text for j, ro in enumerate(rolls)]
    res = compute_rewards(fns, ["q"] * len(comps), comps, completion_ids=[[]] * len(comps),
                          finished=[True] * len(comps), max_new_tokens=64,
                          answer=[jobs[j // args.k][0]["answer"] for j in range(len(comps))])
    ok = [bool(v) and float(t) >= 1.0 for v, t in zip(res.valid, res.total)]
    outcomes = [ok[j * args.k:(j + 1) * args.k] for j in range(len(jobs))]
    rows = []
    K = 1
    while K <= args.k:
        var_sum = pred_sum = 0.0
        hard_agree = soft_agree = 0
        for (r, i), outs in zip(jobs, outcomes):
            p = sum(outs) / args.k
            ests = [sum(outs[g:g + K]) / K for g in range(0, args.k - K + 1, K)]
            m = sum(ests) / len(ests)
            var_sum += sum((e - m) ** 2 for e in ests) / max(1, len(ests) - 1) if len(ests) > 1 else 0.0
            pred_sum += p * (1 - p) / K
            first = outs[:K]
            gold = bool(r["labels"][i])
            hard_agree += int(any(first) == gold)
            soft_agree += int((sum(first) / K > 0.5) == gold)
        n = len(jobs)
        row = {"k": K, "estimate_variance": var_sum / n if K < args.k else None, "binomial_p_q_over_k": pred_sum / n,
               "hard_agreement_with_gold": hard_agree / n, "soft_agreement_with_gold": soft_agree / n}
        rows.append(row)
        print(json.dumps(row), flush=True)
        K *= 2
    # the library's own labelling path on the same records (K = args.k), as `posttrain prm labels.source=mc` runs it
    counts = monte_carlo_labels(recs, steps, policy=policy, tokenizer=tok, labels=labels, delimiter="\n", seed=5,
                                log=print)
    mean = sum(c / args.k for cs in counts for c in cs) / sum(len(cs) for cs in counts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"prefixes": len(jobs), "rows": rows, "library_mean_label": mean},
                                                 indent=2) + "\n")


if __name__ == "__main__":
    main()
