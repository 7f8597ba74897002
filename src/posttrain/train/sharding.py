"""Sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``).

With ``train.sharding=fsdp2`` under N processes, each decoder layer of the model is one FSDP
unit, the rest of the backbone (embeddings, final norm) and the output head (``lm_head`` /
``score``) one each (both in the root unit when the embeddings are tied to the head): every process keeps 1/N of
each parameter, of its gradient and of the optimizer state; a unit's full parameters are
gathered just before its forward (and again for the backward) and freed after
(``train.fsdp_reshard_after_forward=true``, ZeRO-3-like; ``false`` keeps them from the
forward to the backward, ZeRO-2-like). Gradients are reduce-scattered as **sums** (the loss is
already normalized by the step's global counts, exactly as in plain data parallel), so N
sharded processes with accumulation k train like one process with accumulation N*k.

Checkpoints stay in the unsharded format: the full weights and the full optimizer state
are gathered to rank 0 and written as a normal Hugging Face directory plus the trainer
state, byte-compatible with an unsharded run's. Resuming loads that full state into the
unsharded model and optimizer first and shards afterwards, so a sharded run can resume an
unsharded checkpoint and vice versa.

The same code runs on CPUs (gloo) and GPUs (nccl); accelerate's own FSDP plugin is not used
because it is ignored on CPU processes (it would silently train unsharded), and posttrain's
engine sums gradients itself instead of wrapping the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ConfigError


def sharding_from_launcher(configured: str, *, max_grad_norm: float | None = None) -> str:
    """The sharding to use: ``train.sharding``, or what ``accelerate launch`` was configured with:
    ``fsdp2`` for an FSDP2 configuration (its ``ACCELERATE_USE_FSDP`` / ``FSDP_VERSION`` variables),
    ``zero2`` / ``zero3`` for a DeepSpeed one (``ACCELERATE_USE_DEEPSPEED`` and its ZeRO stage).
    FSDP1, ZeRO stages 0/1 and DeepSpeed settings that posttrain does not run are refused with the fix."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return _deepspeed_from_launcher(max_grad_norm)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ConfigError(
                f"The accelerate configuration asks for FSDP version {version}; posttrain shards with FSDP2 only.",
                fix="set fsdp_version: 2 in the accelerate config's fsdp_config (see configs/accelerate/fsdp2.yaml).")
        return "fsdp2"
    return configured


def _deepspeed_from_launcher(max_grad_norm: float | None) -> str:
    """zero2 / zero3 from accelerate's DeepSpeed variables (and its DeepSpeed JSON file, if one is
    named); posttrain sets the rest of DeepSpeed's configuration from train.* itself."""
    import json

    def fail(what: str, fix: str):
        raise ConfigError(f"The accelerate configuration asks for DeepSpeed with {what}.", fix=fix)

    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    offload = {"offload_optimizer_device": os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"),
               "offload_param_device": os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")}
    if path.lower() != "none":
        try:
            ds = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"Cannot read the DeepSpeed configuration file '{path}' named by the accelerate config "
                              f"(deepspeed_config_file): {e}", fix="give a readable JSON file.") from None
        zero_opt = ds.get("zero_optimization") if isinstance(ds, dict) else None
        if not isinstance(zero_opt, dict) or "stage" not in zero_opt:
            fail(f"the file '{path}', which has no zero_optimization.stage",
                 "set zero_optimization.stage to 2 or 3 in it, or use configs/accelerate/deepspeed_zero3.yaml.")
        stage = str(zero_opt["stage"])
        for key in ("offload_optimizer", "offload_param"):
            block = zero_opt.get(key)
            offload[f"{key}_device"] = str(block.get("device", "none")) if isinstance(block, dict) else "none"
        owned = sorted(k for k in ("optimizer", "scheduler", "fp16") if k in ds and
                       not (k == "fp16" and not (ds[k] or {}).get("enabled", False)))
        if owned:
            fail(f"'{path}' setting {', '.join(owned)}",
                 "remove these blocks: posttrain runs its own AdamW and schedule (train.lr, train.warmup_ratio, ...) "
                 "and trains in fp32 or bf16 (model.dtype, train.mixed_precision).")
    if stage not in ("2", "3"):
        fail(f"ZeRO stage {stage}", "use zero_stage: 2 or 3 (configs/accelerate/deepspeed_zero2.yaml, "
             "deepspeed_zero3.yaml), or plain data parallel (configs/accelerate/ddp.yaml).")
    for key, device in offload.items():
        if device.lower() not in ("none", ""):
            fail(f"{key}: {device}", f"set {key}: none; posttrain does not offload to CPU or NVMe (to fit a larger "
                 "model use zero_stage: 3, model.peft, or see posttrain plan).")
    accumulation = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    if accumulation not in ("1", "none", "None"):
        fail(f"gradient_accumulation_steps: {accumulation}",
             f"remove it from the accelerate config (or set it to 1) and set train.grad_accum={accumulation}.")
    clipping = os.environ.get("ACCELERATE_GRADIENT_CLIPPING", "none")
    try:
        differs = clipping.lower() != "none" and max_grad_norm is not None and float(clipping) != float(max_grad_norm)
    except ValueError:
        differs = True  # (not a number: refused below with the value)
    if differs:
        fail(f"gradient_clipping: {clipping}, but train.max_grad_norm={max_grad_norm:g}",
             f"remove gradient_clipping from the accelerate config and set train.max_grad_norm={clipping}.")
    return f"zero{stage}"


