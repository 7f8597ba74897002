"""LoRA adapters through ``peft`` for every method, and the adapter-disabled reference.

``model.peft.method=lora`` wraps the loaded model with ``peft.get_peft_model``: only the adapter
weights train (and a reward model's ``score`` head), checkpoints and ``final/`` hold the adapter
in peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained``). Reading such a directory (merging it into a full Hugging Face
model for ``posttrain export``, or starting a run from it) is :mod:`posttrain.models.loading`'s
part: :func:`~posttrain.models.loading.merge_adapter_dir`.

**The reference is the same model with the adapter disabled** (:class:`AdapterDisabled`): DPO's
and online RL's reference log-probs run through the policy's own weights under
``disable_adapter()``, so no second copy of the model is held in memory.

The log-prob, reward and generation code reads models through :func:`hf_model`, which yields
the underlying transformers model (with the LoRA layers inside it) and, for the reference view,
disables the adapter for the duration.
"""

from __future__ import annotations

import contextlib

import torch

from ..config import PeftConfig
from ..errors import CheckpointError, ConfigError
from .loading import portable_base, quiet_peft, require_peft
# the adapter-directory helpers live in models.loading (no import cycle); importable from here as before
from .loading import (  # noqa: F401
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_base,
    adapter_task,
    find_adapter_base,
    is_adapter_dir,
    merge_adapter_dir,
)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _logical_numel(p) -> int:
    """Parameters a tensor stands for: a 4-bit tensor packs two weights per byte (its quant_state
    knows the unpacked shape)."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


def apply_peft(model, cfg: PeftConfig, *, task: str = "CAUSAL_LM", log=None):
    """``model`` wrapped with a fresh LoRA adapter (``task``: CAUSAL_LM, or SEQ_CLS for a reward model
    whose ``score`` head then trains in full), or ``model`` unchanged when ``cfg.method`` is none."""
    if not cfg.enabled:
        return model
    require_peft()
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules
    target = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    init = True if cfg.init == "default" else cfg.init
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target,
                      use_rslora=cfg.rslora, use_dora=cfg.dora, init_lora_weights=init, task_type=task,
                      bias="none")
    if getattr(model, "is_loaded_in_4bit", False):  # QLoRA: norms / embeddings in fp32, base frozen
        from peft import prepare_model_for_kbit_training

        with quiet_peft():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        with quiet_peft():
            wrapped = get_peft_model(model, lora)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.peft: peft cannot add LoRA to {type(model).__name__}: {e}",
                          fix="set model.peft.target_modules to module names the model has (e.g. [q_proj,v_proj]) "
                          "or to [all-linear].") from None
    for adapter_cfg in wrapped.peft_config.values():  # what adapter_config.json will name as the base
        adapter_cfg.base_model_name_or_path = portable_base(adapter_cfg.base_model_name_or_path)
    if log is not None:
        n_train = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        n_all = sum(_logical_numel(p) for p in wrapped.parameters())
        log(f"LoRA r={cfg.r} alpha={cfg.alpha}{' rslora' if cfg.rslora else ''}{' dora' if cfg.dora else ''} on "
            f"{target if isinstance(target, str) else ','.join(target)}: {n_train:,} trainable of {n_all:,} "
            f"parameters ({100 * n_train / max(1, n_all):.2f}%)")
    return wrapped


class AdapterDisabled:
    """The reference policy of a LoRA run: the policy itself with its adapter switched off.

    Holds no weights of its own. The log-prob path enters :func:`hf_model`, which disables the
    adapter around the forward pass (always under ``torch.no_grad`` for a reference)."""

    def __init__(self, peft_model):
        self.peft = peft_model

    @property
    def config(self):
        return self.peft.config

    @property
    def training(self) -> bool:
        return self.peft.training

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def parameters(self):
        return iter(())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The base weights the reference computes with (adapter tensors excluded), e.g. for
        :func:`posttrain.train.checkpoint.weights_digest`."""
        return {k: v for k, v in self.peft.get_base_model().state_dict().items() if "lora_" not in k}


@contextlib.contextmanager
def hf_model(model):
    """Yield the transformers model to run: ``model`` itself, the model inside a ``PeftModel``
    (its LoRA layers active), or, for :class:`AdapterDisabled`, that model with the adapter
    disabled while the block runs (and in eval mode, so adapter dropout is off)."""
    if isinstance(model, AdapterDisabled):
        peft_model = model.peft
        was = peft_model.training
        peft_model.eval()
        try:
            with peft_model.disable_adapter():
                yield peft_model.get_base_model()
        finally:
            peft_model.train(was)
    elif is_peft(model):
        yield model.get_base_model()
    else:
        yield model


def base_model_of(model):
    """The transformers model inside ``model`` (for code that only reads, e.g. generation)."""
    if isinstance(model, AdapterDisabled):
        raise TypeError("use hf_model() to run the adapter-disabled reference")
    return model.get_base_model() if is_peft(model) else model


def load_adapter_state(model, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """Load a checkpoint's adapter tensors (peft's saved names) into a ``PeftModel``; every adapter
    tensor of the model must be present and nothing else may be."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state_dict)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if k in trainable]
    if unexpected or missing:
        raise CheckpointError(f"Checkpoint '{where}' does not match the adapter: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}.", fix="resume with the model.peft settings that wrote it.")
