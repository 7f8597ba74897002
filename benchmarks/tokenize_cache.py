"""Tokenization throughput and peak memory: first run vs cached run, 1 vs N worker processes.

    python benchmarks/tokenize_cache.py --records 1000000     # ~15 min here

Writes a JSONL file of ``--records`` tiny-world SFT conversations (cycling through 20k generated
problems), then, each in a fresh process (so peak memory is that run's own): encode it with the
world tokenizer through ``posttrain.algorithms.sft.encode_sft_source`` (load + validate +
chat-template + tokenize + masks) with an empty cache, with ``--workers`` processes and an empty
cache, and again with the filled cache (``--in-memory``: also with the cache off, the in-memory
path that holds every record and example as Python objects). A first run with the cache on
streams: records are read, tokenized and appended to the entry on disk chunk by chunk. Reports wall time, records/s and the peak resident
memory of each process (``ru_maxrss``; the worker processes' peak separately).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from posttrain.algorithms.sft import SFTConfig, encode_sft_source
from posttrain.config import load_config
from posttrain.models.loading import load_tokenizer
path, cache, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = load_tokenizer("builtin:tiny-world-base")
cfg = load_config(SFTConfig, None, [f"data.cache_dir={cache}", f"data.num_proc={workers}"]
                  + (["data.cache=false"] if cache == "off" else []))
kw = dict(max_length=cfg.data.max_length, overlong=cfg.data.overlong, loss_on=cfg.data.loss_on)
t0 = time.time()
ex, rep, hit = encode_sft_source(path, cfg.data, 0, tok, kw, log=print)
tokens = sum(len(e) for e in ex)  # one pass over every example, as a training plan makes (cached: built lazily)
dt = time.time() - t0
print(json.dumps({"seconds": dt, "examples": len(ex), "tokens": tokens, "hit": hit,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the second run (0: skip that run)")
    ap.add_argument("--out", default="runs/tokenize-cache")
    ap.add_argument("--in-memory", action="store_true",
                    help="also run the first pass with the cache off (data.cache=false: every record and example "
                         "held as Python objects, what a first pass did before it was streamed)")
    args = ap.parse_args(argv)

    from posttrain.world.datasets import sft_record
    from posttrain.world.tasks import generate_problems

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"sft_{args.records}.jsonl"
    if not data.exists():
        base = [json.dumps(sft_record(p)) + "\n" for p in generate_problems(20000, seed=0)]
        with data.open("w") as fh:
            for i in range(args.records):
                fh.write(base[i % len(base)])
    size = data.stat().st_size
    results = {"records": args.records, "file_mib": size / 2**20, "cpu": _cpu()}
    with tempfile.TemporaryDirectory(dir=out) as c1, tempfile.TemporaryDirectory(dir=out) as c2:
        runs = ([("in memory (cache off), 1 process", "off", 1)] if args.in_memory else []) + [
            ("first, 1 process", c1, 1)] + ([(f"first, {args.workers} processes", c2, args.workers)]
                                                if args.workers > 1 else []) + [("cached", c1, 1)]
        for name, cache, workers in runs:
            r = subprocess.run([sys.executable, "-c", CHILD, str(data), cache, str(workers)], capture_output=True,
                               text=True, check=True)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["records_per_s"] = args.records / row["seconds"]
            results[name] = row
            print(name, row, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{args.records} records ({size / 2**20:.0f} MiB JSONL), {results['cpu']}")
    print("| run | seconds | records/s | peak RSS (MiB) | workers' peak RSS (MiB) |\n|---|---|---|---|---|")
    for name in [k for k in results if isinstance(results[k], dict)]:
        r = results[name]
        print(f"| {name} | {r['seconds']:.1f} | {r['records_per_s']:.0f} | {r['peak_rss_mib']:.0f} | "
              f"{r['children_peak_rss_mib']:.0f} |")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
