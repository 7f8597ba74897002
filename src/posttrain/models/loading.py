"""Loading policy / reference / reward models and tokenizers — without ever running foreign code.

``builtin:tiny-world-base`` names the tiny world's shipped base model (inside the package, so
nothing is downloaded); anything else is a local Hugging Face directory or a hub id. A LoRA
adapter directory (peft's format, as a ``model.peft.method=lora`` run writes it) is read here
too: :func:`merge_adapter_dir` merges it into its base model (``posttrain export``, and a run
that starts from an adapter).

Every model and tokenizer posttrain loads goes through this module, and three rules hold
for all of them (``docs/security.md``):

* **No repository code.** ``trust_remote_code=False`` is passed to every ``from_pretrained``,
  so transformers never asks ``[y/N]`` and never imports a directory's Python files. A
  directory whose ``config.json`` / ``tokenizer_config.json`` names custom code (``auto_map``)
  is loaded with transformers' own classes when its ``model_type`` / tokenizer class is one
  transformers knows (a note says so), and refused otherwise. There is no opt-in. The caller's
  attention implementation is set on the config, so a ``config.json`` naming its own (even a hub
  kernel, which transformers would download and run) is never used; chat templates render only
  with a Jinja2 whose sandbox has no known escape.
* **No pickle.** Weights load from safetensors only (``use_safetensors=True``); a directory
  holding only ``pytorch_model.bin`` / ``*.pt`` / ``*.ckpt`` weights is refused with the
  one-time conversion to run where the file is trusted; so is a weights index that lists a
  shard other than a safetensors file.
* **Fail fast offline.** A name that is not a local directory is a hub id only if it has the
  ``owner/name`` shape and ``owner`` is not a local folder; when the hub cannot be reached (or
  ``HF_HUB_OFFLINE=1``) it is looked up in the local cache only, and a miss is an immediate
  error instead of a minute of retries.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, TokenizerError, setting

BUILTIN_PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent.parent / "world" / "assets"
BUILTIN_MODELS = {"tiny-world-base": ASSETS / "tiny-world-base",
                  # the ~1M-parameter distillation student (same tokenizer), when it has been built
                  "tiny-world-student": ASSETS / "tiny-world-student"}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# owner/name (or a bare name) with the characters the hub allows; anything else is a path
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


@dataclass(frozen=True)
class Source:
    """Where a model or tokenizer comes from: ``path`` is a local directory or a hub id."""

    name: str                 # what the user wrote
    path: str
    local: bool
    cache_only: bool = False  # hub id while the hub is unreachable: the local cache only

    def kwargs(self) -> dict:
        """The ``from_pretrained`` keyword arguments every load passes."""
        kw: dict = {"trust_remote_code": False}
        if self.cache_only:
            kw["local_files_only"] = True
        return kw


def _hint_for_missing(name: str) -> str:
    if "quickstart" in name:
        return ("run `make quickstart` first (it writes runs/quickstart/sft/final), or set "
                "model.name_or_path to a model directory of yours.")
    return "check the path (relative paths start from the working directory), or use builtin:tiny-world-base."


@functools.lru_cache(maxsize=4)
def hub_reachable(endpoint: str | None = None, timeout: float = 4.0) -> bool:
    """Whether the Hugging Face Hub answers an HTTP request within ``timeout`` seconds (cached).

    Any HTTP answer counts (even an error status); a DNS failure, a refused connection or a
    timeout does not. Proxies from the environment are honoured (urllib reads them)."""
    import urllib.error
    import urllib.request

    if endpoint is None:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _hub_offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str, filenames: tuple[str, ...]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    for name in filenames:
        try:
            hit = try_to_load_from_cache(repo_id, name)
        except Exception:  # an id the cache layout cannot represent
            return False
        if isinstance(hit, str):
            return True
    return False


def locate(name_or_path: str, *, key: str = "model.name_or_path", what: str = "model") -> Source:
    """Resolve ``builtin:<name>``, a local directory or a hub id into a :class:`Source`.

    Raises ConfigError (naming ``key``) for a missing directory, a file where a directory is
    needed, a name that is neither, or a hub id that cannot be fetched because the hub is
    unreachable and the id is not in the local cache."""
    name = str(name_or_path)
    if name.startswith(BUILTIN_PREFIX):
        builtin = name[len(BUILTIN_PREFIX):]
        if builtin not in BUILTIN_MODELS:
            raise ConfigError(
                f"{setting(key)} names an unknown built-in model '{name}'; built-in models are "
                f"{', '.join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)}.",
                fix="use one of those or a path to a Hugging Face model directory.",
            )
        path = BUILTIN_MODELS[builtin]
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"The built-in model files are missing from {path}.",
                fix=f"reinstall posttrain, or rebuild them with `python -m posttrain.world.build --out {path}`.",
            )
        return Source(name, str(path), local=True)
    if not name.strip():
        raise ConfigError(f"{setting(key)} is empty.", fix=f"set {key} to a model directory or hub id.")
    p = Path(name).expanduser()
    if p.is_dir():
        return Source(name, str(p), local=True)
    if p.exists():
        model_file = p.name in ("config.json", "tokenizer.json", "tokenizer_config.json") or p.suffix == ".safetensors"
        raise ConfigError(
            f"{setting(key)} is '{name}', which is a file; a {what} is loaded from a directory "
            "(holding config.json, the weights and the tokenizer files).",
            fix=f"set {key} to {repr(str(p.parent)) if model_file else 'a Hugging Face model directory'}.",
        )
    # "runs/sft" where ./runs exists is a mistyped local path, not the hub repo of a user called "runs"
    shadowed = str(p.parent) not in ("", ".") and p.parent.is_dir()
    looks_like_path = (name.startswith(("/", "./", "../", "~", "."))
                       or name.endswith(("/", os.sep)) or not _REPO_ID.match(name) or shadowed)
    if looks_like_path:
        parent = next((q for q in p.parents if q.exists()), None)
        where = "" if parent is None or str(parent) == "." else f" (the closest existing folder is '{parent}')"
        hub = (f" It is read as a local path, not as a hub id, because the folder '{p.parent}' exists here; to use "
               f"the hub model of that name, download it there first (`hf download {name} --local-dir {name}`)."
               if shadowed and _REPO_ID.match(name) else "")
        raise ConfigError(f"{setting(key)}: no such directory '{name}'{where}.{hub}", fix=_hint_for_missing(name))
    # a hub id
    if _hub_offline_env() or not hub_reachable():
        files = ("config.json",) if what != "tokenizer" else ("tokenizer_config.json", "tokenizer.json")
        if _in_hub_cache(name, files):
            return Source(name, name, local=False, cache_only=True)
        why = "HF_HUB_OFFLINE is set" if _hub_offline_env() else "the Hugging Face Hub cannot be reached from this machine"
        raise ConfigError(
            f"{setting(key)} is '{name}': there is no such local directory, and as a hub id it cannot be "
            f"fetched because {why}; it is not in the local Hugging Face cache either.",
            fix=(_hint_for_missing(name) if "quickstart" in name else
                 f"give a local model directory (check the path: relative paths start from the working "
                 f"directory), or download '{name}' on a machine with hub access (`hf download {name}`) and copy "
                 "it here or into the Hugging Face cache."),
        )
    return Source(name, name, local=False)


# --------------------------------------------------------------------------- directory checks


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text, so it is not a valid {what}.",
                              fix="restore the file from the original model.") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e.msg.removesuffix(' at')} at line {e.lineno}, column {e.colno}); the "
            f"{what} is corrupt or truncated.", fix="restore the file from the original model.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object ({what}).", fix="restore the file from the original model.")
    return data


def custom_code_note(directory: Path, *, what: str) -> str | None:
    """Check a local directory for custom code (``auto_map``); refuse it when transformers has no
    class of its own for it, else return a note saying the code is ignored."""
    from transformers import CONFIG_MAPPING

    notes = []
    cfg_file = directory / "config.json"
    if what != "tokenizer" and cfg_file.is_file():
        cfg = _read_json(cfg_file, "model config")
        model_type = cfg.get("model_type")
        if cfg.get("auto_map"):
            if model_type not in CONFIG_MAPPING:
                raise CheckpointError(
                    f"'{directory}' needs its own Python code to load (config.json has auto_map "
                    f"{sorted(cfg['auto_map'])} and model_type {model_type!r}, which transformers does not know). "
                    "posttrain never runs code from a model directory or the hub (trust_remote_code is always "
                    "off; there is no opt-in), so it cannot load this model.",
                    fix="use a model whose architecture transformers implements (or a conversion of this one to "
                    "such an architecture); see docs/security.md.",
                )
            notes.append(f"config.json names custom code ({', '.join(sorted(cfg['auto_map']))}); posttrain never "
                         f"runs it and uses transformers' built-in '{model_type}' classes")
    tok_file = directory / "tokenizer_config.json"
    if what != "model" and tok_file.is_file():
        tcfg = _read_json(tok_file, "tokenizer config")
        if tcfg.get("auto_map"):
            import transformers

            cls = str(tcfg.get("tokenizer_class") or "")
            known = bool(cls) and (hasattr(transformers, cls) or hasattr(transformers, cls + "Fast")
                                   or hasattr(transformers, cls.removesuffix("Fast")))
            if not known and not (directory / "tokenizer.json").is_file():
                raise TokenizerError(
                    f"'{directory}' needs its own Python code for its tokenizer (tokenizer_config.json has "
                    f"auto_map and tokenizer_class {cls or None!r}, which transformers does not know). posttrain "
                    "never runs code from a model directory or the hub (there is no opt-in).",
                    fix="use a tokenizer with a tokenizer.json (fast tokenizer) or a class transformers "
                    "implements; set model.tokenizer to it.",
                )
            notes.append("tokenizer_config.json names custom code; posttrain never runs it and uses "
                         "transformers' own tokenizer classes")
    if not notes:
        return None
    return f"note: {directory}: " + "; ".join(notes) + "."


def check_weights(directory: Path) -> None:
    """Refuse a local model directory without safetensors weights (pickle-only, or none), and a
    sharded one whose index lists other files (transformers would unpickle a listed ``.bin``)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map (the weights index is corrupt or truncated).",
                                  fix="restore the file from the original model.")
        bad = sorted({str(f) for f in weight_map.values()
                      if not (isinstance(f, str) and f.endswith(".safetensors") and ".." not in Path(f).parts)})
        if bad:
            raise CheckpointError(
                f"{index} lists weight files that are not safetensors files inside the directory "
                f"({', '.join(bad[:3])}). "
                "posttrain loads weights only from safetensors files, because unpickling a file can run any code its "
                "author put in it, and there is no opt-in.",
                fix="re-save the model with save_pretrained (it writes model*.safetensors and a matching index), on a "
                "machine where you trust the files; see docs/security.md.")
        return
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix in PICKLE_WEIGHT_SUFFIXES
                     and p.name != "training_args.bin")
    if pickles:
        raise CheckpointError(
            f"'{directory}' holds its weights only as pickle files ({', '.join(pickles[:3])}). posttrain loads "
            "weights only from safetensors files, because unpickling a file can run any code its author put "
            "in it, and there is no opt-in.",
            fix="convert the weights once, on a machine where you trust the file, e.g. `python -c \"from "
            "transformers import AutoModelForCausalLM as M; M.from_pretrained('" + str(directory) + "')"
            ".save_pretrained('" + str(directory) + "-safetensors')\"` (save_pretrained writes "
            "model.safetensors), copy the tokenizer files next to it, and point model.name_or_path there. "
            "See docs/security.md.",
        )
    raise CheckpointError(
        f"'{directory}' has a config.json but no weights (*.safetensors).",
        fix="point to a complete Hugging Face model directory (config.json + model.safetensors).",
    )


