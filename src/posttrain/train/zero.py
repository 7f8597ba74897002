"""DeepSpeed ZeRO stage 2 / 3 (``train.sharding=zero2`` / ``zero3``).

posttrain's engine keeps its own loop (global-count loss normalization, its schedule, its
checkpoints) and hands DeepSpeed only what DeepSpeed is for: partitioning the optimizer state
and gradients (ZeRO-2) and the parameters too (ZeRO-3) across the processes, reducing the
gradients, clipping them and stepping the optimizer on the partitions.

* The model is wrapped in :class:`LossModule`, whose forward runs the algorithm's loss on the
  model: every forward of a step goes through DeepSpeed's ``engine(...)`` and every backward
  through ``engine.backward(...)`` (public API only), however the algorithm calls the model
  (whole, or backbone then head).
* Accumulation is the caller's: ``managed_gradient_accumulation=false``, so each
  ``backward`` only accumulates and ``engine.step()`` is the step's boundary, for any number
  of micro-batches.
* DeepSpeed averages gradients over the processes; posttrain's losses are already divided by
  the step's global counts, so the loss is multiplied by the world size before the backward
  (the reduced gradient is then the sum, as in posttrain's own data parallel).
* Clipping (``gradient_clipping`` = ``train.max_grad_norm``) and the pre-clip norm
  (``get_global_grad_norm``) are DeepSpeed's; a non-finite norm makes it skip the update.
* The optimizer is posttrain's AdamW (DeepSpeed runs it on the fp32 partitions); the learning
  rate schedule stays posttrain's, over the same parameter groups.
* Checkpoints are unsharded, as with FSDP2: the whole weights (gathered under ZeRO-3) and the
  whole AdamW state, keyed like an unsharded run's, so a run resumes with or without ZeRO and
  with another number of processes.

DeepSpeed runs on CPUs with its CPU accelerator over gloo (no compiled ops), which is how the
test suite runs it; on GPUs the same code runs over nccl.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch

from ..errors import ConfigError

ZERO_STAGES = {"zero2": 2, "zero3": 3}


class LossModule(torch.nn.Module):
    """What DeepSpeed wraps: ``forward(fn)`` returns ``fn(model)``, so the algorithm's whole loss
    computation (however it calls the model) runs inside DeepSpeed's forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


def quiet_deepspeed_import() -> None:
    """On a machine without CUDA, tell DeepSpeed its accelerator is the CPU, so that importing it
    does not log that it had to guess ("Setting accelerator to CPU ...")."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def import_deepspeed():
    quiet_deepspeed_import()
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("train.sharding=zero2/zero3 needs DeepSpeed, which is not installed.",
                          fix="pip install 'posttrain[deepspeed]' (or use train.sharding=fsdp2).") from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls collectives torch 2.13 has renamed: one FutureWarning per call and process
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=f"`torch.distributed.{name}` is deprecated", category=FutureWarning)
    if not torch.cuda.is_available():
        # DeepSpeed's CPU communication backend compiles a shared-memory all-reduce for inference
        # the first time it starts (~40 s of g++); training uses gloo's collectives, so skip it
        import deepspeed.comm.torch  # noqa: F401

        # (deepspeed.comm's attribute "torch" is torch itself: take the submodule by its name)
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def deepspeed_config(stage: int, *, max_grad_norm: float, weight_dtype: torch.dtype,
                     hidden_size: int | None = None) -> dict:
    """The DeepSpeed configuration posttrain runs: batch sizes and accumulation are placeholders
    (posttrain's plan makes the micro-batches and ``step()`` ends each step). Communication
    buckets are sized by the model's hidden size h (h^2 elements; ZeRO-3 prefetches 0.9 h^2 and keeps
    parameters under 10 h whole), the sizes transformers' DeepSpeed integration fills in for "auto",
    instead of DeepSpeed's fixed 5e8-element buckets that a small model's gradients fill entirely."""
    if weight_dtype == torch.float16:
        raise ConfigError("train.sharding=zero2/zero3 with float16 weights needs loss scaling, which posttrain does "
                          "not do.", fix="load the model in bfloat16 or float32 (model.dtype).")
    buckets = {}
    if hidden_size:
        buckets = {"reduce_bucket_size": hidden_size * hidden_size}
        buckets.update({"stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                        "stage3_param_persistence_threshold": 10 * hidden_size} if stage == 3 else
                       {"allgather_bucket_size": hidden_size * hidden_size})
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(max_grad_norm),
        "zero_allow_untested_optimizer": True,   # posttrain's torch AdamW
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": weight_dtype == torch.bfloat16},  # bf16 weights: fp32 master partitions
        "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True, **buckets},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, stage: int, *, max_grad_norm: float):
    """The DeepSpeed engine over ``LossModule(model)``; ``optimizer`` keeps its parameter groups
    (now over the partitions), so a schedule over it keeps working. Collective."""
    deepspeed = import_deepspeed()
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    config = deepspeed_config(stage, max_grad_norm=max_grad_norm, weight_dtype=dtype,
                              hidden_size=hidden if isinstance(hidden, int) else None)
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=LossModule(model), optimizer=optimizer, config=config,
                                                        dist_init_required=False)
    if getattr(zero_optimizer, "optimizer", None) is not optimizer:
        raise RuntimeError("DeepSpeed did not keep posttrain's optimizer as the one it steps")
    return engine


def backward_loss(engine, compute, world: int):
    """One micro-batch: ``compute(model) -> (loss, metrics)`` runs inside the engine's forward;
    the backward accumulates the loss's gradient (times ``world``: DeepSpeed averages)."""
    loss, metrics = engine(compute)
    engine.backward(loss * world, scale_wrt_gas=False)
    return loss, metrics


