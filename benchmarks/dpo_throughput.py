"""DPO: posttrain vs TRL's DPOTrainer — pairs/s and peak memory side by side, plus a
numerical cross-check of the loss values on identical inputs.

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python benchmarks/dpo_throughput.py

Throughput: each variant trains in its own fresh subprocess from the same initial weights (the
tiny world's base model, and a random 22.9M-parameter Llama) on the same tiny-world preference
pairs with the same hyper-parameters: sigmoid DPO, beta 0.1, lr 5e-5 with 3 warmup steps then
cosine to 10%, AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, 8 pairs per step, max_length
256, a frozen copy of the initial model as the reference (computed live every step), fp32,
no gradient checkpointing (TRL's defaults of bf16 autocast and gradient checkpointing are
turned off so both do the same arithmetic). Pairs/s is measured by a forward pre-hook on the
POLICY's input embedding (one policy forward per step in both libraries): pairs of steps
``warmup..N-2`` over the time from the start of step ``warmup`` to the start of the last step.

Cross-check: (a) DPO loss types both libraries implement (sigmoid, hinge, ipo, robust) are
evaluated by TRL's own ``DPOTrainer._compute_loss`` on a batch from TRL's own data pipeline,
and by posttrain's algorithm on the SAME token ids, model and reference; (b) SimPO and ORPO's
odds-ratio term against TRL's ``CPOTrainer.cpo_loss`` / ``ORPOTrainer.odds_ratio_loss`` on the
same random sequence log-probs. The absolute differences are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_throughput import make_inputs as make_model_inputs  # noqa: E402
from sft_throughput import run_child  # noqa: E402

VARIANTS = ["posttrain-shared", "posttrain-packed", "posttrain-padded", "trl-padded", "trl-padding-free"]
# posttrain layouts: shared = packed rows with each pair's prompt encoded once (prefix sharing)


def _threads():
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))


def make_inputs(workdir: Path, model_name: str, n_pairs: int) -> dict:
    from posttrain.world.datasets import write_jsonl
    from posttrain.world.preferences import preference_records

    inputs = make_model_inputs(workdir, model_name, 10, 10)
    inputs["pairs"] = str(write_jsonl(workdir / "pairs.jsonl", preference_records(n_pairs, seed=0)))
    return inputs


class PairClock:
    """Forward pre-hook on ONE embedding module (not on copies of it): (time, rows) per call."""

    def __init__(self, module):
        self.module = module
        self.events: list[tuple[float, int]] = []
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if module is self.module and module.training:
            self.events.append((time.perf_counter(), int(args[0].shape[0])))

    def pairs_per_second(self, warmup: int, pairs_per_step: int) -> float:
        ev = self.events
        return pairs_per_step * (len(ev) - 1 - warmup) / (ev[-1][0] - ev[warmup][0])


def child(variant: str, inputs: dict, args) -> dict:
    _threads()
    from posttrain.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(inputs["init"])
    model = load_causal_lm(inputs["init"], device="cpu")
    clock = PairClock(model.get_input_embeddings())
    out_dir = tempfile.mkdtemp(prefix=f"bench-{variant}-")
    if variant.startswith("posttrain"):
        from posttrain.algorithms.dpo import DPOConfig, run_preference
        from posttrain.config import load_config

        cfg = load_config(DPOConfig, None, [
            f"data.train={inputs['pairs']}", "data.eval=null", f"data.max_length={args.max_length}",
            f"data.packing={str(variant != 'posttrain-padded').lower()}",
            f"data.share_prefix={str(variant == 'posttrain-shared').lower()}", f"train.output_dir={out_dir}",
            f"train.max_steps={args.steps}", f"train.micro_batch_size={args.pairs}", "train.grad_accum=1",
            f"train.lr={args.lr}", f"train.warmup_ratio={3 / args.steps}", "train.progress=false",
            "model.device=cpu", "loss.name=dpo", "loss.beta=0.1", "loss.displacement_window=0",
        ])
        res = run_preference(cfg, model=model, tokenizer=tok, log=lambda s: None)
        losses = [h["loss"] for h in res.fit.history]
    else:
        from datasets import Dataset
        from trl import DPOConfig as TRLConfig
        from trl import DPOTrainer

        records = [json.loads(x) for x in Path(inputs["pairs"]).read_text().splitlines()]
        targs = TRLConfig(
            output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.pairs,
            gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=3, weight_decay=0.1, adam_beta1=0.9,
            adam_beta2=0.95, max_grad_norm=1.0, max_length=args.max_length, loss_type=["sigmoid"], beta=0.1,
            padding_free=variant.endswith("padding-free"), logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, eval_strategy="no", bf16=False,
            gradient_checkpointing=False,
        )
        trainer = DPOTrainer(model=model, args=targs, train_dataset=Dataset.from_list(records), processing_class=tok)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "pairs_per_s": clock.pairs_per_second(args.warmup, args.pairs),
            "peak_rss_mib": peak, "loss_last10": sum(losses[-10:]) / len(losses[-10:]), "steps": len(losses),
            "parameters": sum(p.numel() for p in model.parameters())}


# --------------------------------------------------------------------------- cross-check


def cross_check() -> list[tuple[str, float, float]]:
    """(name, max |posttrain - TRL|, typical magnitude) for each shared loss."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from posttrain.algorithms.dpo import PreferenceAlgorithm, frozen_copy
    from posttrain.data import prediction_index
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.ops import get_preference_loss
    from posttrain.world.preferences import preference_records

    tok = load_tokenizer("builtin:tiny-world-base")
    rows = []
    records = preference_records(8, seed=5)
    for trl_name, ours, hp in [
        ("sigmoid", "dpo", {"beta": 0.1, "label_smoothing": 0.0, "robust": False}),
        ("hinge", "hinge", {"beta": 0.1}),
        ("ipo", "ipo", {"beta": 0.1}),
        ("robust", "dpo", {"beta": 0.1, "label_smoothing": 0.2, "robust": True}),
    ]:
        torch.manual_seed(0)
        policy = load_causal_lm("builtin:tiny-world-base", device="cpu")
        reference = frozen_copy(policy)
        with torch.no_grad():  # make the policy differ from the reference so the margins are non-zero
            for p in policy.parameters():
                p.add_(0.02 * torch.randn_like(p))
        args = TRLConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, loss_type=[trl_name],
                         beta=hp["beta"], label_smoothing=hp.get("label_smoothing", 0.0), report_to="none",
                         use_cpu=True, bf16=False, gradient_checkpointing=False, max_length=256)
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                             train_dataset=Dataset.from_list(records), processing_class=tok)
        inputs = next(iter(trainer.get_train_dataloader()))
        policy.train()
        with torch.no_grad():
            trl_loss = float(trainer._compute_loss(policy, inputs, return_outputs=False))
        # the same token ids in posttrain's layout: rows [chosen..., rejected...], labels on the completion
        ids, att, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        labels = ids.masked_fill(comp == 0, -100)
        seq = torch.arange(ids.shape[0])[:, None].expand_as(ids).masked_fill(att == 0, -1)
        batch = {"input_ids": ids, "attention_mask": att, "labels": labels, "sequence_ids": seq,
                 "position_ids": (att.cumsum(-1) - 1).clamp(min=0), "num_sequences": ids.shape[0],
                 "num_units": ids.shape[0] // 2}
        batch.update(prediction_index(labels, seq))
        algo = PreferenceAlgorithm(get_preference_loss(ours), hp, reference=reference)
        with torch.no_grad():
            our_loss, _ = algo.loss(policy, batch, {"units": torch.tensor(float(ids.shape[0] // 2))})
        rows.append((f"dpo loss_type={trl_name} (posttrain {ours}{', robust' if hp.get('robust') else ''})",
                     abs(float(our_loss) - trl_loss), abs(trl_loss)))

    # SimPO and ORPO's odds-ratio term on identical random sequence log-probs
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from posttrain.ops import orpo_loss, simpo_loss

    g = torch.Generator().manual_seed(0)
    lc, lr = torch.randint(5, 40, (16,), generator=g).float(), torch.randint(5, 40, (16,), generator=g).float()
    c, r = -lc * torch.rand(16, generator=g) * 2, -lr * torch.rand(16, generator=g) * 2
    fake = SimpleNamespace(alpha=0.0, beta=2.0, loss_type="simpo", simpo_gamma=0.5, label_smoothing=0.1,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_simpo = CPOTrainer.cpo_loss(fake, c / lc, r / lr)[0]
    ours_simpo, _ = simpo_loss(c, r, None, None, lc, lr, beta=2.0, simpo_gamma=0.5, label_smoothing=0.1)
    rows.append(("simpo (TRL CPOTrainer loss_type=simpo)", float((ours_simpo - trl_simpo).abs().max()),
                 float(trl_simpo.abs().mean())))
    fake = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_or = ORPOTrainer.odds_ratio_loss(fake, c / lc, r / lr)[0]  # = beta * log sigmoid(log odds ratio)
    ours_orpo, m = orpo_loss(c, r, None, None, lc, lr, orpo_lambda=0.1)
    ours_or_term = ours_orpo - (-c / lc)  # remove the NLL term: lambda * (-log sigmoid(log odds ratio))
    rows.append(("orpo odds-ratio term (TRL ORPOTrainer.odds_ratio_loss)", float((ours_or_term + trl_or).abs().max()),
                 float(trl_or.abs().mean())))
    return rows


# --------------------------------------------------------------------------- parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-world-base,llama-25m")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--train-pairs", type=int, default=1000)
    p.add_argument("--skip-cross-check", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--inputs", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, json.loads(args.inputs), args)), flush=True)
        return
    if not args.skip_cross_check:
        print("numerical cross-check against TRL (identical inputs):")
        for name, diff, scale in cross_check():
            print(f"  {name:62} max |diff| = {diff:.2e}  (|loss| ~ {scale:.3g})")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            work = Path(tmp) / model_name
            work.mkdir()
            inputs = make_inputs(work, model_name, args.train_pairs)
            for variant in args.variants.split(","):
                t = time.time()
                r = run_child(__file__, variant, inputs, model_name, [
                    "--steps", str(args.steps), "--warmup", str(args.warmup), "--pairs", str(args.pairs),
                    "--max-length", str(args.max_length), "--lr", str(args.lr)])
                results.append(r)
                print(f"  {model_name:16} {variant:18} {r['pairs_per_s']:7.2f} pairs/s  peak {r['peak_rss_mib']:6.0f} MiB"
                      f"  loss {r['loss_last10']:.4f}  ({time.time() - t:.0f}s)", flush=True)
    print("\n| model | variant | pairs/s | vs TRL padded | peak RSS MiB | train loss (last 10) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        trl = next((x for x in results if x["model"] == r["model"] and x["variant"] == "trl-padded"), None)
        ratio = f"{r['pairs_per_s'] / trl['pairs_per_s']:.2f}x" if trl else "-"
        print(f"| {r['model']} ({r['parameters'] / 1e6:.1f}M) | {r['variant']} | {r['pairs_per_s']:.2f} | {ratio} "
              f"| {r['peak_rss_mib']:.0f} | {r['loss_last10']:.4f} |")


if __name__ == "__main__":
    main()