def _where_the_model_is(d: Path) -> str:
    """For a directory that is not a model directory: where the model probably is."""
    if (d / "final" / "config.json").is_file():
        return f"it looks like a posttrain run directory: its trained model is {d / 'final'}"
    if (d / "model" / "config.json").is_file():
        return f"it looks like a training checkpoint: its model is {d / 'model'}"
    steps = sorted(d.glob("step-*/model/config.json"))
    if steps:
        return f"it looks like a checkpoints/ directory: e.g. {steps[-1].parent}"
    return ("point to the directory written by save_pretrained (for a posttrain run: its final/ or "
            "checkpoints/step-*/model/)")


def check_model_dir(source: Source, *, what: str = "model", key: str = "model.name_or_path") -> str | None:
    """Checks on a local model directory before transformers sees it; returns a note or None."""
    if not source.local:
        return None
    d = Path(source.path)
    if not (d / "config.json").is_file():
        found = sorted(p.name for p in d.iterdir())[:8]
        raise CheckpointError(
            f"'{source.name}' ({setting(key).lower()}) is not a Hugging Face {what} directory: it has no config.json "
            f"({'it holds ' + ', '.join(found) if found else 'it is empty'}).",
            fix=f"{_where_the_model_is(d)}.",
        )
    note = custom_code_note(d, what=what)
    check_weights(d)
    return note


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------- devices and dtypes


