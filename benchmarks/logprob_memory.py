"""Peak memory and time of per-token log-probs (+ entropy): naive vs chunked vs fused LM head.

Every variant starts from the same inputs, hidden states ``(B, T, H)`` and an LM-head weight
``(V, H)`` (both requiring grad), and runs forward + backward of ``sum(log_probs)`` (plus
``sum(entropy)`` for the "+ entropy" rows):

- naive:   logits = h Wᵀ -> log_softmax over (B, T, V) -> gather (entropy from the same log-softmax)
- chunked: logits = h Wᵀ -> posttrain.ops.token_log_probs (+ compute_entropy)
- fused:   posttrain.ops.linear_log_probs(h, W, labels) (never builds the logits)

Method: each variant runs in a fresh subprocess. After the inputs exist, the kernel's peak-RSS
mark is reset (``echo 5 > /proc/self/clear_refs``) and the current RSS is taken as baseline;
after the measured forward+backward, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` minus the
baseline is the peak extra memory of that call (it includes ``W.grad``, the same for all
variants). A tiny warm-up call runs before the reset so that one-time initialisation is not
counted. The first full-size call is the memory measurement; the reported time is the best
of the ``--repeats`` calls that follow it (CPU timings on a shared VM vary by ~±30%).

    .venv/bin/python benchmarks/logprob_memory.py [--tokens 2048] [--hidden 512] [--vocab 32768 131072]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

# (variant, chunk_size): -1 = the default (rows from the ops' byte budget), then fixed row counts
# (4096 / 1024 were the fixed defaults before the byte budget)
VARIANTS = [("naive", None), ("chunked", -1), ("chunked", 4096), ("chunked", 256), ("fused", -1), ("fused", 1024),
            ("fused", 256)]


def _current_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _run_child(
    variant: str, chunk: int, entropy: bool, tokens: int, hidden_size: int, vocab: int, repeats: int
) -> dict:
    import torch
    import torch.nn.functional as F

    from posttrain.ops import compute_entropy, linear_log_probs, token_log_probs

    chunk = None if chunk < 0 else chunk  # None: the default byte budget
    def naive(h, w, y):
        log_p = F.log_softmax(h @ w.t(), dim=-1)
        loss = log_p.gather(-1, y[..., None]).sum()
        if entropy:
            loss = loss - (log_p.exp() * log_p).sum()
        loss.backward()

    def chunked(h, w, y):
        logits = h @ w.t()
        loss = token_log_probs(logits, y, chunk_size=chunk).sum()
        if entropy:
            loss = loss + compute_entropy(logits, chunk_size=chunk).sum()
        loss.backward()

    def fused(h, w, y):
        lp, ent = linear_log_probs(h, w, y, chunk_size=chunk, return_entropy=entropy)
        loss = (lp.sum() + ent.sum()) if entropy else lp.sum()
        loss.backward()

    fn = {"naive": naive, "chunked": chunked, "fused": fused}[variant]
    g = torch.Generator().manual_seed(0)
    batch = 4
    h = torch.randn(batch, tokens // batch, hidden_size, generator=g).requires_grad_(True)
    w = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).requires_grad_(True)
    y = torch.randint(0, vocab, (batch, tokens // batch), generator=g)

    # warm up lazy one-time initialisation (thread pools, kernels) on tiny inputs, outside the mark
    tiny_h = torch.randn(2, 8, hidden_size, requires_grad=True)
    tiny_w = torch.randn(64, hidden_size, requires_grad=True)
    fn(tiny_h, tiny_w, torch.randint(0, 64, (2, 8)))
    del tiny_h, tiny_w

    exact = _reset_peak_rss()
    baseline = _current_rss_kib() if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fn(h, w, y)
    first = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        h.grad = w.grad = None
        start = time.perf_counter()
        fn(h, w, y)
        times.append(time.perf_counter() - start)
    return {
        "peak_mib": (peak - baseline) / 1024,
        "time_s": min(times) if times else first,
        "exact_reset": exact,
    }


def _rows_label(chunk, vocab: int) -> str:
    if chunk is None:
        return "-"
    if chunk < 0:
        from posttrain.ops.logprobs import default_chunk_rows

        return f"default ({default_chunk_rows(vocab)})"
    return str(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="B*T (B = 4)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        variant, chunk, entropy, vocab = args.child.split(",")
        result = _run_child(
            variant, int(chunk), entropy == "1", args.tokens, args.hidden, int(vocab), args.repeats
        )
        print(json.dumps(result))
        return

    import torch

    print(
        f"tokens={args.tokens} hidden={args.hidden} fp32, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads\n"
    )
    print("| V | output | variant | chunk rows | peak extra MiB | vs naive | fwd+bwd s |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for vocab in args.vocab:
        for entropy in (False, True):
            naive_peak = None
            for variant, chunk in VARIANTS:
                cmd = [
                    sys.executable, __file__, "--child", f"{variant},{chunk or 0},{int(entropy)},{vocab}",
                    "--tokens", str(args.tokens), "--hidden", str(args.hidden),
                    "--repeats", str(args.repeats),
                ]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                naive_peak = res["peak_mib"] if variant == "naive" else naive_peak
                note = "" if res["exact_reset"] else " (approx.)"
                print(
                    f"| {vocab} | {'log-prob + entropy' if entropy else 'log-prob'} | {variant} "
                    f"| {_rows_label(chunk, vocab)} | {res['peak_mib']:.0f}{note} | {res['peak_mib'] / naive_peak:.2f} "
                    f"| {res['time_s']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