def _named_trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.model.named_parameters() if p.requires_grad]


def group_names(model, optimizer) -> list[list[str]]:
    """The parameter names of each optimizer group (before DeepSpeed replaces them by partitions)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def full_optimizer_state(engine, names_by_group: list[list[str]]) -> dict | None:
    """The whole AdamW state in ``optimizer.state_dict()``'s unsharded layout (parameters numbered
    in group order), on rank 0 (None elsewhere). Collective."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = engine.optimizer.optimizer
    step = next(s["step"] for s in base.state.values())  # (made by init_optimizer_state)
    full = {name: {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
            for name, p in _named_trainable(engine)}
    if torch.distributed.get_rank() != 0:
        return None
    state, groups, index = {}, [], 0
    for g, names in zip(base.param_groups, names_by_group):
        ids = []
        for name in names:
            if name in full:
                state[index] = {"step": step.detach().clone().cpu(),
                                **{k: v.detach().cpu().clone() for k, v in full[name].items()}}
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def init_optimizer_state(engine, named_state: dict[str, dict] | None = None) -> None:
    """Make AdamW's state over the partitions now, as its first step would (step 0, zero moments),
    and fill it from a whole AdamW state (``{param name: {"step", "exp_avg", "exp_avg_sq"}}``, from
    an unsharded checkpoint) when resuming. Collective.

    Made up front because DeepSpeed (0.19) maps each parameter to its slice of the state after the
    first optimizer group has stepped, before the others have any state: without this, the state
    of the later groups (the parameters without weight decay) could not be read for checkpoints."""
    from deepspeed.utils import safe_set_full_optimizer_state

    named_state = named_state or {}
    steps = {float(s["step"]) for s in named_state.values()}
    if len(steps) > 1:  # (a partition is stepped as a whole)
        raise ConfigError("The checkpoint's optimizer state has parameters at different step counts, which a ZeRO "
                          "partition cannot hold.", fix="resume this run with train.sharding=none or fsdp2.")
    step = steps.pop() if steps else 0.0
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32  # (as AdamW makes it)
    zero, base = engine.optimizer, engine.optimizer.optimizer
    # the flat fp32 partitions AdamW steps (ZeRO-3 puts each in its group only while stepping it)
    flat = getattr(zero, "fp32_partitioned_groups_flat", None) or [p for g in base.param_groups for p in g["params"]]
    for p in flat:
        base.state[p] = {"step": torch.tensor(step, dtype=scalar),
                         "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                         "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: map each parameter to its slice
        zero._lazy_init_hp_params_optimizer_state()
    for name, p in _named_trainable(engine):
        if name in named_state:
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, named_state[name][key].float(), key)


def gathered_state_dict(engine) -> dict:
    """ZeRO-3: the whole model state on rank 0 (empty elsewhere), gathered one module at a time.
    Collective. (ZeRO-2 keeps whole weights on every process: the model itself is the state.)"""
    state = engine._zero3_consolidated_16bit_state_dict()  # (in the weights' own dtype, despite the name)
    return {k.removeprefix("model."): v for k, v in (state or {}).items()}
