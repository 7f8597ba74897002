"""The training engine: one lean loop shared by every method.

An *algorithm* (every method: SFT, RM, PRM, the DPO family, distillation, and the online methods
through their plans) supplies two things:

* ``counts(batch) -> dict[str, int]`` — how many loss tokens / sequences a micro-batch holds;
* ``loss(model, batch, totals) -> (loss, metrics)`` — the micro-batch's share of the step loss,
  already divided by the step's GLOBAL ``totals`` (summed over every micro-batch of the step
  and every data-parallel process), plus metrics that are additive over micro-batches the
  same way (each a sum divided by the global count).

Summing these shares over micro-batches is exactly the one-big-batch loss, so gradient
accumulation (and data parallelism) reproduces the one-big-batch gradient even when the
micro-batches hold uneven numbers of tokens. A *plan* supplies the micro-batches of each
optimizer step deterministically (``plan.batches(step)``), which is what lets a resumed run
continue exactly.

Per optimizer step the loop: sums counts, runs forward/backward per micro-batch, clips the
gradient norm (logging the pre-clip norm), skips the update when the loss or the norm is not
finite (counting it; aborting after ``max_bad_steps``), steps AdamW and the schedule, logs,
evaluates and checkpoints on schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..errors import CheckpointError, ConfigError, RunInterrupted, TrainingError
from .checkpoint import (
    check_checkpoint,
    find_resumable,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_pretrained_atomic,
)
from .gradient_checkpointing import gradient_checkpointing
from .logging import MetricsLogger
from .neftune import neftune
from .optim import build_optimizer, build_scheduler
from .plan import init_distributed, spread_eval_every
from .rundir import prepare_output_dir, run_lock
from .sharding import (
    by_index,
    decoder_layers,
    full_optimizer_state,
    gathered_copy,
    load_full_optimizer_state,
    reshard_from_launcher,
    shard_model,
    sharding_from_launcher,
    unsharded_copy,
)
from . import zero


class Algorithm(Protocol):
    def counts(self, batch: dict) -> dict[str, int]: ...

    def loss(self, model, batch: dict, totals: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class Plan(Protocol):
    """Deterministic micro-batches per optimizer step."""

    def num_steps(self) -> int: ...

    def batches(self, step: int) -> list[dict]: ...

    def fingerprint(self) -> str: ...


@dataclass
class FitResult:
    steps: int
    skipped_steps: int
    history: list[dict] = field(default_factory=list)
    eval_history: list[dict] = field(default_factory=list)
    final_dir: Path | None = None
    seconds: float = 0.0


def to_device(batch: dict, device: torch.device) -> dict:
    """Move every tensor of a (possibly nested) batch dict to ``device``."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            v = to_device(v, device)
        out[k] = v
    return out


def _resolve_resume(resume: str | None, ckpt_dir: Path, log: Callable[[str], None]) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        found = find_resumable(ckpt_dir, log)
        if found is None:
            log(f"note: train.resume=auto found no checkpoint in {ckpt_dir}; starting a fresh run")
        return found
    return Path(resume).expanduser()