def pick_device(device: str = "auto", *, key: str = "model.device") -> torch.device:
    """``auto`` -> cuda when available, else cpu. An explicit device must exist here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{setting(key)} has value {device!r}, which is not a device name.",
                          fix="use auto, cpu, cuda or cuda:<index>.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{setting(key)} is {device!r}, but this machine has no CUDA device (or this "
                              "torch build has no CUDA support), so the run would silently train on the CPU.",
                              fix=f"set {key}=auto or {key}=cpu, or run on a machine with a GPU and a CUDA build "
                              "of torch.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{setting(key)} is {device!r}, but this machine has only "
                              f"{torch.cuda.device_count()} CUDA device(s).", fix=f"use cuda:0 .. cuda:"
                              f"{torch.cuda.device_count() - 1}.")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(f"{setting(key)} is 'mps', which is not available on this machine.",
                              fix=f"set {key}=auto or cpu.")
    elif dev.type != "cpu":
        raise ConfigError(f"{setting(key)} has value {device!r}; posttrain runs on cpu, cuda or mps.",
                          fix=f"set {key}=auto.")
    return dev


def pick_dtype(dtype: str, device: torch.device | None = None) -> torch.dtype:
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


def check_attn_implementation(name: str | None, device: torch.device, *, key: str = "model.attn_implementation") -> None:
    """Refuse an attention implementation that cannot run here, before loading anything."""
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(f"{setting(key)} is 'flash_attention_2', but the flash-attn package is not "
                              "installed.", fix=f"pip install flash-attn (CUDA GPUs only), or set {key}=sdpa "
                              "(packing works with sdpa too).")
        if device.type != "cuda":
            raise ConfigError(f"{setting(key)} is 'flash_attention_2', which needs a CUDA GPU; this run is on "
                              f"{device.type}.", fix=f"set {key}=sdpa.")
    if name == "flex_attention" and device.type != "cuda":
        raise ConfigError(f"{setting(key)} is 'flex_attention', whose backward pass torch implements only on CUDA "
                          f"GPUs; this run is on {device.type}.", fix=f"set {key}=sdpa.")


# --------------------------------------------------------------------------- LoRA adapter directories


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@contextlib.contextmanager
def quiet_peft():
    """peft reads a transformers property that warns of its own rename on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
        yield