def refuse_sharding(sharding: str, command: str) -> None:
    """For the commands that sample from the model between their training stages (rft, cai)."""
    if sharding != "none":
        raise ConfigError(f"train.sharding={sharding}: {command} samples from the model between its training stages, "
                          "which sharding does not support.",
                          fix="use train.sharding=none (data parallel), and model.peft to fit a large model.")


def reshard_from_launcher(configured: bool) -> bool:
    value = os.environ.get("FSDP_RESHARD_AFTER_FORWARD")
    if value is None:
        return configured
    return value.lower() in ("true", "1", "full_shard")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks (the classes in its ``_no_split_modules``, e.g. LlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    # (after sharding, fully_shard has swapped each layer's class for a subclass: look along the MRO)
    layers = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not layers:
        raise ConfigError(
            f"train.sharding=fsdp2 needs the model's decoder layer class to shard by, and {type(model).__name__} "
            "declares none (_no_split_modules).", fix="use train.sharding=none for this model.")
    return layers


def shard_model(model, *, reshard_after_forward: bool = True) -> None:
    """Shard ``model`` in place over the default process group: one FSDP unit per decoder layer,
    one for the rest. Gradients are summed over processes, not averaged."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    # The backbone and the output head (lm_head / score) are units of their own when they share no
    # weight, so code that runs the backbone and then the head by themselves (the fused log-prob
    # path, reward and process-reward heads) gathers each; tied embeddings keep both in the root.
    base = getattr(model, "base_model", None)
    heads = [m for m in model.children() if isinstance(m, torch.nn.Linear)]
    if base is not None and base is not model:
        base_ids = {id(p) for p in base.parameters()}
        if not any(id(p) in base_ids for h in heads for p in h.parameters()):
            fully_shard(base, reshard_after_forward=reshard_after_forward)
            for h in heads:
                fully_shard(h, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    for unit in model.modules():  # (per unit: these setters do not recurse)
        if isinstance(unit, FSDPModule):
            unit.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
            unit.set_gradient_divide_factor(1.0)


def full_optimizer_state(model, optimizer, *, everywhere: bool = False) -> dict:
    """The whole optimizer state keyed by parameter names (collective under sharding): on rank 0
    only, in CPU memory (for writing it), or ``everywhere`` as it lies (to load it into the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def by_index(named_state: dict) -> dict:
    """A name-keyed optimizer state (``full_optimizer_state``) in ``optimizer.state_dict()``'s
    own layout: parameters numbered in parameter-group order."""
    index, groups = {}, []
    for g in named_state["param_groups"]:
        ids = []
        for name in g["params"]:
            index[name] = len(index)
            ids.append(index[name])
        groups.append({**g, "params": ids})
    return {"state": {index[name]: s for name, s in named_state["state"].items()}, "param_groups": groups}


def gathered_copy(model):
    """An unsharded copy of a sharded ``model`` on rank 0 (``None`` elsewhere), for writing
    checkpoints and ``final/``. Collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unsharded_copy(model, full) if full else None


def unsharded_copy(model, full: dict):
    """A whole model of ``model``'s class holding the gathered state ``full`` (buffers that are not
    saved, e.g. rotary frequencies, taken from ``model``)."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard swapped the class
    with torch.device("meta"):
        copy = cls(model.config)
    copy.load_state_dict(full, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        copy.tie_weights()
    missing = [n for n, p in copy.named_parameters() if p.is_meta]
    if missing:  # a parameter the state dict did not cover would be written as garbage
        raise RuntimeError(f"gathered state lacks parameters {missing[:5]}")
    for name, buf in list(copy.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (e.g. rotary frequencies): take the live ones
            live = dict(model.named_buffers())[name]
            module_name, _, attr = name.rpartition(".")
            owner = copy.get_submodule(module_name) if module_name else copy
            owner.register_buffer(attr, live.detach().to("cpu").clone(), persistent=False)
    if getattr(model, "generation_config", None) is not None:  # (a reward model has none)
        copy.generation_config = model.generation_config
    return copy.eval()
