"""Loading policy / reference models and tokenizers.

``builtin:tiny-world-base`` names the tiny world's shipped base model (inside the package, so
nothing is downloaded); anything else is a local Hugging Face directory or a hub id (hub ids
need network access, which our CI machines do not have).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, TokenizerError

BUILTIN_PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent.parent / "world" / "assets"
BUILTIN_MODELS = {"tiny-world-base": ASSETS / "tiny-world-base"}


def resolve_model_path(name_or_path: str) -> str:
    """Map ``builtin:<name>`` to the shipped directory; pass other names through."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            raise ConfigError(
                f"Unknown built-in model '{name_or_path}'; built-in models are "
                f"{', '.join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)}.",
                fix="use one of those or a path to a Hugging Face model directory.",
            )
        path = BUILTIN_MODELS[name]
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"The built-in model files are missing from {path}.",
                fix="reinstall posttrain, or rebuild them with `python -m posttrain.world.build --out "
                f"{path}`.",
            )
        return str(path)
    return name_or_path


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32: trainable weights stay fp32 (AdamW master weights); on a GPU set
    ``train.mixed_precision=bf16`` for bf16 compute. (On CPUs bf16 matmuls are ~100x slower.)"""
    if dtype == "auto":
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ConfigError(f"Config key 'model.dtype' has value {dtype!r}; valid values are auto, "
                          f"{', '.join(table)}.", fix="pick one of those.")
    return table[dtype]


def load_tokenizer(name_or_path: str, *, pad_token: str | None = None, chat_template: str | None = None):
    """Load a tokenizer; optionally set its pad token and chat template (a file path or a Jinja string)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TokenizerError(
            f"Could not load a tokenizer from '{name_or_path}': {str(e).splitlines()[0]}",
            fix="pass a local Hugging Face model/tokenizer directory (or builtin:tiny-world-base).",
        ) from None
    if pad_token is not None:
        if pad_token not in tok.get_vocab():
            raise TokenizerError(
                f"Config key 'model.pad_token' names '{pad_token}', which is not in the vocabulary "
                f"of '{name_or_path}'.",
                fix="use a token that exists, for example the EOS token "
                f"{tok.eos_token!r}.",
            )
        tok.pad_token = pad_token
    if chat_template is not None:
        p = Path(chat_template)
        tok.chat_template = p.read_text() if p.is_file() else chat_template
    return tok


def load_causal_lm(name_or_path: str, *, dtype: str = "auto", device: str = "auto",
                   attn_implementation: str | None = "sdpa"):
    """Load an ``AutoModelForCausalLM`` on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    path = resolve_model_path(name_or_path)
    kwargs = {"dtype": pick_dtype(dtype, dev)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"Could not load a causal LM from '{name_or_path}': {str(e).splitlines()[0]}",
            fix="pass a Hugging Face model directory with config.json and weights "
            "(or builtin:tiny-world-base).",
        ) from None
    return model.to(dev)


def tokenizer_for(model_cfg):
    """The tokenizer a ``model`` config section names (its ``tokenizer`` or ``name_or_path``),
    with the section's pad token and chat template applied."""
    return load_tokenizer(model_cfg.tokenizer or model_cfg.name_or_path, pad_token=model_cfg.pad_token,
                          chat_template=model_cfg.chat_template)


def accelerator_for(model_cfg):
    """An ``accelerate.Accelerator`` on the CPU unless a GPU is present and not declined.

    Precision is not set here: the engine does its own autocast, because accelerate's state is
    process-global and refuses a second Accelerator with other settings in one process.
    """
    from accelerate import Accelerator

    return Accelerator(cpu=model_cfg.device == "cpu" or not torch.cuda.is_available())