def require_peft():
    """Refuse LoRA, naming the fix, when the peft package is not installed."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError("model.peft.method=lora needs the peft package, which is not installed.",
                          fix="pip install 'peft>=0.13' (it is a dependency of posttrain; reinstall with pip install -e .)."
                          ) from None


def portable_base(name_or_path: str | None) -> str | None:
    """The base model as ``adapter_config.json`` records it (``base_model_name_or_path``): a local
    directory as an absolute path, so the adapter exports and loads from any working directory;
    the built-in model as its ``builtin:`` name (its files live inside the installed package); a
    hub id, or anything that is not a local directory, as it is."""
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


# --------------------------------------------------------------------------- loaders


def load_tokenizer(name_or_path: str, *, pad_token: str | None = None, chat_template: str | None = None,
                   key: str = "model.tokenizer"):
    """Load a tokenizer; optionally set its pad token and chat template (a file path or a Jinja string)."""
    from transformers import AutoTokenizer

    source = locate(name_or_path, key=key, what="tokenizer")
    if source.local and not any((Path(source.path) / f).is_file() for f in TOKENIZER_FILES):
        d = Path(source.path)
        found = sorted(p.name for p in d.iterdir())[:8]
        raise TokenizerError(
            f"'{name_or_path}' ({setting(key).lower()}) holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
            f"...; {'it holds ' + ', '.join(found) if found else 'it is empty'}).",
            fix=f"{_where_the_model_is(d)}.")
    if source.local and (Path(source.path) / "config.json").is_file():
        _read_json(Path(source.path) / "config.json", "model config")  # transformers reads it too
    note = custom_code_note(Path(source.path), what="tokenizer") if source.local else None
    if note:
        print(note)
    try:
        tok = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    except Exception as e:  # transformers raises many types for a broken directory
        if source.local and (Path(source.path) / "config.json").is_file():
            _diagnose_config(source, key)  # the tokenizer loader reads config.json too: blame it if it is the cause
        raise TokenizerError(
            f"Could not load a tokenizer from '{name_or_path}': {_first_line(e)}",
            fix="pass a Hugging Face model/tokenizer directory (tokenizer.json + tokenizer_config.json) or "
            "builtin:tiny-world-base.",
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
        tok.chat_template = read_chat_template(chat_template, key="--chat-template" if key.startswith("-")
                                               else "model.chat_template")
    if tok.chat_template is not None:
        check_jinja_sandbox()
    return tok


SAFE_JINJA = (3, 1, 6)  # 3.1.5 and 3.1.6 fixed ways out of the sandbox (CVE-2024-56326, CVE-2025-27516)


def _jinja_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jinja2")
    except PackageNotFoundError:  # pragma: no cover - transformers needs it to render templates
        return "0"


def check_jinja_sandbox() -> None:
    """Refuse to render chat templates with a Jinja2 whose sandbox has known escapes: a template comes
    with the model directory, and transformers' sandbox is all that keeps its author's code from running."""
    text = _jinja_version()
    parts = tuple(int(x) for x in re.findall(r"\d+", text)[:3])
    if parts < SAFE_JINJA:
        raise ConfigError(
            f"Jinja2 {text} is installed; chat templates (which come with a model directory) are rendered in "
            "Jinja2's sandbox, and versions before 3.1.6 let a template's author escape it and run code.",
            fix="upgrade it: pip install 'jinja2>=3.1.6'.")


def _diagnose_config(source: Source, key: str) -> None:
    """Raise a CheckpointError naming config.json if transformers cannot read it."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(source.path, **source.kwargs())
    except Exception as e:
        raise CheckpointError(
            f"{Path(source.path) / 'config.json'} ({setting(key).lower()}) cannot be read by transformers: "
            f"{_first_line(e)}.", fix="correct config.json (its values must have the types transformers expects), "
            "or restore it from the original model.") from None


