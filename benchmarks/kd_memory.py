"""Peak memory and time of the distillation divergence: naive vs posttrain.ops.token_divergence.

    python benchmarks/kd_memory.py          # --tokens 2048 --vocab 32768 131072; ~1 min

Both start from student logits (with gradient) and teacher logits, ``(N, V)`` fp32, and run one
forward + backward of the summed per-token divergence. naive: ``log_softmax`` of both, full
``(N, V)`` probability and log-ratio tensors kept for backward. chunked: ``token_divergence``
with its default chunk (the 32 MiB byte budget) under activation checkpointing. Each variant runs
in a fresh subprocess; "peak extra MiB" is the peak RSS after the call minus the RSS once the
inputs exist (the kernel's peak mark is reset there), so it includes the logits' gradient
(``N·V·4`` bytes, the same for both).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _child(variant: str, divergence: str, tokens: int, vocab: int) -> dict:
    import torch

    from posttrain.ops import token_divergence

    g = torch.Generator().manual_seed(0)
    s = (torch.randn(tokens, vocab, generator=g) * 2).requires_grad_(True)
    t = torch.randn(tokens, vocab, generator=g) * 2

    def naive():
        ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        if divergence == "forward_kl":
            return (lt.exp() * (lt - ls)).sum()
        return (ls.exp() * (ls - lt)).sum()

    def chunked():
        return token_divergence(s, t, divergence=divergence).sum()

    fn = naive if variant == "naive" else chunked
    small = torch.randn(4, 64, requires_grad=True)
    token_divergence(small, small.detach()).sum().backward()  # warm up lazy initialisation
    with open("/proc/self/status") as f:
        base = int(next(x for x in f if x.startswith("VmRSS")).split()[1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    fn().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak - base) / 1024, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        variant, divergence, vocab = args.child.split(",")
        print(json.dumps(_child(variant, divergence, args.tokens, int(vocab))))
        return
    print("| V | divergence | variant | peak extra MiB | vs naive | fwd+bwd s |\n|---:|---|---|---:|---:|---:|")
    for vocab in args.vocab:
        for divergence in ("forward_kl", "reverse_kl"):
            naive_peak = None
            for variant in ("naive", "chunked"):
                out = subprocess.run([sys.executable, __file__, "--child", f"{variant},{divergence},{vocab}",
                                      "--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                naive_peak = naive_peak or r["peak_mib"]
                print(f"| {vocab} | {divergence} | {variant} | {r['peak_mib']:.0f} | {r['peak_mib'] / naive_peak:.2f} | "
                      f"{r['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
