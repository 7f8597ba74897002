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

import torch

from ..errors import ConfigError

SHARDING = ("none", "fsdp2")


def sharding_from_launcher(configured: str) -> str:
    """The sharding to use: ``train.sharding``, or ``fsdp2`` when ``accelerate launch`` was given
    an FSDP2 configuration (its ``ACCELERATE_USE_FSDP`` / ``FSDP_VERSION`` variables). FSDP1 and
    DeepSpeed configurations are refused with the fix."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError(
            "The accelerate configuration asks for DeepSpeed, which posttrain does not support: its engine owns the "
            "backward pass and the optimizer step, which posttrain's engine runs itself.",
            fix="use FSDP2 instead (configs/accelerate/fsdp2.yaml; fsdp2_grad_op.yaml is the ZeRO-2-like variant), "
            "or launch without DeepSpeed.")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ConfigError(
                f"The accelerate configuration asks for FSDP version {version}; posttrain shards with FSDP2 only.",
                fix="set fsdp_version: 2 in the accelerate config's fsdp_config (see configs/accelerate/fsdp2.yaml).")
        return "fsdp2"
    return configured


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
    if not full:
        return None
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