def read_chat_template(value: str, *, key: str = "model.chat_template") -> str:
    """``value`` is a Jinja template string or the path of a file holding one."""
    if not value.strip():
        raise ConfigError(f"{setting(key)} is empty.", fix=f"set {key} to a .jinja file or the template text, or "
                          "leave it unset to use the tokenizer's own template.")
    if "{{" in value or "{%" in value:
        return value
    p = Path(value).expanduser()
    if p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{setting(key)}: could not read the template file '{value}' ({_first_line(e)}).",
                              fix="give a readable UTF-8 Jinja file.") from None
        if not text.strip():
            raise ConfigError(f"{setting(key)}: the template file '{value}' is empty.",
                              fix="write the Jinja chat template into it.")
        return text
    if p.is_dir():
        raise ConfigError(f"{setting(key)} is '{value}', which is a directory, not a template file.",
                          fix=f"set {key} to the .jinja file inside it (e.g. {p / 'chat_template.jinja'}).")
    raise ConfigError(
        f"{setting(key)} is {value!r}: it is neither a Jinja template (no '{{{{' or '{{%') nor an existing file"
        f"{' (no such file)' if ('/' in value or '.' in value) else ''}.",
        fix=f"set {key} to the path of a .jinja file or to the template text itself.",
    )


def _from_pretrained(auto_cls, name_or_path: str, *, key: str, what: str, new_heads: tuple[str, ...] = (),
                     dropped_heads: tuple[str, ...] = (), **kwargs):
    """``auto_cls.from_pretrained`` under the module's rules. Weights the model needs but the
    checkpoint lacks (transformers would initialize them randomly and only warn) are refused,
    except the new heads a caller expects (``new_heads``: name prefixes such as ``score``); so
    are weights the checkpoint holds but the model does not use (a config with fewer layers
    than the weights, a reward model loaded as a language model), except ``dropped_heads``."""
    source = locate(name_or_path, key=key, what=what)
    note = check_model_dir(source, what=what, key=key)
    if note:
        print(note)
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report of missing / unexpected weights: checked below instead
    config_kwargs = {k: kwargs.pop(k) for k in ("num_labels",) if k in kwargs}
    try:
        config = AutoConfig.from_pretrained(source.path, **source.kwargs(), **config_kwargs)
        # the caller's attention, never config.json's own _attn_implementation: transformers would let that
        # override the caller, and a hub kernel named there ("org/kernel") would be downloaded and run
        config._attn_implementation = kwargs.get("attn_implementation")
        model, info = auto_cls.from_pretrained(source.path, config=config, use_safetensors=True,
                                               output_loading_info=True, **source.kwargs(), **kwargs)
    except Exception as e:  # OSError, ValueError, SafetensorError, RuntimeError (shape mismatch), ...
        raise CheckpointError(
            f"Could not load a {what} from '{name_or_path}' ({setting(key).lower()}): {_first_line(e)}",
            fix="pass a complete Hugging Face model directory (config.json + *.safetensors) or hub id of a "
            "model transformers implements, or builtin:tiny-world-base.",
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info.get("missing_keys", ()) if not k.split(".")[0] in new_heads]
    mismatched = list(info.get("mismatched_keys", ()))
    unused = sorted(k for k in info.get("unexpected_keys", ()) if not k.split(".")[0] in dropped_heads)
    if unused:
        archs = getattr(model.config, "architectures", None) or []
        saved_as = f" (its config.json says it was saved as {archs[0]})" if archs else ""
        raise CheckpointError(
            f"'{name_or_path}' holds {len(unused)} weight tensor(s) that the {type(model).__name__} built from its "
            f"config.json does not use (e.g. {', '.join(unused[:4])}){saved_as}; loading it would silently drop "
            "them and train a different model.",
            fix=f"point {key} to a {'causal language model' if not new_heads else 'causal LM or reward model'} "
            "directory whose config.json matches its weights (num_hidden_layers, vocab_size, ...).",
        )
    for pname, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise CheckpointError(
                f"'{name_or_path}' ({setting(key).lower()}) holds weights that are NaN or infinite (first: '{pname}'), "
                "so every loss and output computed from it would be too.",
                fix="use an intact copy of the model; a training run that diverged leaves such weights (posttrain "
                "itself never saves them).")
    if missing or mismatched:
        shown = [str(k) for k in (missing + mismatched)[:4]]
        raise CheckpointError(
            f"The weights in '{name_or_path}' do not fit its config ({type(model).__name__}): "
            f"{len(missing)} parameter tensor(s) are missing and {len(mismatched)} have other shapes (e.g. "
            f"{', '.join(shown)}), so transformers would fill them with random values.",
            fix="check that config.json belongs to these weights (model_type, sizes), or re-save the model with "
            "save_pretrained.",
        )
    return model