def _step_totals(algorithm, micro: list[dict], device, accelerator, world: int) -> tuple[dict, dict]:
    """Counts summed over the step's micro-batches (and processes): (python ints, tensors)."""
    totals: dict[str, int] = {}
    for b in micro:
        for k, v in algorithm.counts(b).items():
            totals[k] = totals.get(k, 0) + int(v)
    keys = sorted(totals)
    vec = torch.tensor([float(totals[k]) for k in keys], device=device)
    if world > 1:
        vec = accelerator.reduce(vec, reduction="sum")
    return totals, dict(zip(keys, vec))


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's check: AVX-512 BF16 / AMX class units)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_mixed_precision(configured: str, device) -> str:
    """``train.mixed_precision``, or bf16 when ``accelerate launch`` was configured with it (posttrain
    applies the autocast itself, so the launcher's setting must not be silently dropped); fp16 and
    bf16 on a CPU without bf16 units are refused."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher == "fp16" or configured == "fp16":
        raise ConfigError("The accelerate configuration asks for fp16 mixed precision; posttrain trains in fp32 or "
                          "with bf16 autocast (fp16 would need loss scaling).",
                          fix="set mixed_precision: bf16 (or no) in the accelerate config.")
    mode = "bf16" if launcher == "bf16" else configured
    if mode == "bf16" and getattr(device, "type", str(device)) == "cpu" and not cpu_bf16_supported():
        source = ("the accelerate configuration (mixed_precision: bf16)" if launcher == "bf16"
                  else "train.mixed_precision=bf16")
        raise ConfigError(f"{source} asks for bf16 compute, but this CPU has no bf16 units (AVX-512 BF16 / AMX): "
                          "bf16 would be emulated, many times slower than fp32, and less exact.",
                          fix="train in fp32 on this machine (train.mixed_precision=no, mixed_precision: no in the "
                          "accelerate config), or use a GPU or a CPU with bf16 support.")
    return mode


class _StateView:
    """An optimizer state gathered from the shards, standing in for the optimizer when a
    checkpoint is written (only ``state_dict()`` is read)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def _check_shardable(model, plan, sharding: str) -> None:
    """Sharding needs every process to run the same forward passes in the same order, which the
    sampling methods (their rollouts are split across processes or end at different lengths) and
    adapters (not wired to FSDP2 / ZeRO here) do not guarantee."""
    from ..models.peft import is_peft

    if is_peft(model):
        raise ConfigError(f"train.sharding={sharding} with a LoRA / QLoRA adapter (model.peft) is not supported.",
                          fix="use train.sharding=none: with an adapter only its small weights have gradients and "
                          "optimizer state, so data parallel usually fits.")
    if getattr(plan, "samples_from_model", False):
        raise ConfigError(f"train.sharding={sharding} is for sft, rm, the dpo family, prm and distill; this command "
                          "samples from the model while it trains, which sharding does not support yet.",
                          fix="use train.sharding=none (data parallel), and model.peft to fit a large model.")


