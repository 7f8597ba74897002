"""LoRA adapters through ``peft`` for every method, the adapter-disabled reference, and merging.

``model.peft.method=lora`` wraps the loaded model with ``peft.get_peft_model``: only the adapter
weights train (and a reward model's ``score`` head), checkpoints and ``final/`` hold the adapter
in peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained``), and :func:`merge_adapter_dir` turns such a directory into a
full Hugging Face model (``posttrain export``).

**The reference is the same model with the adapter disabled** (:class:`AdapterDisabled`): DPO's
and online RL's reference log-probs run through the policy's own weights under
``disable_adapter()``, so no second copy of the model is held in memory.

The log-prob, reward and generation code reads models through :func:`hf_model`, which yields
the underlying transformers model (with the LoRA layers inside it) and, for the reference view,
disables the adapter for the duration.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch

from ..config import PeftConfig
from ..errors import CheckpointError, ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@contextlib.contextmanager
def _quiet():
    """peft reads a transformers property that warns of its own rename on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
        yield


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError("model.peft.method=lora needs the peft package, which is not installed.",
                          fix="pip install 'peft>=0.13' (it is a dependency of posttrain; reinstall with pip install -e .)."
                          ) from None


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
    _require_peft()
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules
    target = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    init = True if cfg.init == "default" else cfg.init
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target,
                      use_rslora=cfg.rslora, use_dora=cfg.dora, init_lora_weights=init, task_type=task,
                      bias="none")
    if getattr(model, "is_loaded_in_4bit", False):  # QLoRA: norms / embeddings in fp32, base frozen
        from peft import prepare_model_for_kbit_training

        with _quiet():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        with _quiet():
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


def portable_base(name_or_path: str | None) -> str | None:
    """The base model as ``adapter_config.json`` records it (``base_model_name_or_path``): a local
    directory as an absolute path, so the adapter exports and loads from any working directory;
    the built-in model as its ``builtin:`` name (its files live inside the installed package); a
    hub id, or anything that is not a local directory, as it is."""
    from .loading import BUILTIN_MODELS, BUILTIN_PREFIX

    if not name_or_path or str(name_or_path).startswith(BUILTIN_PREFIX):
        return name_or_path
    path = Path(str(name_or_path)).expanduser()
    if not path.is_dir():
        return name_or_path
    absolute = Path(os.path.abspath(path))  # symbolic links on the way are kept, not resolved
    for builtin, where in BUILTIN_MODELS.items():
        if where.is_dir() and absolute.resolve() == where.resolve():
            return BUILTIN_PREFIX + builtin
    return str(absolute)


def find_adapter_base(adapter_dir, *, base_option: str | None = "--base", key: str = "adapter") -> str:
    """The base model an adapter directory names, checked to exist before anything loads.

    When it cannot be found (moved or deleted, or a relative path written by an older posttrain
    and read from another working directory) the error says so, and how to fix it: with
    ``base_option`` (``posttrain export``'s ``--base``), or else by exporting first (``key`` is
    the setting that named the adapter, e.g. ``model.name_or_path``)."""
    from .loading import BUILTIN_PREFIX, locate

    name = adapter_base(adapter_dir)
    if name.startswith(BUILTIN_PREFIX):
        locate(name, key="base_model_name_or_path")  # an unknown builtin: that message is the clearest
        return name
    try:
        locate(name, key="base_model_name_or_path")
    except ConfigError:
        path = Path(name).expanduser()
        if path.is_absolute():
            why = ("there is no such directory any more: the base model was moved or deleted after the adapter "
                   "was trained")
        else:
            why = (f"it is not a directory under the working directory ('{os.getcwd()}'), nor a model this machine "
                   "can fetch from the Hugging Face Hub or find in its cache. A relative path is read from the "
                   "working directory: this adapter was saved with the path as typed (posttrain now records "
                   "absolute paths), so it only resolves from the directory its run was started in; or the base "
                   "model was moved or deleted")
        there = f"put the base model back at '{name}'"
        if not path.is_absolute():
            there += " (or run the command from the directory the adapter was trained in)"
        export = f"posttrain export {adapter_dir} --base <base model directory> --output <merged directory>"
        fix = (f"pass the base model's current location with {base_option}: {export}; or {there}."
               if base_option else
               f"merge the adapter into its base model at its current location first ({export}) and set {key} to "
               f"the merged directory; or {there}.")
        raise CheckpointError(
            f"The LoRA adapter '{adapter_dir}' names its base model '{name}' (base_model_name_or_path in its "
            f"{ADAPTER_CONFIG}), which cannot be found: {why}.", fix=fix) from None
    return name


def adapter_base(directory: Path) -> str:
    """The base model an adapter directory names (``base_model_name_or_path`` in its config)."""
    try:
        cfg = json.loads((Path(directory) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot read {Path(directory) / ADAPTER_CONFIG}: {e}.",
                              fix="pass a directory written by a posttrain LoRA run (or peft's save_pretrained).") from None
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not base:
        raise CheckpointError(f"{Path(directory) / ADAPTER_CONFIG} does not name its base model "
                              "(base_model_name_or_path).", fix="pass the base model explicitly (--base).")
    return str(base)


def is_adapter_dir(path) -> bool:
    p = Path(str(path))
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def adapter_task(directory) -> str:
    try:
        cfg = json.loads((Path(directory) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "CAUSAL_LM"
    return str(cfg.get("task_type") or "CAUSAL_LM") if isinstance(cfg, dict) else "CAUSAL_LM"


def merge_adapter_dir(adapter_dir, *, base: str | None = None, dtype: str = "auto", device: str = "cpu",
                      attn_implementation: str | None = "sdpa", key: str = "adapter",
                      base_option: str | None = "--base"):
    """Load ``base`` (default: the adapter's own base model) and the adapter, and merge it into the
    weights (peft's ``merge_and_unload``): a plain transformers model (a causal LM, or a sequence
    classifier for a reward model's adapter, ``task_type`` SEQ_CLS).

    ``base_option`` is the caller's option for passing ``base`` (``posttrain export --base``), named
    in the fix when the adapter's own base is missing or does not fit; None where there is none
    (a run started from an adapter directory named by ``key``)."""
    from .loading import load_adapter_into, load_causal_lm, load_sequence_classifier

    explicit = base is not None
    base = base if explicit else find_adapter_base(adapter_dir, base_option=base_option, key=key)
    base_key = base_option if explicit and base_option else "base_model_name_or_path"
    if adapter_task(adapter_dir) == "SEQ_CLS":
        model = load_sequence_classifier(base, num_labels=1, dtype=dtype, device=device,
                                         attn_implementation=attn_implementation, key=base_key)
    else:
        model = load_causal_lm(base, dtype=dtype, device=device, attn_implementation=attn_implementation,
                               key=base_key)
    return load_adapter_into(model, adapter_dir, key=key, base=base, base_option=base_option,
                             explicit_base=explicit).merge_and_unload()
