"""LoRA vs full fine-tuning: tokens/s, peak memory, result; and the reference model's memory.

    python benchmarks/lora_vs_full.py                     # ~6 min on a 2-core CPU
    python benchmarks/lora_vs_full.py --heldout           # + the quickstart's SFT recipe with LoRA (~4 min more)

For each model (the tiny world's base model, 4.3M parameters, and a randomly initialized
22.9M-parameter Llama) and each method (SFT; DPO, which needs a reference model), two runs in
fresh subprocesses on identical data and settings: full fine-tuning (DPO's reference: a frozen
copy of the model) and LoRA r=16, alpha=32 on every linear layer (DPO's reference: the same
model with the adapter disabled, no copy). Reported per run: trainable parameters, training
tokens/s (steps after the first two), the process's peak resident memory above what it held
once the libraries were imported, and the final training loss. ``--heldout`` also trains the
quickstart's SFT recipe (1000 steps' worth: 1 epoch of 4000 examples) with LoRA from the tiny
world's base model and reports held-out accuracy next to full fine-tuning's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _prepare(model_name: str, workdir: Path) -> str:
    from bench_models import llama_25m

    from posttrain.models.loading import load_causal_lm, load_tokenizer

    init = workdir / f"init-{model_name}"
    if init.exists():
        return str(init)
    tok = load_tokenizer("builtin:tiny-world-base")
    if model_name == "tiny-world-base":
        model = load_causal_lm("builtin:tiny-world-base", device="cpu")
    else:
        model = llama_25m()
    model.save_pretrained(init)
    tok.save_pretrained(init)
    return str(init)


def _child(spec: dict) -> dict:
    from posttrain.config import load_config

    base_rss = _rss_mib()
    overrides = [f"model.name_or_path={spec['init']}", f"train.output_dir={spec['out']}", "train.progress=false",
                 f"train.max_steps={spec['steps']}", "train.save_every=0", "train.overwrite_output_dir=true",
                 f"train.lr={spec['lr']}", "data.eval=null", "train.warmup_ratio=0"]
    if spec["lora"]:
        overrides += ["model.peft.method=lora", "model.peft.r=16", "model.peft.alpha=32"]
    if spec["method"] == "sft":
        from posttrain.algorithms.sft import SFTConfig, run_sft

        cfg = load_config(SFTConfig, None, overrides + ["data.train=builtin:world-sft", "train.micro_batch_size=8",
                                                        "data.max_length=256"])
        res = run_sft(cfg, log=lambda s: None)
    else:
        from posttrain.algorithms.dpo import DPOConfig, run_preference

        cfg = load_config(DPOConfig, None, overrides + ["data.train=builtin:world-pairs", "train.micro_batch_size=8",
                                                        "data.max_length=256"])
        res = run_preference(cfg, log=lambda s: None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hist = res.fit.history[2:] or res.fit.history
    tokens = sum(h["input_tokens"] for h in hist)
    seconds = sum(h["step_seconds"] for h in hist)
    return {"tokens_per_s": tokens / seconds, "peak_mib": peak - base_rss, "final_loss": res.fit.history[-1]["loss"]}


def _heldout_child(spec: dict) -> dict:
    """The quickstart's SFT stage settings (posttrain.quickstart._default_sft) with or without LoRA."""
    from posttrain.quickstart import QuickstartConfig, run_quickstart

    overrides = {"stages": ["sft"], "output_dir": spec["out"]}
    cfg = QuickstartConfig(**overrides)
    if spec["lora"]:
        cfg.sft.model.peft.method = "lora"
        cfg.sft.model.peft.r = 16
        cfg.sft.model.peft.alpha = 32
        cfg.sft.train.lr = spec["lr"]
    t = time.time()
    summary = run_quickstart(cfg, log=lambda s: None)
    return {"heldout_accuracy": summary["SFT"]["accuracy"], "seconds": time.time() - t}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-world-base,llama-25m")
    ap.add_argument("--methods", default="sft,dpo")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr-full", type=float, default=1e-4)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--heldout", action="store_true")
    ap.add_argument("--heldout-lr", type=float, default=3e-3, help="LoRA learning rate for --heldout")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(_heldout_child(spec) if spec.get("heldout") else _child(spec)))
        return

    import platform

    import torch

    def run(spec):
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, fp32\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("| model | method | variant | trainable params | tokens/s | ratio | peak extra MiB | ratio | final loss |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for model_name in args.models.split(","):
            init = _prepare(model_name, work)
            from posttrain.models.loading import load_causal_lm
            from posttrain.models.peft import apply_peft
            from posttrain.config import PeftConfig

            n_all = sum(p.numel() for p in load_causal_lm(init).parameters())
            lora_model = apply_peft(load_causal_lm(init), PeftConfig(method="lora", r=16, alpha=32))
            n_lora = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
            for method in args.methods.split(","):
                res = {}
                for lora in (False, True):
                    spec = {"init": init, "out": str(work / f"{model_name}-{method}-{lora}"), "steps": args.steps,
                            "lr": args.lr_lora if lora else args.lr_full, "lora": lora, "method": method}
                    res[lora] = run(spec)
                for lora in (False, True):
                    r = res[lora]
                    name = "LoRA r16 (reference: adapter off)" if lora else "full (reference: frozen copy)"
                    if method == "sft":
                        name = "LoRA r16" if lora else "full"
                    row = {"model": model_name, "method": method, "variant": name,
                           "trainable": n_lora if lora else n_all, **r,
                           "speed_ratio": r["tokens_per_s"] / res[False]["tokens_per_s"],
                           "mem_ratio": r["peak_mib"] / res[False]["peak_mib"]}
                    rows.append(row)
                    print(f"| {model_name} ({n_all / 1e6:.1f}M) | {method} | {name} | {row['trainable']:,} | "
                          f"{r['tokens_per_s']:.0f} | {row['speed_ratio']:.2f} | {r['peak_mib']:.0f} | "
                          f"{row['mem_ratio']:.2f} | {r['final_loss']:.4f} |", flush=True)
        if args.heldout:
            print("\n| tiny world SFT recipe | held-out accuracy | wall time |\n|---|---:|---:|")
            for lora in (False, True):
                r = run({"heldout": True, "lora": lora, "lr": args.heldout_lr, "out": str(work / f"qs-{lora}")})
                rows.append({"heldout": True, "lora": lora, **r})
                print(f"| {'LoRA r16, lr ' + str(args.heldout_lr) if lora else 'full, lr 1e-3'} | "
                      f"{100 * r['heldout_accuracy']:.1f}% | {r['seconds']:.0f} s |", flush=True)
    Path("runs").mkdir(exist_ok=True)
    Path("runs/lora_vs_full.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
