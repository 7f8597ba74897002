"""Peak memory and step time of a training step with and without train.gradient_checkpointing.

    python benchmarks/gradient_checkpointing.py      # 8 layers, width 512, 4 x 1024 tokens, fp32; ~17 min here

A Llama-shaped model built from a config (random weights, seeded; ``--layers``, ``--hidden``,
intermediate 2.6875 x hidden as Llama-2's, 8 heads, no grouped KV, ``--vocab``), a micro-batch of
``--micro-batch`` rows of ``--seq-len`` random tokens, and the engine's own step: posttrain's SFT loss
(the fused, chunked LM-head log-probs), backward, AdamW (posttrain's parameter groups), with
checkpointing switched on exactly as ``fit`` does. Each setting runs in a fresh subprocess: one
warm-up step (AdamW's state exists from then on), ``--steps`` timed steps, then one step tracked
tensor by tensor with torch's ``MemTracker`` (its peak, split by kind: parameters, gradients,
optimizer state, activations, temporaries). "Peak RSS extra" is the process's peak resident memory
during the timed steps (``VmHWM``, reset before them) minus its resident memory before them, with
glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors go back to the
system instead of staying in the allocator. "Predicted activations" is the memory planner's count
(docs/memory.md): per token ``layers x (9h + 3kv + 4i) + 4h`` elements without checkpointing,
``layers x h + (9h + 3kv + 4i) + 4h`` with it, times 4 bytes. The settings alternate
(``--repeats``); read the ratios within one run: these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(key)).split()[1])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(x for x in f if x.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return "unknown CPU"


def _child(args, on: bool) -> dict:
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.algorithms.sft import SFTAlgorithm
    from posttrain.train.gradient_checkpointing import gradient_checkpointing
    from posttrain.train.optim import build_optimizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=args.seq_len, tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
             "num_sequences": args.micro_batch, "num_input_tokens": ids.numel()}
    alg = SFTAlgorithm()
    totals = {k: torch.tensor(float(v)) for k, v in alg.counts(batch).items()}
    opt = build_optimizer(model, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    out = {"parameters": sum(p.numel() for p in model.parameters())}

    def step():
        loss, _ = alg.loss(model, batch, totals)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss), float(norm)

    with gradient_checkpointing(model, on):
        model.train()
        out["first_loss"], out["first_grad_norm"] = step()  # warm-up: AdamW's state is allocated here
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident set
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        out["rss_base_mib"] = base / 1024
        out["rss_peak_extra_mib"] = (_status_kib("VmHWM") - base) / 1024
        out["step_seconds"] = times
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            step()
        (per_kind,) = tracker.get_tracker_snapshot("peak").values()
        out["tracked_peak_mib"] = {str(k).rsplit(".", 1)[-1]: v / 2**20 for k, v in per_kind.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per setting and repeat")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each setting")
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args, args.child == "on")))
        return

    h, kv, i = args.hidden, args.hidden, int(args.hidden * 2.6875)
    per_layer = 9 * h + 3 * kv + 4 * i
    tokens = args.seq_len * args.micro_batch
    predicted = {"off": tokens * (args.layers * per_layer + 4 * h) * 4 / 2**20,
                 "on": tokens * (args.layers * h + per_layer + 4 * h) * 4 / 2**20}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    argv = [f"--layers={args.layers}", f"--hidden={args.hidden}", f"--vocab={args.vocab}",
            f"--seq-len={args.seq_len}", f"--micro-batch={args.micro_batch}", f"--steps={args.steps}"]
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for r in range(args.repeats):
        for setting in ("off", "on"):
            p = subprocess.run([sys.executable, __file__, "--child", setting, *argv], capture_output=True, text=True,
                               env=env)
            if p.returncode != 0:
                sys.exit(p.stderr[-3000:])
            res = json.loads(p.stdout.strip().splitlines()[-1])
            runs[setting].append(res)
            print(f"repeat {r + 1} {setting}: steps {', '.join(f'{t:.2f}' for t in res['step_seconds'])} s, "
                  f"peak RSS extra {res['rss_peak_extra_mib']:.0f} MiB, tracked {res['tracked_peak_mib']['Total']:.0f} "
                  f"MiB", flush=True)
    first = runs["off"][0]
    print(f"\nmodel: {first['parameters'] / 1e6:.1f}M parameters ({args.layers} layers, hidden {args.hidden}, "
          f"vocab {args.vocab}), micro-batch {args.micro_batch} x {args.seq_len} tokens, fp32, "
          f"{os.cpu_count()} CPUs ({_cpu_model()})\n")
    print("| train.gradient_checkpointing | tracked peak MiB | activations | temporaries | gradients | weights + AdamW "
          "| predicted activations | peak RSS extra MiB | step s (median) | vs off | first loss | first grad norm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    med = {s: statistics.median(t for res in runs[s] for t in res["step_seconds"]) for s in runs}
    for s, label in (("off", "false"), ("on", "true")):
        res = runs[s][0]
        k = res["tracked_peak_mib"]
        rss = statistics.median(x["rss_peak_extra_mib"] for x in runs[s])
        print(f"| {label} | {k['Total']:.0f} | {k['ACT']:.0f} | {k['TEMP']:.0f} | {k['GRAD']:.0f} | "
              f"{k['PARAM'] + k['OPT']:.0f} | {predicted[s]:.0f} | {rss:.0f} | {med[s]:.2f} | "
              f"{med[s] / med['off']:.2f}x | {res['first_loss']:.6f} | {res['first_grad_norm']:.6f} |")
    same = all(runs["on"][0][k] == runs["off"][0][k] for k in ("first_loss", "first_grad_norm"))
    print(f"\nfirst step's loss and gradient norm identical with and without: {same}")


if __name__ == "__main__":
    main()
