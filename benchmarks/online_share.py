"""Online DPO and on-policy distillation under 1 and 2 processes: the work each process does per step.

    .venv/bin/python benchmarks/online_share.py                      # this checkout only
    mkdir -p /tmp/share-before && git archive f3ee1ba src | tar -x -C /tmp/share-before  # older sources ...
    .venv/bin/python benchmarks/online_share.py --before-src /tmp/share-before/src   # ... side by side

Runs ``posttrain online-dpo`` and ``posttrain distill loss.mode=on_policy`` on the tiny world
(``builtin:tiny-world-base``, 4.3M parameters, as policy and, for distillation, as teacher) for a
few optimizer steps in one process and under ``torchrun --nproc_per_node 2`` (gloo, CPU,
one torch thread per process: ``OMP_NUM_THREADS=1``), with this checkout's ``posttrain`` and, with
``--before-src``, another source tree's (put first on ``PYTHONPATH``, same interpreter and
packages), side by side in one run of the script.

- online-dpo: ``--prompts`` prompts x 4 samples (32 new tokens) per iteration, their best-vs-worst
  pairs, 2 optimizer steps per iteration (``online.steps_per_rollout=2``), micro-batches of 2 pairs:
  4 micro-batches per step. The reward is the share of digit characters in a completion (the
  base model's samples differ in it; the world's grader would tie them all at 0).
- distill: reverse KL on the student's own samples at every step (``loss.on_policy_fraction=1``,
  temperature 1, 32 new tokens), packed rows of 256 tokens, micro-batches of 2 rows, 4 micro-batches
  per step (1 process: ``train.grad_accum=4``; 2 processes: 2 each).

Each process counts, per optimizer step, the micro-batches its plan hands the engine (its forward /
backward passes), how many of them are zero-weight copies, the input tokens of the real ones, and
the seconds spent in ``plan.batches`` (distill: sampling + collation; online-dpo: sampling, scoring,
pairing and reference log-probs on the first step of an iteration, collation on every step).
Step time is the mean of rank 0's ``step_seconds`` over steps 2..n (step 1 warms up). The machine
is shared and noisy: compare rows of the same run, as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# each process runs posttrain under this wrapper, which records what its plan hands the engine
WRAP = r"""
import json, os, runpy, sys, time
from posttrain.algorithms import distill, online_dpo

records = []

def spy(cls):
    real = cls.batches

    def batches(self, step):
        t0 = time.perf_counter()
        out = real(self, step)
        records.append({"step": step, "micro_batches": len(out),
                        "zero_weight": sum(bool(b.get("zero_weight")) for b in out),
                        "input_tokens": sum(int(b["num_input_tokens"]) for b in out if not b.get("zero_weight")),
                        "plan_seconds": time.perf_counter() - t0})
        return out

    cls.batches = batches

