"""Best-of-N on the tiny world: PRM (min / product / last step) vs ORM vs majority vote vs oracle
(docs/best_of_n.md).

    python benchmarks/best_of_n.py --policy runs/quickstart/sft/final --prm runs/prm/final \\
        --orm runs/quickstart/rm/final                                   # ~3 min here

For each of the 200 held-out problems the policy samples 16 solutions (temperature 1, seeded);
for N = 1, 4, 16 the first N are ranked by each selector and the pick is graded by the world's
verifier. Majority vote picks the most frequent final answer (ties: the earliest sample);
the oracle is pass@N (any of the N is right); "policy_min_logprob" picks the sample whose least
likely token (under the sampling policy itself) is most likely, a verifier-free baseline. Also reports, on 200 held-out one-slip solutions
whose first wrong step is known by construction, how often the PRM's lowest-scored step is it
(vs chance, one over the number of steps). Writes ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True)
    ap.add_argument("--prm", required=True)
    ap.add_argument("--orm", required=True)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--out", default="runs/best-of-n")
    args = ap.parse_args(argv)

    import torch

    from posttrain.algorithms.prm import step_metrics
    from posttrain.rewards.process import StepScorer, encode_steps, score_examples
    from posttrain.data.chat import render_prompt
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.rewards.reward_model import RewardModelScorer
    from posttrain.rollout.sampler import sample_groups
    from posttrain.world.grader import extract_answer, is_correct
    from posttrain.world.preferences import step_records
    from posttrain.world.tasks import generate_problems

    tok = load_tokenizer(args.policy)
    policy = load_causal_lm(args.policy, device="cpu")
    problems = generate_problems(args.problems, seed=0, split="heldout")
    prompts = [render_prompt(tok, p.question) for p in problems]
    rolls = sample_groups(policy, tok, prompts, group_size=args.n, max_new_tokens=96, temperature=1.0, seed=1234)
    texts = [r.text for r in rolls]
    qs = [p.question for p in problems for _ in range(args.n)]
    correct = [is_correct(t, p.answer) for p, t in zip((p for p in problems for _ in range(args.n)), texts)]
    prm = StepScorer(args.prm, device="cpu")
    scores = {m: prm.solution_scores(qs, texts, m) for m in ("min", "product", "last")}
    orm = RewardModelScorer(args.orm, device="cpu", log=lambda s: None)
    scores["orm"] = [float("nan") if x is None else float(x) for x in orm(qs, texts)]
    # the policy's own confidence in its sample (no trained verifier): the lowest token log-prob
    scores["policy_min_logprob"] = [min(r.log_probs) if r.log_probs else float("nan") for r in rolls]
    answers = [extract_answer(t) for t in texts]

    def pick(method: str, i: int, n: int) -> int:
        idx = list(range(i * args.n, i * args.n + n))
        if method == "majority":
            votes = Counter(answers[j] for j in idx if answers[j] is not None)
            if not votes:
                return idx[0]
            best = max(votes.values())
            return next(j for j in idx if answers[j] is not None and votes[answers[j]] == best)
        s = scores[method]
        return max(idx, key=lambda j: (s[j] if s[j] == s[j] else float("-inf"), -j))

    rows = []
    for n in (1, 4, 16):
        if n > args.n:
            continue
        row = {"n": n}
        for method in ("min", "product", "last", "orm", "policy_min_logprob", "majority"):
            row[method] = sum(correct[pick(method, i, n)] for i in range(len(problems))) / len(problems)
        row["oracle"] = sum(any(correct[i * args.n:i * args.n + n]) for i in range(len(problems))) / len(problems)
        rows.append(row)
        print(json.dumps(row), flush=True)
    # error localization on held-out one-slip solutions
    recs = [r for r in step_records(4 * args.problems, seed=0, split="heldout") if r["first_error"] is not None]
    recs = recs[: args.problems]
    ex = [encode_steps(tok, r["prompt"], r["completions"], delimiter="\n") for r in recs]
    for e, r in zip(ex, recs):
        e.labels = [float(x) for x in r["labels"]]
    with torch.no_grad():
        step_scores = score_examples(prm.model, ex, pad_token_id=tok.pad_token_id)
    loc = step_metrics(step_scores, ex, [r["first_error"] for r in recs])
    by_len: dict = {}
    for s, r in zip(step_scores, recs):
        n = len(s)
        hit = int(min(range(n), key=lambda i: s[i]) == r["first_error"])
        a, b = by_len.get(n, (0, 0))
        by_len[n] = (a + hit, b + 1)
    loc["by_steps"] = {n: {"hit_rate": a / b, "chance": 1 / n, "solutions": b} for n, (a, b) in sorted(by_len.items())}
    print(json.dumps(loc), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "localization": loc,
                                                   "sample_accuracy": sum(correct) / len(correct)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