def quantization_config(quantize: str, compute_dtype: str):
    """transformers' ``BitsAndBytesConfig`` for QLoRA (``nf4``: 4-bit NormalFloat with double
    quantization), or None; a clear error when bitsandbytes is missing."""
    if quantize in (None, "none"):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.peft.quantize={quantize} needs the bitsandbytes package, which is not installed.",
                          fix="pip install 'posttrain[qlora]' (bitsandbytes), or set model.peft.quantize=none.")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype))


def load_causal_lm(name_or_path: str, *, dtype: str = "auto", device: str = "auto",
                   attn_implementation: str | None = "sdpa", key: str = "model.name_or_path",
                   quantize: str = "none", compute_dtype: str = "float32"):
    """Load an ``AutoModelForCausalLM`` on ``device`` in ``dtype`` (safetensors only, no repository code).

    A LoRA adapter directory (``adapter_config.json`` without ``config.json``, e.g. the ``final/``
    of a ``model.peft.method=lora`` run) loads as its base model with the adapter merged in, so a
    run can start from it (with a new adapter, its reference is the merged model)."""
    from transformers import AutoModelForCausalLM

    if is_adapter_dir(name_or_path):
        print(f"note: {name_or_path} ({key}) is a LoRA adapter: loading its base model with the adapter merged in")
        merged = merge_adapter_dir(name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                   key=key, base_option=None)
        # the model this is: an adapter trained on top of it names the adapter directory as its base
        # (which loads merged again), not the first adapter's base model
        merged.name_or_path = str(name_or_path)
        return merged

    dev = pick_device(device, key="--device" if key.startswith("-") else "model.device")
    check_attn_implementation(attn_implementation, dev)
    kwargs = {"dtype": pick_dtype(dtype, dev)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    quant = quantization_config(quantize, compute_dtype)
    if quant is not None:  # 4-bit weights are placed at load time and cannot be moved afterwards
        model = _from_pretrained(AutoModelForCausalLM, name_or_path, key=key, what="model",
                                 quantization_config=quant, device_map={"": str(dev)}, **kwargs)
        return model
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, key=key, what="model", **kwargs)
    return model.to(dev)


def load_policy(model_cfg, accelerator):
    """The policy a ``model`` config section names, on the accelerator's device (with its dtype,
    attention implementation and, for QLoRA, its quantization)."""
    return load_causal_lm(model_cfg.name_or_path, dtype=model_cfg.dtype, device=str(accelerator.device),
                          attn_implementation=model_cfg.attn_implementation, quantize=model_cfg.peft.quantize,
                          compute_dtype=model_cfg.peft.compute_dtype)


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+?): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                            r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")


def _adapter_misfit(e: Exception, d: Path, key: str, base: str | None, base_option: str | None,
                    explicit_base: bool) -> CheckpointError:
    """The error for an adapter that does not fit the base model: a size mismatch (the adapter was
    trained on a base of another size) is summarized, not printed tensor by tensor."""
    text = str(e)
    mismatches = _SIZE_MISMATCH.findall(text)
    on = f" '{base}'" if base else ""
    if explicit_base and base_option:
        passed = f" (passed with {base_option})"
        fix = f"pass the base model the adapter was trained on with {base_option}, or leave {base_option} out to " \
              f"use the one the adapter names ({ADAPTER_CONFIG})."
    elif base_option:
        passed = f" (the base model its {ADAPTER_CONFIG} names, which now holds another model)"
        fix = f"pass the base model the adapter was trained on with {base_option}: posttrain export {d} " \
              f"{base_option} <base model directory> --output <merged directory>."
    else:
        passed = f" (the base model its {ADAPTER_CONFIG} names, which now holds another model)"
        fix = f"merge the adapter into the base model it was trained on first (posttrain export {d} --base <base " \
              f"model directory> --output <merged directory>) and set {key} to the merged directory."
    if mismatches:
        shown = "; ".join(f"{name.removeprefix('base_model.model.')}: [{a}] in the adapter, [{b}] in the base model"
                          for name, a, b in mismatches[:3])
        more = f"; and {len(mismatches) - 3} more" if len(mismatches) > 3 else ""
        return CheckpointError(
            f"The adapter in '{d}' ({key}) does not fit the base model{on}{passed}: {len(mismatches)} of its tensors "
            f"have other shapes than that model's layers ({shown}{more}). The adapter was trained on another base "
            "model, of another size.", fix=fix)
    first = text.strip().splitlines()[0][:300] if text.strip() else ""
    return CheckpointError(f"The adapter in '{d}' ({key}) does not fit the base model{on}{passed}: "
                           f"{type(e).__name__}: {first}", fix=fix)