@torch.no_grad()
def _sum_gradients(params: list, accelerator) -> None:
    """Sum the step's gradients over processes (one flat all-reduce). A parameter without a
    gradient on a process contributes zeros there; one without a gradient on every process keeps
    none (so the optimizer skips it, as in a single process)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [present])
    flat = accelerator.reduce(flat, reduction="sum")
    i = 0
    for p, g, seen in zip(params, grads, flat[-len(params):].tolist()):
        n = g.numel()
        p.grad = flat[i:i + n].view_as(g).to(g.dtype) if seen else None
        i += n


@torch.no_grad()
def probe_loss(model, algorithm, plan, device, accelerator, world: int) -> float:
    """The loss of ``model`` (eval mode) on the first optimizer step's micro-batches, or on the
    plan's ``probe_batches()`` when it has them (online RL: the last step's, without sampling),
    summed over processes."""
    was = model.training
    model.eval()
    probe = plan.probe_batches() if hasattr(plan, "probe_batches") else plan.batches(0)
    micro = [to_device(b, device) for b in probe]
    _, totals_t = _step_totals(algorithm, micro, device, accelerator, world)
    total = torch.zeros((), device=device)
    for b in micro:
        total += algorithm.loss(model, b, totals_t)[0].detach().float()
    if world > 1:  # every process sees the same sum, so all of them stop (or go on) together
        total = accelerator.reduce(total, reduction="sum")
    model.train(was)
    return float(total)


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    complete, _ = list_checkpoints(ckpt_dir)
    return complete[-1] if complete else None


def fit(
    model,
    algorithm: Algorithm,
    plan: Plan,
    cfg: TrainConfig,
    *,
    tokenizer=None,
    accelerator=None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    run_config: dict | None = None,
    inputs: dict | None = None,
    log: Callable[[str], None] = print,
    callbacks: list[Callable[[dict], None]] = (),
    eval_times: int | None = None,
    eval_at_start: bool = False,
) -> FitResult:
    """Train ``model`` for ``plan.num_steps()`` optimizer steps; see the module docstring.

    ``cfg`` is the command's ``train`` section; the loop reads its optimizer, schedule, logging,
    checkpoint and precision options (its batch sizes, epochs and seed are the plan's business).
    ``callbacks`` see every step's metrics record before it is logged and may add keys to it
    (e.g. the likelihood-displacement monitor of the preference trainer). A callback with
    ``state_dict()`` / ``load_state_dict(state)`` has its state saved in every checkpoint and
    restored on resume (JSON-serializable values). ``inputs`` identifies what the run reads but
    does not checkpoint (e.g. ``{"reference_weights_sha256": ...}``); a resume refuses other inputs.
    ``eval_times``: evaluate about that many times, evenly spread (in place of ``cfg.eval_every``).
    ``eval_at_start``: also evaluate the starting model, as step 0 (not on a resume).

    The run ends as a success only if the final model gives a finite loss on a probe batch and
    no more than half of the optimizer steps were skipped as non-finite; otherwise it raises
    :class:`TrainingError` without writing ``final/`` (earlier checkpoints stay). Ctrl-C raises
    :class:`RunInterrupted` naming the latest complete checkpoint.
    """
    from accelerate import Accelerator

    # accelerate / transformers import deepspeed wherever it is installed (unwrapping and saving check for
    # its engine): on a machine without CUDA, name its accelerator so that import prints nothing
    zero.quiet_deepspeed_import()
    init_distributed()  # (with posttrain's timeout, before accelerate joins the group)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    if plan.num_steps() <= 0:
        raise TrainingError("The training plan has no optimizer steps (the dataset is empty after "
                            "filtering, or train.max_steps is 0).", fix="check the data and train.* settings.")
    if eval_times:
        cfg = dataclasses.replace(cfg, eval_every=spread_eval_every(plan.num_steps(), eval_times))
    out, lock = Path(cfg.output_dir), contextlib.nullcontext()
    if accelerator.is_main_process:  # only rank 0 writes
        out = prepare_output_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite_output_dir)
        lock = run_lock(str(out))
    # (on before sharding wraps the layers, off again when the run ends)
    with lock, gradient_checkpointing(model, cfg.gradient_checkpointing,
                                      log=log if accelerator.is_main_process else None):
        return _fit(model, algorithm, plan, cfg, out, tokenizer=tokenizer, accelerator=accelerator,
                    evaluate=evaluate, run_config=run_config, inputs=inputs, log=log, callbacks=callbacks,
                    eval_at_start=eval_at_start)


def _fit(model, algorithm, plan, cfg: TrainConfig, out: Path, *, tokenizer, accelerator, evaluate, run_config,
         inputs, log, callbacks, eval_at_start: bool = False) -> FitResult:
    """:func:`fit` once the run directory is prepared and locked."""
    total_steps = plan.num_steps()
    ckpt_dir = out / "checkpoints"
    warmup_steps = int(round(cfg.warmup_ratio * total_steps))
    optimizer = build_optimizer(model, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup_steps=warmup_steps,
                                min_lr_ratio=cfg.min_lr_ratio)
    world = accelerator.num_processes
    kind = str(getattr(accelerator, "distributed_type", "")).rsplit(".", 1)[-1]
    if kind == "MEGATRON_LM":
        raise ConfigError("The accelerate configuration asks for Megatron-LM, which posttrain does not support.",
                          fix="launch with FSDP2 (configs/accelerate/fsdp2.yaml) or plain data parallel.")
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision, accelerator.device)
    sharding = sharding_from_launcher(cfg.sharding, max_grad_norm=cfg.max_grad_norm)
    reshard = reshard_from_launcher(cfg.fsdp_reshard_after_forward)
    if sharding != "none":
        _check_shardable(model, plan, sharding)
        if world == 1:
            log(f"note: train.sharding={sharding} with one process: nothing to shard, training unsharded")
            sharding = "none"
    sharded = sharding == "fsdp2"
    zero_stage = zero.ZERO_STAGES.get(sharding)  # DeepSpeed ZeRO: 2 or 3
    ds = None  # its engine
    if sharded or zero_stage:
        model = model.to(accelerator.device)  # the optimizer is rebuilt over the shards after resuming
    elif world > 1:
        # Data parallel without a DDP wrapper: every process runs the model as is (so the fused
        # LM-head path, adapters and reference tricks stay unchanged) and the step's gradients are
        # summed over processes once, after the last micro-batch (_sum_gradients).
        model = model.to(accelerator.device)
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # a launcher with one process (torchrun --nproc_per_node 1): accelerate wraps the model in
            # DDP, which has nothing to exchange and hides the model's attributes (its config) from
            # the log-prob path; train the model itself, as in a plain single process
            model = model.module
    device = accelerator.device
    stateful = [cb for cb in callbacks if hasattr(cb, "state_dict") and hasattr(cb, "load_state_dict")]

    start_step, skipped = 0, 0
    resume_from = _resolve_resume(cfg.resume, ckpt_dir, log)
    if resume_from is not None:
        raw = accelerator.unwrap_model(model)
        accepted = [plan.fingerprint()] + ([plan.legacy_fingerprint()] if hasattr(plan, "legacy_fingerprint") else [])
        check_checkpoint(resume_from, model=raw, fingerprint=accepted, config=run_config, inputs=inputs,
                         world_size=world)
        state = load_checkpoint(resume_from, model=raw, optimizer=optimizer, scheduler=scheduler)
        start_step, skipped = int(state["step"]), int(state["skipped_steps"])
        saved_callbacks = (state.get("extra") or {}).get("callbacks") or []
        if saved_callbacks and len(saved_callbacks) != len(stateful):
            raise CheckpointError(
                f"Checkpoint '{resume_from}' carries the state of {len(saved_callbacks)} diagnostics callback(s), but "
                f"this run has {len(stateful)}.", fix="resume with the command that wrote it, or start a fresh run.")
        for cb, cb_state in zip(stateful, saved_callbacks):
            try:
                cb.load_state_dict(cb_state)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise CheckpointError(
                    f"Checkpoint '{resume_from}' has diagnostics state that does not fit this run "
                    f"({type(cb).__name__}: {type(e).__name__}: {e}).",
                    fix="resume from an earlier checkpoint, or start a fresh run.") from None
        log(f"resumed from {resume_from} at step {start_step}/{total_steps}")
    if sharded:
        # checkpoints are unsharded: a resumed state was loaded into the whole model and optimizer
        # above; carry the optimizer state over to the shards by parameter name
        resumed = full_optimizer_state(model, optimizer, everywhere=True) if resume_from is not None else None
        shard_model(model, reshard_after_forward=reshard)
        optimizer = build_optimizer(model, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                    eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        sched_state = scheduler.state_dict()
        scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup_steps=warmup_steps,
                                    min_lr_ratio=cfg.min_lr_ratio)
        scheduler.load_state_dict(sched_state)
        if resumed is not None:
            load_full_optimizer_state(model, optimizer, resumed)
        log(f"sharded: FSDP2 over {world} processes, {len(decoder_layers(model))} decoder layers + the rest "
            f"({'reshard' if reshard else 'keep gathered weights'} after forward)")
    if zero_stage:
        # as with FSDP2, a resumed state was loaded into the whole model and optimizer above; the
        # optimizer handed to DeepSpeed is a fresh one, its groups' settings and state carried over
        name_of = {id(p): n for n, p in model.named_parameters()}
        resumed = {name_of[id(p)]: optimizer.state[p] for g in optimizer.param_groups for p in g["params"]
                   if optimizer.state.get(p)} if resume_from is not None else {}
        old_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        sched_state = scheduler.state_dict()
        optimizer = build_optimizer(model, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                    eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        names_by_group = zero.group_names(model, optimizer)
        ds = zero.initialize(model, optimizer, zero_stage, max_grad_norm=cfg.max_grad_norm)
        scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup_steps=warmup_steps,
                                    min_lr_ratio=cfg.min_lr_ratio)
        scheduler.load_state_dict(sched_state)
        for g, old in zip(optimizer.param_groups, old_groups):  # (the scheduler's current lr included)
            g.update(old)
        zero.init_optimizer_state(ds, resumed)
        log(f"sharded: DeepSpeed ZeRO-{zero_stage} over {world} processes (optimizer state and gradients"
            f"{' and parameters' if zero_stage == 3 else ''} partitioned)")

    def whole_model():
        """The unsharded model on rank 0 (None elsewhere); collective under sharding."""
        if sharded:
            return gathered_copy(model)
        if zero_stage == 3:
            full = zero.gathered_state_dict(ds)
            return unsharded_copy(model, full) if full else None
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None

    def checkpoint(step: int, gathered: tuple | None = None) -> Path | None:
        """Write a checkpoint (rank 0). Under sharding every process takes part in gathering the
        whole weights (unless already gathered: ``(copy,)``, None on other ranks) and the optimizer
        state, which are written unsharded."""
        ckpt_model, ckpt_optimizer = accelerator.unwrap_model(model), optimizer
        if sharded or zero_stage:
            ckpt_model = gathered[0] if gathered is not None else whole_model()
        if sharded:
            named = full_optimizer_state(model, optimizer)  # (collective; whole on rank 0, empty elsewhere)
            ckpt_optimizer = _StateView(by_index(named)) if accelerator.is_main_process else None
        elif zero_stage:
            full = zero.full_optimizer_state(ds, names_by_group)  # (collective; on rank 0)
            ckpt_optimizer = _StateView(full) if accelerator.is_main_process else None
        if not accelerator.is_main_process:
            return None
        path = save_checkpoint(ckpt_dir, model=ckpt_model, tokenizer=tokenizer,
                               optimizer=ckpt_optimizer, scheduler=scheduler, step=step, skipped_steps=skipped,
                               fingerprint=plan.fingerprint(), config=run_config,
                               extra={"inputs": inputs or {}, "world_size": world},
                               extra_state={"callbacks": [cb.state_dict() for cb in stateful]})
        if cfg.save_total_limit:
            prune_checkpoints(ckpt_dir, cfg.save_total_limit, log)
        return path

    logger = MetricsLogger(out, report_to=cfg.report_to, run_config=run_config,
                           resume_step=start_step if resume_from is not None else None,
                           enabled=accelerator.is_main_process)
    result = FitResult(steps=start_step, skipped_steps=skipped)
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step",
               disable=not (cfg.progress and accelerator.is_main_process), dynamic_ncols=True)
    t_start = time.time()
    tokens_seen = 0
    last_saved = start_step if resume_from is not None else None
    if evaluate is not None and eval_at_start and start_step == 0:   # the starting point, before any update
        with tqdm.external_write_mode():
            eval_record = {"step": 0, **evaluate(accelerator.unwrap_model(model))}
        result.eval_history.append(eval_record)
        logger.log(eval_record, split="eval")
    model.train()
    step = start_step
    try:
        with neftune(accelerator.unwrap_model(model), cfg.neftune_alpha):
            for step in range(start_step, total_steps):
                t0 = time.time()
                micro = [to_device(b, device) for b in plan.batches(step)]
                totals, totals_t = _step_totals(algorithm, micro, device, accelerator, world)
                metrics: dict[str, torch.Tensor] = {}
                loss_total = torch.zeros((), device=device)
                for i, b in enumerate(micro):
                    if sharded:  # reduce-scatter the summed gradients once, after the step's last micro-batch
                        model.set_requires_gradient_sync(i == len(micro) - 1)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
                        # the loss is this micro-batch's share of the step's global normalizer
                        if zero_stage:
                            loss, m = zero.backward_loss(ds, lambda mdl, b=b: algorithm.loss(mdl, b, totals_t), world)
                        else:
                            loss, m = algorithm.loss(model, b, totals_t)
                            accelerator.backward(loss)
                    loss_total += loss.detach()
                    for k, v in m.items():
                        metrics[k] = metrics.get(k, 0) + v.detach()
                if world > 1:
                    if not (sharded or zero_stage):  # (FSDP2 / DeepSpeed have summed them in the backward pass)
                        _sum_gradients(params, accelerator)
                    loss_total = accelerator.reduce(loss_total, reduction="sum")
                    # metrics are sums over micro-batches: sum them over processes too
                    metrics = {k: accelerator.reduce(torch.as_tensor(v, device=device, dtype=torch.float32),
                                                     reduction="sum") for k, v in sorted(metrics.items())}
                if zero_stage:  # DeepSpeed clips, steps, and skips the update itself when the norm is not finite
                    ds.step()
                    grad_norm = torch.tensor(float(ds.get_global_grad_norm()))  # (the pre-clip norm)
                elif sharded:  # the norm over all shards
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                else:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)  # unscales fp16 grads first
                lr = scheduler.get_last_lr()[0]
                finite = bool(torch.isfinite(loss_total)) and bool(torch.isfinite(grad_norm))
                if finite:
                    if not zero_stage:  # (DeepSpeed has stepped)
                        optimizer.step()
                else:
                    skipped += 1
                    with tqdm.external_write_mode():
                        log(f"warning: step {step + 1}: non-finite loss ({loss_total.item():.4g}) or gradient norm "
                            f"({grad_norm.item():.4g}); update skipped ({skipped} so far)")
                    if skipped > cfg.max_bad_steps:
                        raise TrainingError(
                            f"{skipped} optimizer steps had a non-finite loss or gradient (limit "
                            f"train.max_bad_steps={cfg.max_bad_steps}); stopping. No checkpoint with NaN weights "
                            "was written.",
                            fix="lower train.lr, check the data for empty or corrupt examples, or use fp32.",
                        )
                with warnings.catch_warnings():
                    # a skipped first update makes torch warn that the schedule stepped before the optimizer
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    scheduler.step()
                if not zero_stage:  # (DeepSpeed has cleared its gradients in step())
                    optimizer.zero_grad(set_to_none=True)
                # the step's counts over all processes (totals holds this process's share)
                totals = {k: int(v) for k, v in totals_t.items()}
                n_tok = int(totals.get("tokens", 0))
                tokens_seen += n_tok
                dt = time.time() - t0
                record = {
                    "step": step + 1,
                    "loss": float(loss_total),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "skipped_steps": skipped,
                    "loss_tokens": n_tok,
                    "input_tokens": int(totals.get("input_tokens", 0)),
                    "step_seconds": dt,
                    "elapsed_seconds": time.time() - t_start,
                }
                record.update({k: float(v) for k, v in metrics.items()})
                with tqdm.external_write_mode():  # callbacks may print; keep the bar intact
                    for callback in callbacks:
                        callback(record)
                result.history.append(record)
                result.steps = step + 1
                result.skipped_steps = skipped
                if cfg.log_every and ((step + 1) % cfg.log_every == 0 or step + 1 == total_steps):
                    logger.log(record, split="train")
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", gnorm=f"{record['grad_norm']:.2f}")
                bar.update(1)
                last = step + 1 == total_steps
                if evaluate is not None and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
                    eval_metrics = evaluate(accelerator.unwrap_model(model))
                    model.train()
                    eval_record = {"step": step + 1, **eval_metrics}
                    result.eval_history.append(eval_record)
                    logger.log(eval_record, split="eval")
                if ((accelerator.is_main_process or sharded or zero_stage) and not last and cfg.save_every
                        and (step + 1) % cfg.save_every == 0):
                    with tqdm.external_write_mode():
                        checkpoint(step + 1)
                    last_saved = step + 1
        bar.close()
        result.seconds = time.time() - t_start

        # a run is a success only if its model still computes a finite loss and most updates happened
        unwrapped = accelerator.unwrap_model(model)
        latest = _latest_checkpoint(ckpt_dir)
        keep_note = (f"The latest complete checkpoint, {latest}, is kept." if latest is not None
                     else "No checkpoint was written.")
        if skipped * 2 > total_steps:
            raise TrainingError(
                f"{skipped} of {total_steps} optimizer steps were skipped because the loss or the gradient was "
                "not finite, so the run did not train as configured; final/ was not written. " + keep_note,
                fix="lower train.lr, use model.dtype=float32 (optionally with train.mixed_precision=bf16), and "
                "check the data.",
            )
        probe = probe_loss(model, algorithm, plan, device, accelerator, world)
        if not math.isfinite(probe):
            raise TrainingError(
                f"The trained model gives a non-finite loss ({probe}) on a probe batch (the first step's data): "
                "training diverged, so the run does not end as a success and final/ was not written. " + keep_note,
                fix="lower train.lr, use model.dtype=float32 (optionally with train.mixed_precision=bf16), keep "
                "gradient clipping on (train.max_grad_norm), and check the data.",
            )
        whole = whole_model() if (sharded or zero_stage) else unwrapped  # (every process gathers; rank 0 gets it)
        if last_saved != total_steps and (accelerator.is_main_process or sharded or zero_stage):
            checkpoint(total_steps, gathered=(whole,))
        if accelerator.is_main_process:
            final = out / "final"
            save_pretrained_atomic(whole, tokenizer, final)
            result.final_dir = final
        if world > 1:  # every process returns once final/ is complete (a caller may read it next)
            accelerator.wait_for_everyone()
            result.final_dir = out / "final"
    except KeyboardInterrupt:  # also while the final checkpoint or final/ is written
        latest = _latest_checkpoint(ckpt_dir)
        raise RunInterrupted(step=result.steps, total_steps=total_steps, output_dir=out, checkpoint=latest) from None
    finally:
        bar.close()
        logger.close()
    return result
