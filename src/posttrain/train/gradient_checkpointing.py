"""Gradient (activation) checkpointing of the trained model: ``train.gradient_checkpointing``.

Without it, the forward pass keeps every decoder layer's intermediate tensors (norms, q/k/v,
attention output, the MLP's gate / up / product: ``9h + 3kv + 4i`` elements per token and layer
for a Llama-style layer) until the backward pass needs them. With it, each decoder layer keeps
only its input (``h`` per token) and recomputes its own forward pass when the backward pass
reaches it, so at any time the activations of one layer are alive instead of all of them:
activation memory ~ ``layers x h + (9h + 3kv + 4i)`` per token instead of ``layers x (9h + 3kv +
4i)``, for one more forward pass of the layers per step (~30% more compute).

It is transformers' own per-layer checkpointing (``GradientCheckpointingLayer``) with torch's
non-reentrant ``torch.utils.checkpoint`` (``use_reentrant=False``), which

* recomputes the same operations in the same order on the same inputs (the RNG state is saved and
  restored, so dropout draws the same masks): losses and gradients equal the run without it;
* needs no input that requires a gradient, so a frozen base under a LoRA adapter trains without
  transformers' ``enable_input_require_grads`` hook (which is removed again);
* only acts when a layer is in training mode *and* gradients are enabled: sampling (posttrain's
  sampler and ``generate`` run in eval mode under ``no_grad``, with the KV cache), evaluation,
  reference and old log-probs run exactly as without it;
* checkpoints a layer's ``forward``, not its ``__call__``, so FSDP2's and DeepSpeed ZeRO-3's
  module hooks (which gather the sharded weights) stay outside the recomputation.

Every Hugging Face model inside the trained module is switched on: the policy or reward model,
a peft model's base model (the adapter layers sit inside the decoder layers), and a PPO critic
trained beside the policy.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError


def hf_models(model: torch.nn.Module) -> list:
    """The outermost ``transformers.PreTrainedModel`` modules inside ``model`` (``model`` itself
    when it is one; a peft model's base model; a PPO policy and its critic)."""
    from transformers import PreTrainedModel

    outer: list[str] = []
    found = []
    for name, module in model.named_modules():  # (pre-order: a parent comes before its children)
        if isinstance(module, PreTrainedModel) and not any(o == "" or name.startswith(o + ".") for o in outer):
            outer.append(name)
            found.append(module)
    return found


def checkpointed_layers(model: torch.nn.Module) -> int:
    """How many layers of ``model`` recompute their forward pass in the backward pass."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(1 for m in model.modules()
               if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False))


def _enable(hf) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # (transformers' newer name; the old one warns)
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers adds a hook that makes the embeddings' output require a gradient (for reentrant
    # checkpointing under a frozen base); non-reentrant checkpointing does not need it
    if hasattr(hf, "disable_input_require_grads"):
        hf.disable_input_require_grads()


def _disable(hf) -> None:
    if hasattr(hf, "activation_checkpointing_disable"):
        hf.activation_checkpointing_disable()
    else:
        hf.gradient_checkpointing_disable()


@contextlib.contextmanager
def gradient_checkpointing(model: torch.nn.Module, enabled: bool, *, log=None):
    """Turn checkpointing on for the Hugging Face models inside ``model`` for the duration (and off
    again afterwards for those it turned on). Refuses a model transformers cannot checkpoint."""
    if not enabled:
        yield 0
        return
    models = hf_models(model)
    before = checkpointed_layers(model)
    turned_on = []
    for hf in models:
        if not getattr(hf, "supports_gradient_checkpointing", False):
            raise ConfigError(f"train.gradient_checkpointing=true, but transformers cannot checkpoint "
                              f"{type(hf).__name__} (its supports_gradient_checkpointing is false).",
                              fix="set train.gradient_checkpointing=false, or use a model whose transformers class "
                              "supports gradient checkpointing (Llama, Qwen2, Mistral, Gemma, ...).")
        if checkpointed_layers(hf) == 0:
            _enable(hf)
            turned_on.append(hf)
    layers = checkpointed_layers(model)
    if not models or layers == 0:
        for hf in turned_on:
            _disable(hf)
        raise ConfigError(f"train.gradient_checkpointing=true, but {type(model).__name__} has no decoder layers "
                          "that transformers can checkpoint.", fix="set train.gradient_checkpointing=false.")
    if log is not None and layers > before:
        log(f"gradient checkpointing: {layers} decoder layers recompute their forward pass in the backward pass")
    try:
        yield layers
    finally:
        for hf in turned_on:
            _disable(hf)