def load_adapter_into(model, directory, *, key: str, base: str | None = None, base_option: str | None = "--base",
                      explicit_base: bool = False):
    """``model`` with the adapter of ``directory`` loaded (frozen, not merged), safetensors only.
    ``base`` (the model's name), ``base_option`` and ``explicit_base`` only shape the error for an
    adapter that does not fit (see :func:`merge_adapter_dir`)."""
    from peft import PeftModel

    require_peft()

    d = Path(directory)
    if not (d / ADAPTER_WEIGHTS).is_file():
        pickled = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        raise CheckpointError(
            f"'{d}' ({key}) has no {ADAPTER_WEIGHTS}" + (f" (only {', '.join(pickled)}, a pickle format posttrain "
                                                         "never loads)" if pickled else "") + ".",
            fix="save the adapter with safe_serialization=True (peft's default), where the file is trusted.")
    try:
        with quiet_peft():
            return PeftModel.from_pretrained(model, str(d), is_trainable=False, use_safetensors=True)
    except Exception as e:  # peft raises ValueError / KeyError / RuntimeError for a mismatched adapter
        raise _adapter_misfit(e, d, key, base, base_option, explicit_base) from None


def load_sequence_classifier(name_or_path: str, *, num_labels: int = 1, dtype: str = "auto", device: str = "auto",
                             attn_implementation: str | None = "sdpa", key: str = "model.name_or_path",
                             per_token: bool = False):
    """An ``AutoModelForSequenceClassification`` (a reward model, or a causal LM's backbone with a
    new head); transformers' note about newly initialized head weights is silenced. With
    ``per_token`` an ``AutoModelForTokenClassification`` (a process reward model: a score at
    every token)."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    if is_adapter_dir(name_or_path):
        raise CheckpointError(
            f"'{name_or_path}' ({setting(key).lower()}) is a LoRA adapter, not a full model.",
            fix=f"merge it into its base model first: posttrain export {name_or_path} --output <dir>, and pass <dir>.")
    dev = pick_device(device)
    check_attn_implementation(attn_implementation, dev)
    kwargs = {"num_labels": num_labels, "dtype": pick_dtype(dtype, dev)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    auto_cls = AutoModelForTokenClassification if per_token else AutoModelForSequenceClassification
    model = _from_pretrained(auto_cls, name_or_path, key=key, what="model",
                             new_heads=("score", "classifier"), dropped_heads=("lm_head",), **kwargs)
    return model.to(dev)


def max_positions(config) -> int | None:
    """The longest sequence a model's config allows (``max_position_embeddings`` and kin), or None."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(max_length: int, model, *, key: str = "data.max_length",
                     parts: dict[str, int] | None = None) -> None:
    """Refuse sequences longer than the model's position limit, naming both numbers. ``parts``:
    the config keys whose sum is ``max_length`` (a prompt budget plus new tokens), named instead of
    ``key`` so the message speaks of the settings the user wrote."""
    limit = max_positions(model.config)
    if limit is None or max_length <= limit:
        return
    if parts:
        names = list(parts)
        shown = " + ".join(f"{k}={v}" for k, v in parts.items())
        last, rest = names[-1], sum(parts[k] for k in names[:-1])
        room = (f"set {last} to at most {limit - rest}" if limit - rest >= 1
                else f"lower {' or '.join(names[:-1])} below {limit}")
        raise ConfigError(
            f"The longest sequence is {shown} = {max_length} tokens, longer than the model's position limit of "
            f"{limit} tokens (max_position_embeddings in its config.json).",
            fix=f"{room}, or lower {' / '.join(names)} so that their sum is at most {limit}.",
        )
    raise ConfigError(
        f"{setting(key)} is {max_length}, longer than the model's position limit of {limit} tokens "
        f"(max_position_embeddings in its config.json).",
        fix=f"set {key} to at most {limit}.",
    )


