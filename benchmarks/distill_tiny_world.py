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
- ``rl_teacher``: on-policy distillation as RL (``posttrain rl reward.functions=[teacher_logprob]``):
  the same start as ``on_policy`` and the same budget (``--steps`` optimizer steps, the same lr
  schedule and AdamW settings, ``--rl-prompts`` prompts x ``--rl-group`` samples per step at
  temperature 1, at most 64 tokens; the on-policy variant's packed step holds about 16 examples,
  so 16 x 1 matches its samples), the policy gradient on the per-token reward
  ``log p_T - log p_S`` (``--rl-algorithm``, default reinforce_pp: per-token return-to-go; no KL
  to a reference).

``none`` trains nothing: it evaluates ``--student`` as it is (the starting point). With
``--kl-samples K`` each model is also measured against the teacher: K samples per held-out prompt
at temperature 1 (at most 64 tokens, seeded), and the mean of ``sum_t (log p_S - log p_T)`` over
them, the sampled sequence-level reverse KL(student || teacher) in nats per answer, which both
on-policy methods minimize (with its standard error over prompts).

Reports held-out accuracy (200 problems, greedy), wall time and CPU time (all threads of the process: a
steadier measure than wall time when other jobs share the machine); writes ``<out>/results.json``.
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
    ap.add_argument("--seed", type=int, default=0, help="train.seed of every variant")
    ap.add_argument("--out", default="runs/distill-tiny-world")
    ap.add_argument("--variants", default="sft,forward_kl,reverse_kl,jsd,seqkd")
    ap.add_argument("--rl-algorithm", default="reinforce_pp", help="rl_teacher: the online loop's preset")
    ap.add_argument("--rl-prompts", type=int, default=16, help="rl_teacher: prompts per optimizer step")
    ap.add_argument("--rl-group", type=int, default=1, help="rl_teacher: samples per prompt")
    ap.add_argument("--rl-set", action="append", default=[], metavar="KEY=VALUE",
                    help="rl_teacher: an extra posttrain rl override (repeatable), e.g. loss.gamma=0")
    ap.add_argument("--kl-samples", type=int, default=0, help="samples per held-out prompt for the reverse KL "
                    "to the teacher (0: not measured)")
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
              "train.save_every=0", f"train.seed={args.seed}"]
    tok = load_tokenizer(args.teacher)
    problems = generate_problems(200, seed=0, split="heldout")
    rows = []
    for variant in args.variants.split(","):
        t0, c0 = time.time(), time.process_time()
        run_dir = out / variant
        sft_student = out / "sft" / "final"
        if variant == "none":
            res = None
        elif variant == "sft":
            res = run_sft(load_config(SFTConfig, None, common + [f"train.output_dir={run_dir}"]), log=lambda s: None)
        elif variant == "rl_teacher":
            from posttrain.algorithms.rl import RLConfig, run_rl

            start = str(sft_student) if sft_student.is_dir() else args.student
            cfg = load_config(RLConfig, None, [
                f"model.name_or_path={start}", f"algorithm={args.rl_algorithm}", f"train.max_steps={args.steps}",
                f"train.lr={args.lr}", "train.warmup_ratio=0.05", "train.min_lr_ratio=0.1", "train.weight_decay=0.1",
                f"train.micro_batch_size={args.rl_prompts}", "train.progress=false", "train.overwrite_output_dir=true",
                "train.save_every=0", f"train.output_dir={run_dir}", "data.eval=null", f"train.seed={args.seed}",
                f"rollout.prompts_per_step={args.rl_prompts}", f"rollout.group_size={args.rl_group}",
                "rollout.temperature=1.0", "rollout.max_new_tokens=64", "reward.functions=[teacher_logprob]",
                f"teacher.name_or_path={args.teacher}", "loss.kl_beta=0", *args.rl_set])
            res = run_rl(cfg, log=lambda s: None)
        else:
            if variant == "seqkd":
                mode = ["loss.mode=seqkd", "loss.filter=[world_correct]", "loss.max_new_tokens=96"]
            elif variant == "on_policy":
                # from the SFT variant's student when this run made one (listed before on_policy)
                mode = ["loss.mode=on_policy", "loss.divergence=reverse_kl", "loss.on_policy_fraction=1",
                        "loss.sample_temperature=1.0", "loss.max_new_tokens=64"] + (
                    [f"model.name_or_path={sft_student}"] if sft_student.is_dir() else [])
            else:
                mode = [f"loss.divergence={variant}"]
            cfg = load_config(DistillConfig, None, common + [f"train.output_dir={run_dir}",
                                                             f"teacher.name_or_path={args.teacher}", *mode])
            res = run_distill(cfg, log=lambda s: None)
        seconds, cpu = time.time() - t0, time.process_time() - c0  # CPU time: every thread of this process
        model = load_causal_lm(str(res.final_dir) if res is not None else args.student, device="cpu")
        acc = evaluate_problems(model, tok, problems).accuracy
        row = {"variant": variant, "accuracy": acc, "seconds": seconds, "cpu_seconds": cpu, "lr": args.lr}
        kl = ""
        if args.kl_samples:
            row["reverse_kl"], row["reverse_kl_se"] = reverse_kl(model, args.teacher, tok, problems, args.kl_samples)
            kl = f" | KL {row['reverse_kl']:.2f} +- {row['reverse_kl_se']:.2f} nats"
        rows.append(row)
        print(f"| {variant} | {100 * acc:.1f}% | {seconds:.0f} s | {cpu:.0f} s CPU{kl} |", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    old = json.loads(results.read_text())["rows"] if results.is_file() else []
    keep = [r for r in old if r["variant"] not in {x["variant"] for x in rows}]
    results.write_text(json.dumps({"steps": args.steps, "lr": args.lr, "rows": keep + rows}, indent=2) + "\n")


def reverse_kl(student, teacher_path: str, tok, problems, samples: int) -> tuple[float, float]:
    """Mean over held-out prompts of the sampled sum_t (log p_S - log p_T) (``samples`` per prompt,
    temperature 1, at most 64 tokens), and its standard error over prompts."""
    import math

    from posttrain.data.chat import render_prompt
    from posttrain.models.loading import load_causal_lm
    from posttrain.rewards.teacher import TeacherLogprobReward
    from posttrain.rollout.sampler import sample_groups

    teacher = load_causal_lm(teacher_path, device="cpu")
    prompts = [render_prompt(tok, [{"role": "user", "content": p.question}]) for p in problems]
    rolls = sample_groups(student, tok, prompts, group_size=samples, max_new_tokens=64, temperature=1.0, seed=12345)
    scorer = TeacherLogprobReward("", policy=student, teacher=teacher, batch_size=64, temperature=1.0)
    u = scorer.token_rewards(None, None, prompt_ids=[r.prompt_ids for r in rolls],
                             completion_ids=[r.completion_ids for r in rolls])
    per_prompt = [-sum(math.fsum(x) for x in u[i * samples:(i + 1) * samples]) / samples for i in range(len(prompts))]
    mean = sum(per_prompt) / len(per_prompt)
    var = sum((x - mean) ** 2 for x in per_prompt) / max(1, len(per_prompt) - 1)
    return mean, math.sqrt(var / len(per_prompt))


if __name__ == "__main__":
    main()