spy(online_dpo.PairPlan)
spy(distill.OnPolicyPlan)
import posttrain
records.append({"posttrain": posttrain.__file__})
sys.argv = ["posttrain", *sys.argv[1:]]
try:
    runpy.run_module("posttrain", run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
with open(os.environ["BENCH_OUT"] + "." + os.environ.get("RANK", "0"), "w") as f:
    json.dump(records, f)
sys.exit(code)
"""


def digit_reward(prompts, completions, **_):
    """Share of digit characters in a completion (imported by the runs as ``online_share:digit_reward``)."""
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in completions]


def commands(args, procs: int) -> dict[str, list[str]]:
    common = ["model.name_or_path=builtin:tiny-world-base", "data.eval=null", "train.progress=false",
              "train.save_every=0", "train.lr=1e-4", f"train.max_steps={args.steps}"]
    return {
        "online-dpo": ["online-dpo", *common, "data.world_examples=400", f"rollout.prompts_per_step={args.prompts}",
                       "rollout.group_size=4", "rollout.max_new_tokens=32", "online.steps_per_rollout=2",
                       "train.micro_batch_size=2", "reward.functions=[online_share:digit_reward]"],
        "distill": ["distill", *common, "teacher.name_or_path=builtin:tiny-world-base", "loss.mode=on_policy",
                    "loss.divergence=reverse_kl", "loss.on_policy_fraction=1", "loss.sample_temperature=1.0",
                    "loss.max_new_tokens=32", "data.world_examples=400", "data.max_length=256",
                    "train.micro_batch_size=2", "train.epochs=0", f"train.grad_accum={4 // procs}"],
    }


def run(src: str, method: str, procs: int, args, work: Path, tag: str, port: int) -> dict:
    out = work / f"{tag}-{method}-{procs}"
    # (one process without a launcher: under torchrun --nproc_per_node 1 accelerate wraps the model in DDP,
    # which posttrain's log-prob path does not expect)
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
              "--master_port", str(port)] if procs > 1 else []
    cmd = [sys.executable, *launch, str(work / "wrap.py"), *commands(args, procs)[method], f"train.output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_OUT": str(out) + ".plan",
           "PYTHONPATH": os.pathsep.join([*([src] if src else []), str(HERE), os.environ.get("PYTHONPATH", "")])}
    t0, load = time.time(), os.getloadavg()[0]  # the machine's 1-minute load average as the run starts
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    if r.returncode != 0:
        raise SystemExit(f"{tag} {method} x{procs} failed:\n{(r.stdout + r.stderr)[-4000:]}")
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"step_seconds"' in ln]
    ranks = [json.loads(Path(f"{out}.plan.{k}").read_text()) for k in range(procs)]
    per_rank, where = [], ranks[0][0]["posttrain"]
    for recs in ranks:
        recs = [x for x in recs[1:] if x["step"] < args.steps]  # (not the end-of-run probe, if any)
        per_rank.append({k: sum(x[k] for x in recs) / len(recs)
                         for k in ("micro_batches", "zero_weight", "input_tokens", "plan_seconds")})
    return {"tag": tag, "posttrain": where, "method": method, "procs": procs, "load": load, "wall_s": time.time() - t0,
            "step_s": sum(s["step_seconds"] for s in steps[1:]) / max(1, len(steps) - 1),
            "losses": [s["loss"] for s in steps], "per_rank": per_rank}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before-src", default="", help="an older checkout's src/ directory, run side by side")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (even: online DPO iterations)")
    ap.add_argument("--prompts", type=int, default=16, help="online-dpo: prompts (= pairs wanted) per iteration")
    ap.add_argument("--methods", default="online-dpo,distill")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="online-share-"))
    (work / "wrap.py").write_text(WRAP)
    trees = [("before", args.before_src)] if args.before_src else []
    trees.append(("after", ""))
    rows, port = [], 29600
    for rep in range(args.repeats):
        order = trees if rep % 2 == 0 else trees[::-1]
        for method in args.methods.split(","):
            for tag, src in order:
                for procs in (1, 2):
                    port += 1
                    row = run(src, method, procs, args, work, f"{tag}{rep}", port)
                    row["tag"] = tag
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    print("\n| method | code | processes | micro-batches / process / step (zero-weight) | input tokens / process "
          "/ step | plan.batches s / process / step | step time | vs 1 process | last loss |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        for tag, _ in trees:
            mine = [r for r in rows if r["method"] == method and r["tag"] == tag]
            step = {p: sum(r["step_s"] for r in mine if r["procs"] == p) / args.repeats for p in (1, 2)}
            for p in (1, 2):
                rs = [r for r in mine if r["procs"] == p]
                mb = " / ".join(f"{r['per_rank'][k]['micro_batches']:.2f} ({r['per_rank'][k]['zero_weight']:.2f})"
                                for r in rs[:1] for k in range(p))
                tok = " / ".join(f"{rs[0]['per_rank'][k]['input_tokens']:.0f}" for k in range(p))
                plan = " / ".join(f"{sum(r['per_rank'][k]['plan_seconds'] for r in rs) / len(rs):.2f}"
                                  for k in range(p))
                print(f"| {method} | {tag} | {p} | {mb} | {tok} | {plan} | {step[p]:.2f} s | "
                      f"{step[p] / step[1]:.2f}x | {rs[0]['losses'][-1]:.5f} |")
    loads = [r["load"] for r in rows]
    print(f"\nload average (1 min) at the runs' starts: {min(loads):.1f} .. {max(loads):.1f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