def check_tokenizer_fits(tokenizer, model, *, key: str = "model.tokenizer") -> None:
    """Refuse a tokenizer that produces ids the model has no embedding for (a tokenizer of
    another model, or special tokens added to it without resizing the model)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None) or getattr(model.config, "vocab_size", None)
    if rows is None:
        return
    size = len(tokenizer)
    if size > rows:
        added = [t for t, i in tokenizer.get_added_vocab().items() if i >= rows][:4]
        extra = (f" The ids past the embedding belong to {added}, tokens added on top of the vocabulary (e.g. an "
                 "eos_token or pad_token in tokenizer_config.json that the vocabulary does not hold).") if added else ""
        raise ConfigError(
            f"The tokenizer ({setting(key).lower()}) has {size} tokens, but the model's embedding has only {rows} rows "
            f"(vocab_size), so token ids {rows}..{size - 1} would index past it.{extra}",
            fix=("leave model.tokenizer unset to use the tokenizer saved with the model, or name a tokenizer whose "
                 "tokens all exist in the model's vocabulary." if key == "model.tokenizer" else
                 f"the tokenizer files in {key}'s directory do not belong to its weights: save the model's own "
                 "tokenizer there" + ("" if key.startswith("-") else " (or set model.tokenizer to it)")
                 + ", or remove the added tokens."),
        )


def check_same_vocabulary(other, model, *, key: str) -> None:
    """Refuse a second model (reference, teacher, ...) whose vocabulary differs from the policy's:
    its log-probs would be of other tokens."""
    a = getattr(other.config, "vocab_size", None)
    b = getattr(model.config, "vocab_size", None)
    if a is not None and b is not None and a != b:
        raise ConfigError(
            f"{setting(key)} names a model with a vocabulary of {a} tokens, but the model being trained has "
            f"{b}; their log-probs would be of different tokens.",
            fix=f"set {key} to a model with the same tokenizer as model.name_or_path (or leave it unset to use a "
            "frozen copy of the starting model).")


def prepare_policy(cfg, *, model=None, tokenizer=None, max_length: int, parts: dict[str, int] | None = None):
    """``(accelerator, tokenizer, model)`` of a training run's config ``cfg`` (sections ``model`` and
    ``train``): torch seeded with ``train.seed``, the causal LM loaded unless given, checked to hold
    ``max_length`` tokens (the sum of the keys ``parts`` names, for the message)."""
    import torch

    torch.manual_seed(cfg.train.seed)
    accelerator = accelerator_for(cfg.model)
    tokenizer = tokenizer or tokenizer_for(cfg.model)
    if model is None:
        model = load_policy(cfg.model, accelerator)
    check_model_fits(model, tokenizer, cfg.model, max_length=max_length, parts=parts)
    return accelerator, tokenizer, model


def check_model_fits(model, tokenizer, model_cfg, *, max_length: int, parts: dict[str, int] | None = None) -> None:
    """After loading: ``data.max_length`` (or the sum of the keys ``parts`` names) within the model's
    position limit, and every token id of the tokenizer inside its embedding."""
    check_max_length(max_length, model, parts=parts)
    check_tokenizer_fits(tokenizer, model, key="model.tokenizer" if model_cfg.tokenizer else "model.name_or_path")


def read_paths(model_cfg, **extra: str | None) -> dict[str, str | None]:
    """The paths a run reads its model from, by config key (a run directory overwrite must not delete them)."""
    return {"model.name_or_path": model_cfg.name_or_path, "model.tokenizer": model_cfg.tokenizer, **extra}


def tokenizer_for(model_cfg):
    """The tokenizer a ``model`` config section names (its ``tokenizer`` or ``name_or_path``),
    with the section's pad token and chat template applied."""
    key = "model.tokenizer" if model_cfg.tokenizer else "model.name_or_path"
    return load_tokenizer(model_cfg.tokenizer or model_cfg.name_or_path, pad_token=model_cfg.pad_token,
                          chat_template=model_cfg.chat_template, key=key)


def accelerator_for(model_cfg):
    """An ``accelerate.Accelerator`` on the CPU unless a GPU is present and not declined.

    The section's ``device`` and ``attn_implementation`` are checked first (a CUDA device on a
    machine without one, or flash-attention without its package, is refused). Precision is not
    set here: the engine does its own autocast, because accelerate's state is process-global
    and refuses a second Accelerator with other settings in one process.
    """
    from accelerate import Accelerator

    dev = pick_device(model_cfg.device)
    check_attn_implementation(model_cfg.attn_implementation, dev)
    return Accelerator(cpu=dev.type == "cpu")


def load_model_config(name_or_path: str, *, key: str = "model.name_or_path"):
    """Only the transformers config of a model (a directory, a ``config.json``, a cached or
    reachable hub id, or ``builtin:...``): no weights are read and no repository code runs."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".json":
        data = _read_json(path, "config")
        model_type = data.pop("model_type", None)
        if not model_type:
            raise ConfigError(f"{path} has no model_type.", fix="give a transformers config.json.")
        return AutoConfig.for_model(model_type, **data)
    try:
        return AutoConfig.from_pretrained(locate(name_or_path, key=key).path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: no model config for '{name_or_path}' ({str(e).splitlines()[0]}).",
                          fix="give a local model directory, a config.json, or a hub id that is cached or "
                          "reachable.") from None


def check_same_tokenizer(teacher_path: str, tokenizer, *, key: str = "teacher.name_or_path",
                         why: str = "token-level distillation compares the two models' probabilities of the same "
                                    "token ids", fix: str | None = None) -> None:
    """Two models that must tokenize identically (teacher and student; a PRM and the policy whose
    tokens it rewards): the same vocabulary, or a ConfigError saying ``why``."""
    try:
        other = load_tokenizer(teacher_path, key=key)
    except ConfigError:
        return  # a directory without tokenizer files: the vocabulary-size check still applies
    if other.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"The tokenizer of {key} differs from the trained model's: {why}.",
                          fix=fix or "use a teacher and a student with the same tokenizer (e.g. the same model "
                          "family), or loss.mode=seqkd with a student that can read the teacher's text.")
