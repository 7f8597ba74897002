"""SFT throughput: posttrain vs TRL's SFTTrainer, packed and padded, side by side in one run.

    .venv/bin/pip install -e ".[bench]"        # adds trl + datasets
    .venv/bin/python benchmarks/sft_throughput.py

For each model, every variant trains in its own fresh subprocess (so peak memory is its own)
from the SAME initial weights, on the SAME tiny-world SFT conversations, with the same
hyper-parameters: AdamW (0.9, 0.95), weight decay 0.1, lr with 3 warmup steps then cosine to
10%, clip 1.0, assistant-only loss, max_length 256, 8 rows per step, no accumulation, and the
same precision (``--precision fp32``: fp32 everywhere, the default; ``bf16``: bf16 autocast
over fp32 weights for both). TRL's own defaults differ in two ways that are set explicitly
here: it turns on bf16 autocast and gradient checkpointing; both are off unless asked for, so
the two libraries do the same arithmetic.

Measured the same way for both libraries: a forward pre-hook on the input embedding layer
records (time, non-padding input tokens) of every training forward; throughput is the tokens of
steps ``warmup..N-2`` divided by the time from the start of step ``warmup`` to the start of
the last step (so one-off start-up and the final save are excluded). Peak memory is the
child's ``ru_maxrss``. Loss: the mean training loss (NLL per assistant token) of the last 10
steps, and the held-out NLL of the final model computed by one shared evaluator. MFU is the
model FLOPs (6 x matmul parameters + 12 x layers x width x mean document length, per token)
per second over the matmul peak of the run's precision, measured on this machine at start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["posttrain-packed", "trl-packed", "posttrain-padded", "trl-padded"]


# --------------------------------------------------------------------------- shared setup


def _threads():
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))


def matmul_peak_gflops(n: int = 2048, reps: int = 10, dtype: str = "fp32") -> float:
    import torch

    _threads()
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def make_inputs(workdir: Path, model_name: str, n_train: int, n_eval: int) -> dict:
    """Write data files and the initial model (shared by every variant of this model)."""
    from bench_models import llama_25m, llama_100m

    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.world.datasets import sft_record, write_jsonl
    from posttrain.world.tasks import generate_problems

    tok = load_tokenizer("builtin:tiny-world-base")
    write_jsonl(workdir / "train.jsonl", [sft_record(p) for p in generate_problems(n_train, seed=0)])
    write_jsonl(workdir / "eval.jsonl", [sft_record(p) for p in generate_problems(n_eval, seed=0, split="heldout")])
    init = workdir / f"init-{model_name}"
    if model_name == "tiny-world-base":
        model = load_causal_lm("builtin:tiny-world-base", device="cpu")
    elif model_name == "llama-100m":
        model = llama_100m()
    else:  # a bigger random Llama: compute-bound, so per-step overheads matter less
        model = llama_25m()
    model.save_pretrained(init)
    tok.save_pretrained(init)
    return {"init": str(init), "train": str(workdir / "train.jsonl"), "eval": str(workdir / "eval.jsonl")}


class TokenClock:
    """Forward pre-hook on the input embeddings: (time, non-pad tokens) of every forward."""

    def __init__(self, model, pad_id: int):
        self.events: list[tuple[float, int]] = []
        self.pad_id = pad_id
        self.enabled = True
        self.cells = 0  # tokens computed, padding included
        model.get_input_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.enabled and module.training:
            ids = args[0]
            self.events.append((time.perf_counter(), int((ids != self.pad_id).sum())))
            self.cells += ids.numel()

    def throughput(self, warmup: int) -> float:
        ev = self.events
        tokens = sum(n for _, n in ev[warmup:-1])
        return tokens / (ev[-1][0] - ev[warmup][0])


def model_flops_per_token(model, mean_doc_len: float) -> float:
    cfg = model.config
    emb = model.get_input_embeddings().weight.numel()
    n_matmul = sum(p.numel() for p in model.parameters() if p.ndim >= 2) - emb
    n_matmul += emb  # the LM head matmul (tied with the embedding)
    return 6 * n_matmul + 12 * cfg.num_hidden_layers * cfg.hidden_size * mean_doc_len


# --------------------------------------------------------------------------- children


def child(variant: str, inputs: dict, args) -> dict:
    _threads()

    from posttrain.algorithms.sft import SFTAlgorithm, eval_loss
    from posttrain.data import encode_dataset, load_records
    from posttrain.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(inputs["init"])
    model = load_causal_lm(inputs["init"], device="cpu")
    clock = TokenClock(model, tok.pad_token_id)
    packing = variant.endswith("packed")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out_dir = tempfile.mkdtemp(prefix=f"bench-{variant}-")
    if variant.startswith("posttrain"):
        from posttrain.algorithms.sft import SFTConfig, run_sft
        from posttrain.config import load_config

        cfg = load_config(SFTConfig, None, [
            f"data.train={inputs['train']}", "data.eval=null", f"data.max_length={args.max_length}",
            f"data.packing={str(packing).lower()}", f"train.output_dir={out_dir}",
            f"train.max_steps={args.steps}", f"train.micro_batch_size={args.rows}", "train.grad_accum=1",
            f"train.lr={args.lr}", f"train.warmup_ratio={3 / args.steps}", "train.progress=false",
            "model.device=cpu", f"train.mixed_precision={'bf16' if args.precision == 'bf16' else 'no'}",
        ])
        res = run_sft(cfg, model=model, tokenizer=tok, log=lambda s: None)
        losses = [h["loss"] for h in res.fit.history]
    else:
        from datasets import Dataset
        from trl import SFTConfig as TRLConfig
        from trl import SFTTrainer

        records = [json.loads(x) for x in Path(inputs["train"]).read_text().splitlines()]
        targs = TRLConfig(
            output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.rows,
            gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=3, weight_decay=0.1, adam_beta1=0.9,
            adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, max_length=args.max_length,
            packing=packing, assistant_only_loss=True, logging_steps=1, save_strategy="no",
            report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
            eval_strategy="no", bf16=args.precision == "bf16", fp16=False,
            gradient_checkpointing=False,
        )
        trainer = SFTTrainer(model=model, args=targs, train_dataset=Dataset.from_list(records),
                             processing_class=tok)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    clock.enabled = False
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tps = clock.throughput(args.warmup)
    eval_ds = load_records(inputs["eval"])
    eval_examples, _ = encode_dataset(eval_ds, tok, max_length=args.max_length)
    held = eval_loss(model, SFTAlgorithm(), eval_examples, pad_token_id=tok.pad_token_id)
    mean_doc = sum(len(e) for e in eval_examples) / len(eval_examples)
    flops = model_flops_per_token(model, mean_doc)
    return {
        "variant": variant, "tokens_per_s": tps, "peak_rss_mib": peak, "rss_before_train_mib": rss_before,
        "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]), "heldout_nll": held["loss"],
        "steps": len(losses), "flops_per_token": flops,
        "padding_ratio": 1 - sum(n for _, n in clock.events) / max(1, clock.cells),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# --------------------------------------------------------------------------- parent


def run_child(script: str, variant: str, inputs: dict, model_name: str, extra: list[str]) -> dict:
    """Run one variant in a fresh subprocess (its own peak memory) and return its RESULT line."""
    cmd = [sys.executable, script, "--child", variant, "--inputs", json.dumps(inputs), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"{variant} on {model_name} failed")
    return {**json.loads(line[len("RESULT "):]), "model": model_name}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-world-base,llama-25m")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the throughput")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fp32 everywhere, or bf16 autocast (weights and optimizer stay fp32) for both")
    p.add_argument("--train-examples", type=int, default=3000)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--inputs", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, json.loads(args.inputs), args)), flush=True)
        return

    peak = matmul_peak_gflops(dtype=args.precision)
    print(f"{args.precision} matmul peak on this machine ({os.environ.get('BENCH_THREADS', '2')} threads): "
          f"{peak:.0f} GFLOP/s")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            work = Path(tmp) / model_name
            work.mkdir()
            inputs = make_inputs(work, model_name, args.train_examples, 200)
            for variant in args.variants.split(","):
                t = time.time()
                r = run_child(__file__, variant, inputs, model_name, [
                    "--steps", str(args.steps), "--warmup", str(args.warmup), "--rows", str(args.rows),
                    "--max-length", str(args.max_length), "--lr", str(args.lr), "--precision", args.precision])
                r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e9)
                results.append(r)
                print(f"  {model_name:16} {variant:17} {r['tokens_per_s']:8.0f} tok/s  "
                      f"peak {r['peak_rss_mib']:6.0f} MiB  loss {r['train_loss_last10']:.4f}  "
                      f"held-out {r['heldout_nll']:.4f}  padding {100 * r['padding_ratio']:.0f}%  ({time.time() - t:.0f}s)",
                      flush=True)

    print("\n| model | variant | trained tokens/s | vs TRL (same layout) | padding | peak RSS MiB "
          "| train loss (last 10) | held-out NLL | MFU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        layout = r["variant"].split("-")[1]
        trl = next((x for x in results if x["model"] == r["model"] and x["variant"] == f"trl-{layout}"), None)
        ratio = f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if trl else "-"
        print(f"| {r['model']} ({r['parameters'] / 1e6:.1f}M) | {r['variant']} | {r['tokens_per_s']:.0f} | {ratio} "
              f"| {100 * r['padding_ratio']:.0f}% | {r['peak_rss_mib']:.0f} | {r['train_loss_last10']:.4f} | {r['heldout_nll']:.4f} "
              f"| {100 * r['mfu']:.1f}% |")
    if args.out:
        Path(args.out).write_text(json.dumps({"matmul_peak_gflops": peak, "results": results}, indent=2))


if __name__ == "__main__":
    main()
