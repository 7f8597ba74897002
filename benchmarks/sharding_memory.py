"""Per-process memory and step time of data parallel vs FSDP2 vs DeepSpeed ZeRO-2 / ZeRO-3.

    python benchmarks/sharding_memory.py                # 2 CPU processes, ~5 min here

Builds a Llama-shaped model from a config (random weights, the tiny world's tokenizer; ``--hidden``,
``--layers``), writes tiny-world SFT data, then runs ``posttrain sft`` under
``torchrun --nproc_per_node 2`` once per ``train.sharding`` (none, fsdp2, zero2, zero3) for the same
steps. Each process reports its own peak resident memory (``ru_maxrss``): rank 0's includes gathering
and writing the final checkpoint (the whole weights and AdamW state, on CPU), the other ranks' is
training only. Also reports the mean step time (steps 2..n,
from metrics.jsonl) and the whole command's wall time, and the model-state bytes per process the
memory planner's per-parameter counts predict (fp32 weights 4, gradients 4, AdamW 8 bytes; zero2
divides gradients and AdamW state by the processes, zero3 / fsdp2 everything).
Compare the columns within one run: these machines are noisy.
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

# each process runs under a wrapper that reports its own peak RSS (ru_maxrss) with its rank
WRAP = r"""
import json, os, resource, runpy, sys
sys.argv = ["posttrain", *sys.argv[1:]]
try:
    runpy.run_module("posttrain", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
with open(os.environ["BENCH_RSS"] + f".{os.environ['RANK']}", "w") as f:
    json.dump({"rank": int(os.environ["RANK"]), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
sys.exit(code)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--shardings", default="none,fsdp2,zero2,zero3")
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.models.loading import load_tokenizer
    from posttrain.world.datasets import sft_record
    from posttrain.world.tasks import generate_problems

    work = Path(tempfile.mkdtemp(prefix="sharding-bench-"))
    tok = load_tokenizer("builtin:tiny-world-base")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    del model
    (work / "sft.jsonl").write_text("".join(json.dumps(sft_record(p)) + "\n" for p in generate_problems(400, seed=0)))
    print(f"model: {n_params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers); "
          f"{args.processes} processes, {args.steps} steps of 2 micro-batches of 4 per process")

    n = args.processes
    wrapper = work / "wrap.py"
    wrapper.write_text(WRAP)
    state_bytes = {"none": 16, "fsdp2": 16 / n, "zero2": 4 + 12 / n, "zero3": 16 / n}
    rows = []
    for sharding in args.shardings.split(","):
        out = work / f"run-{sharding}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
               "127.0.0.1", "--master_port", str(29500 + len(rows)), str(wrapper), "sft",
               f"model.name_or_path={work / 'model'}", f"data.train={work / 'sft.jsonl'}", "data.eval=null",
               "data.max_length=256", "train.micro_batch_size=4", "train.grad_accum=2",
               f"train.max_steps={args.steps}", "train.progress=false", "train.save_every=0",
               f"train.sharding={sharding}", f"train.output_dir={out}", f"data.cache_dir={work / 'cache'}"]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_RSS": str(out) + ".rss"})
        if r.returncode != 0:
            raise SystemExit(f"{sharding} failed:\n{(r.stdout + r.stderr)[-3000:]}")
        peaks = [json.loads(Path(f"{out}.rss.{k}").read_text())["peak_rss_mib"] for k in range(n)]
        steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"step_seconds"' in ln]
        step_s = sum(s["step_seconds"] for s in steps[1:]) / max(1, len(steps) - 1)
        rows.append({"sharding": sharding, "peaks": peaks, "step_s": step_s,
                     "wall_s": time.time() - t0, "state_mib": state_bytes[sharding] * n_params / 2**20,
                     "final_loss": steps[-1]["loss"]})
    base = rows[0]
    others = "ranks 1.." if n > 2 else "rank 1"
    print(f"\n| train.sharding | model state / process (predicted) | peak RSS rank 0 (writes the gathered "
          f"checkpoint) | peak RSS {others} | {others} vs {base['sharding']} | step time | vs {base['sharding']} "
          "| command wall time | last loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rest, rest0 = max(r["peaks"][1:]), max(base["peaks"][1:])
        print(f"| {r['sharding']} | {r['state_mib']:.0f} MiB | {r['peaks'][0]:.0f} MiB | {rest:.0f} MiB | "
              f"{rest - rest0:+.0f} MiB | {r['step_s']:.2f} s | {r['step_s'] / base['step_s']:.2f}x | "
              f"{r['wall_s']:.0f} s | {r['final_loss']:.4f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
