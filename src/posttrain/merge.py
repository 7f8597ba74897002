"""Model merging — ``posttrain merge config.yaml OUTPUT`` — from mergekit-style YAML.

Methods (``merge_method``), applied tensor by tensor, in float32:

==================  ==============================================================================
``linear``          Σ w_i θ_i / Σ w_i (``normalize``, default true); WiSE-FT is linear with
                    weights (1 − α, α) over (base, fine-tuned)
``slerp``           spherical interpolation from ``base_model`` (t = 0) to the other model (t = 1)
                    of each tensor seen as one vector; nearly parallel tensors (|cos| > 0.9995)
                    fall back to linear interpolation
``task_arithmetic`` θ_base + λ Σ w_i δ_i,   δ_i = θ_i − θ_base  (``normalize``: divide by Σ w_i,
                    default false)
``ties``            trim each δ_i to its top ``density`` fraction by magnitude, elect each entry's
                    sign as the sign of Σ w_i δ_i (mass), keep only agreeing entries, and average
                    them: θ_base + λ Σ w_i m_i δ_i / Σ w_i m_i  (``normalize`` default true)
``dare_linear``     drop each entry of δ_i with probability p = 1 − ``density`` and rescale the
                    kept ones by 1/(1 − p), then task arithmetic
``dare_ties``       the same random drop and rescale, then TIES' sign election and average
==================  ==============================================================================

Config (the keys mergekit users write; anything else is refused by name)::

    merge_method: ties
    base_model: runs/base            # directory, or builtin:tiny-world-base
    models:
      - model: runs/sft/final
        parameters: {weight: 0.5, density: 0.5}
      - model: runs/dpo/final
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true, lambda: 1.0, t: 0.5}   # global; a model's own value wins
    dtype: float32                   # of the written tensors
    seed: 0                          # DARE's random drops (posttrain's addition)

Streaming: tensors are read one name at a time from each model's safetensors files
(``safe_open``), merged, and written in shards of about 512 MiB, so a merge holds one tensor per
model plus at most one output shard, never whole models. Models must have the same architecture,
tensor names and shapes (the first mismatch is named). The output is a Hugging Face directory:
the base model's (or the first model's) config.json and tokenizer, with the merged weights.

Building blocks from ``peft.utils.merge_utils`` (``prune`` for magnitude trimming and DARE's
random drop with rescaling, ``calculate_majority_sign_mask`` for the sign election); the
weighting and normalization follow mergekit (docs/merging.md says where peft's own ``ties`` /
``dare_*`` helpers differ).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError

# merge_method -> (what it computes, the parameters it reads). The parser accepts these and
# `posttrain merge --help` lists them (help_text), so the two cannot drift apart.
METHODS = {
    "linear": ("weighted average of the models; WiSE-FT is linear over (base, fine-tuned) with weights (1 - a, a)",
               ("weight", "normalize")),
    "slerp": ("spherical interpolation from base_model (t = 0) to the one other model (t = 1)", ("t",)),
    "task_arithmetic": ("base + lambda * the weighted sum of the task vectors (model - base)",
                        ("weight", "normalize", "lambda")),
    "ties": ("task vectors trimmed to their top density fraction, each entry's sign elected by the weighted "
             "mass, the agreeing entries averaged", ("weight", "density", "normalize", "lambda")),
    "dare_linear": ("task vectors with entries dropped at random (keeping a density fraction, rescaled by "
                    "1/density), then task arithmetic", ("weight", "density", "normalize", "lambda", "rescale")),
    "dare_ties": ("DARE's random drop and rescale, then TIES' sign election and average",
                  ("weight", "density", "normalize", "lambda", "rescale")),
}
# per task method: (sparsification, sign consensus, default normalize); mergekit's defaults
_TASK_METHODS = {"task_arithmetic": (None, False, False), "ties": ("magnitude", True, True),
                 "dare_linear": ("random", False, False), "dare_ties": ("random", True, False)}
PARAMS = {
    "weight": "a model's weight (default 1)",
    "density": "the fraction of each task vector kept, in (0, 1] (default 1)",
    "normalize": "divide by the summed weights (default: see the method)",
    "lambda": "scale of the merged task vector (default 1)",
    "t": "where to interpolate, in [0, 1] (required)",
    "rescale": "true only: DARE always rescales the kept entries by 1/density",
    "int8_mask": "accepted by every method, no effect (a memory option in mergekit)",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODEL_PARAMS = ("weight", "density")  # the parameters a model may also set for itself
TOP_KEYS = {
    "merge_method": "one of the methods below",
    "base_model": "model directory or builtin:tiny-world-base: slerp's t = 0, the task methods' base",
    "models": "list of {model: path, parameters: {weight, density}}; a model's own value wins",
    "parameters": "the method's parameters (below), defaults for every model",
    "dtype": f"of the written tensors: {', '.join(DTYPES)} (default float32)",
    "seed": "DARE's random drops (default 0)",
    "tokenizer_source": "base only: the merged model gets the base model's tokenizer",
}
SLERP_DOT_THRESHOLD = 0.9995
SHARD_BYTES = 512 << 20


# --------------------------------------------------------------------------- tensor math


def linear(tensors: list[torch.Tensor], weights: list[float], *, normalize: bool = True) -> torch.Tensor:
    """Σ w_i x_i (/ Σ w_i when ``normalize``)."""
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * tensors[0].dim()))
    out = (torch.stack([t.float() for t in tensors]) * w).sum(0)
    if normalize:
        total = float(sum(weights))
        if abs(total) < 1e-8:
            raise ConfigError("merge: the model weights sum to 0, so normalize=true would divide by zero.",
                              fix="change the weights, or set parameters.normalize=false.")
        out = out / total
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, dot_threshold: float = SLERP_DOT_THRESHOLD,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of ``a`` (t = 0) and ``b`` (t = 1), each tensor one vector.

        cos Ω = <a/|a|, b/|b|>;   out = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b

    applied to the tensors as they are (not normalized), as mergekit does; when |cos Ω| exceeds
    ``dot_threshold`` the tensors are nearly parallel and ``(1−t) a + t b`` is returned."""
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(), b32.norm()
    if na < eps or nb < eps:
        return (1 - t) * a32 + t * b32
    dot = float((a32.flatten() / na) @ (b32.flatten() / nb))
    if abs(dot) > dot_threshold:
        return (1 - t) * a32 + t * b32
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * a32 + (math.sin(t * omega) / s) * b32


def task_merge(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], densities: list[float], *,
               sparsify: str | None, consensus: bool, normalize: bool, lam: float = 1.0,
               generator_seed: int | None = None) -> torch.Tensor:
    """The task-vector family (task arithmetic, TIES, DARE): see the module docstring."""
    from peft.utils.merge_utils import calculate_majority_sign_mask, prune

    base32 = base.float()
    deltas = []
    for i, (t, d) in enumerate(zip(tensors, densities)):
        delta = t.float() - base32
        if sparsify == "magnitude" and d < 1:
            delta = prune(delta, d, method="magnitude")
        elif sparsify == "random" and d < 1:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((generator_seed or 0) + 7919 * i)
                delta = prune(delta, d, method="random", rescale=True)
        deltas.append(delta)
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * base.dim())).expand_as(stacked)
    weighted = stacked * w
    if consensus:  # elect each entry's sign by the weighted mass, keep the agreeing entries
        mask = calculate_majority_sign_mask(weighted, method="total")
        weighted = weighted * mask
        w = w * mask
    mixed = weighted.sum(0)
    if normalize:
        divisor = w.sum(0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
        mixed = mixed / divisor
    return base32 + lam * mixed


# --------------------------------------------------------------------------- config


@dataclass
class MergeModel:
    path: str
    weight: float | None = None
    density: float | None = None


@dataclass
class MergeConfig:
    method: str
    base_model: str | None
    models: list[MergeModel]
    parameters: dict = field(default_factory=dict)
    dtype: str = "float32"
    seed: int = 0
    ignored: list[str] = field(default_factory=list)   # known parameters this method does not read


def method_params(method: str) -> tuple[str, ...]:
    """The keys ``parameters:`` accepts for ``method``."""
    return METHODS[method][1] + ("int8_mask",)


def normalize_default(method: str) -> bool:
    """Whether ``method`` divides by the summed weights unless ``normalize`` is set (mergekit's defaults)."""
    return _TASK_METHODS[method][2] if method in _TASK_METHODS else True


def help_text(width: int = 100) -> str:
    """The config reference ``posttrain merge --help`` prints, from the tables the parser uses."""
    def rows(table: dict, indent: int = 2) -> list[str]:  # a tuple value: one paragraph per item
        col = indent + max(map(len, table)) + 2
        out = []
        for name, text in table.items():
            for i, para in enumerate([text] if isinstance(text, str) else text):
                head = (" " * indent + name if i == 0 else "").ljust(col)
                out.append(textwrap.fill(para, width, initial_indent=head, subsequent_indent=" " * col))
        return out

    methods = {}
    for name, (what, params) in METHODS.items():
        reads = [f"normalize (default {str(normalize_default(name)).lower()})" if k == "normalize" else k
                 for k in params]
        methods[name] = (what, "parameters: " + ", ".join(reads))
    return "\n".join(["merge YAML keys (mergekit-style; any other key is refused by name):", *rows(TOP_KEYS), "",
                      "methods (merge_method):", *rows(methods), "",
                      f"parameters (in parameters:, or {' / '.join(MODEL_PARAMS)} in a model's own):", *rows(PARAMS),
                      "", "docs/merging.md has the formulas and an example."])


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"merge config key '{key}' is {value!r}, not a finite number.",
                          fix="give a single number (per-layer gradients and filters are not supported).")
    return float(value)


def parse_merge_config(data, source: str = "merge config") -> MergeConfig:
    """Validate a mergekit-style mapping; every unsupported key or value is refused by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with merge_method, models, ...", fix="see docs/merging.md.")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        hint = " (slices / layer ranges are not supported: merge whole models)" if "slices" in unknown else ""
        raise ConfigError(f"{source}: key(s) {', '.join(unknown)} are not supported{hint}.",
                          fix=f"use only {', '.join(sorted(TOP_KEYS))}; see docs/merging.md.")
    method = data.get("merge_method")
    if method not in METHODS:
        raise ConfigError(f"{source}: merge_method is {method!r}.", fix=f"use one of {', '.join(METHODS)}.")
    if data.get("tokenizer_source") not in (None, "base"):
        raise ConfigError(f"{source}: tokenizer_source={data.get('tokenizer_source')!r} is not supported.",
                          fix="remove it: the merged model gets the base model's tokenizer (tokenizer_source: base).")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: parameters must be a mapping.", fix="e.g. parameters: {normalize: true}.")
    accepted = method_params(method)
    bad = sorted(set(params) - set(PARAMS))
    if bad:
        raise ConfigError(f"{source}: parameters.{bad[0]} is not supported.",
                          fix=f"{method} reads {', '.join(accepted)} (posttrain merge --help lists each method's).")
    # a known parameter this method does not read is accepted, as mergekit does, and reported when merging
    ignored = [f"parameters.{k}" for k in sorted(set(params) - set(accepted))]
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{source}: models must be a non-empty list of {{model: path, parameters: ...}}.",
                          fix="see docs/merging.md.")
    parsed = []
    for i, m in enumerate(models):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"{source}: models[{i}] needs a 'model' path.", fix="e.g. - model: runs/sft/final")
        extra = sorted(set(m) - {"model", "parameters"})
        if extra:
            raise ConfigError(f"{source}: models[{i}].{extra[0]} is not supported.", fix="use model and parameters.")
        mp = m.get("parameters") or {}
        own = [k for k in MODEL_PARAMS if k in accepted]
        bad = sorted(set(mp) - set(MODEL_PARAMS))
        if bad:
            raise ConfigError(f"{source}: models[{i}].parameters.{bad[0]} is not supported.",
                              fix=f"a model's own parameters for {method}: {', '.join(own) or 'none'}.")
        ignored += [f"models[{i}].parameters.{k}" for k in sorted(set(mp) - set(own))]
        w = _number(mp["weight"], f"models[{i}].parameters.weight") if "weight" in mp else None
        d = _number(mp["density"], f"models[{i}].parameters.density") if "density" in mp else None
        parsed.append(MergeModel(str(m["model"]), w, d))
    for key in ("weight", "density", "lambda", "t"):
        if key in params:
            params[key] = _number(params[key], f"parameters.{key}")
    for i, m in enumerate(parsed):
        d = m.density if m.density is not None else params.get("density")
        if d is not None and not 0 < d <= 1:
            where = f"models[{i}].parameters.density" if m.density is not None else "parameters.density"
            raise ConfigError(f"{source}: {where} is {d}, outside (0, 1] (the fraction of each task vector kept).",
                              fix="use a density in (0, 1], e.g. 0.5.")
    if "t" in params and not 0 <= params["t"] <= 1:
        raise ConfigError(f"{source}: parameters.t is {params['t']}, outside [0, 1].", fix="use t in [0, 1].")
    if "rescale" in params and params["rescale"] is not True:
        raise ConfigError(f"{source}: parameters.rescale={params['rescale']!r} is not supported (DARE always "
                          "rescales the kept entries by 1/density).", fix="remove parameters.rescale.")
    dtype = data.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"{source}: dtype is {dtype!r}.", fix=f"use one of {', '.join(DTYPES)}.")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{source}: seed is {seed!r}.", fix="use a non-negative integer.")
    base = data.get("base_model")
    cfg = MergeConfig(method, str(base) if base is not None else None, parsed, params, dtype, seed, ignored)
    _check_method_shape(cfg, source)
    return cfg


def _check_method_shape(cfg: MergeConfig, source: str) -> None:
    if cfg.method == "slerp":
        others = [m for m in cfg.models if m.path != cfg.base_model]
        if cfg.base_model is None or len(others) != 1 or len(cfg.models) > 2:
            raise ConfigError(f"{source}: slerp interpolates between two models: base_model (t = 0) and one other "
                              "model (t = 1).", fix="set base_model and list the two models (or only the other one).")
        if "t" not in cfg.parameters:
            raise ConfigError(f"{source}: slerp needs parameters.t (0 = base_model, 1 = the other model).",
                              fix="e.g. parameters: {t: 0.5}.")
    elif cfg.method in _TASK_METHODS:
        if cfg.base_model is None:
            raise ConfigError(f"{source}: {cfg.method} merges task vectors (model - base), so it needs base_model.",
                              fix="set base_model to the model the others were fine-tuned from.")
    elif cfg.method == "linear" and len(cfg.models) < 2:
        raise ConfigError(f"{source}: linear needs at least two models.", fix="list two or more models.")


# --------------------------------------------------------------------------- model files


class _Weights:
    """Lazy access to one model directory's safetensors tensors."""

    def __init__(self, spec: str, key: str):
        from safetensors import safe_open

        from .models.loading import check_weights, is_adapter_dir, locate

        if is_adapter_dir(spec):
            raise ConfigError(f"merge config {key} '{spec}' is a LoRA adapter, not a full model.",
                              fix=f"merge it into its base first: posttrain export {spec} --output <dir>.")
        src = locate(spec, key=f"merge config {key}")
        if not src.local:
            raise ConfigError(f"merge config {key} '{spec}' is not a local directory.",
                              fix="download it first (hf download ... --local-dir DIR) and give the directory.")
        self.dir = Path(src.path)
        check_weights(self.dir)
        try:
            self.config = json.loads((self.dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"Cannot read {self.dir / 'config.json'}: {e}.",
                                  fix="give a complete Hugging Face model directory.") from None
        self.handles = []
        self.where: dict[str, object] = {}
        for f in sorted(self.dir.glob("*.safetensors")):
            h = safe_open(str(f), framework="pt")
            self.handles.append(h)
            for name in h.keys():
                self.where[name] = h
        self.spec = spec

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)


def _check_compatible(models: list[_Weights], labels: list[str]) -> list[str]:
    ref = models[0]
    names = sorted(ref.where)
    for m, label in zip(models[1:], labels[1:]):
        a, b = ref.config.get("architectures"), m.config.get("architectures")
        if a != b or ref.config.get("model_type") != m.config.get("model_type"):
            raise ConfigError(f"merge: {labels[0]} is {a or ref.config.get('model_type')} but {label} is "
                              f"{b or m.config.get('model_type')}; only models of one architecture merge.",
                              fix="merge models fine-tuned from the same base model.")
        missing = sorted(set(names) - set(m.where))
        extra = sorted(set(m.where) - set(names))
        if missing or extra:
            first = missing[0] if missing else extra[0]
            where = f"{labels[0]} has '{first}' and {label} does not" if missing else \
                f"{label} has '{first}' and {labels[0]} does not"
            raise ConfigError(f"merge: the models hold different tensors: {where}.",
                              fix="merge models of the same architecture and size.")
        for n in names:
            if ref.shape(n) != m.shape(n):
                raise ConfigError(f"merge: tensor '{n}' has shape {list(ref.shape(n))} in {labels[0]} but "
                                  f"{list(m.shape(n))} in {label}.", fix="merge models of the same size.")
    return names


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:6], "little")


def run_merge(cfg: MergeConfig, output: str | Path, *, overwrite: bool = False, log=print,
              key: str = "arg:output") -> Path:
    """Merge as configured and write a Hugging Face model directory at ``output``.

    ``output`` is checked before any model is read (``key`` names it in the messages: the
    ``output`` argument of ``posttrain merge``); the model is written to ``<output>.partial`` and
    renamed into place, and a failure at any point (Ctrl-C included) removes the partial directory."""
    from .train.rundir import check_output_target

    reads = {f"the model of models[{i}]": m.path for i, m in enumerate(cfg.models)}
    if cfg.base_model is not None:
        reads["base_model"] = cfg.base_model
    out = check_output_target(output, key=key, overwrite=overwrite, command="posttrain merge",
                              protect={k: v for k, v in reads.items() if not v.startswith("builtin:")})
    # the base first; slerp's other model; the task methods' fine-tuned models
    entries = list(cfg.models)
    base_entry = None
    if cfg.base_model is not None:
        base_entry = next((m for m in entries if m.path == cfg.base_model), MergeModel(cfg.base_model))
        entries = [m for m in entries if m.path != cfg.base_model]
    labels = (["base_model"] if base_entry else []) + [f"models[{cfg.models.index(m)}]" for m in entries]
    weights_of = [_Weights(base_entry.path, "base_model")] if base_entry else []
    weights_of += [_Weights(m.path, f"models[{cfg.models.index(m)}].model") for m in entries]
    names = _check_compatible(weights_of, labels)
    p = cfg.parameters
    dtype = DTYPES[cfg.dtype]

    def param(m: MergeModel, key: str, default):
        v = getattr(m, key)
        return v if v is not None else p.get(key, default)

    stage = out.with_name(out.name + ".partial")
    try:
        if stage.exists():  # left by a merge that was killed
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        _write_merge(cfg, out, stage, weights_of, names, base_entry, entries, param, dtype, log)
    except BaseException as e:  # nothing half-written is left behind, whatever stopped the merge
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # a full disk, permissions
            reason = (getattr(e, "strerror", None) or str(e).strip() or type(e).__name__).splitlines()[-1]
            raise CheckpointError(
                f"Could not write the merged model to '{out}': {reason} ({type(e).__name__}); nothing was "
                f"written ('{stage}' was removed).",
                fix=f"free disk space or fix the permissions of '{out.parent}', or choose another "
                f"{f'the {key[4:]} argument' if key.startswith('arg:') else key}.") from None
        raise
    log(f"merged model written to {out}")
    return out


def _write_merge(cfg: MergeConfig, out: Path, stage: Path, weights_of: list, names: list[str], base_entry, entries,
                 param, dtype, log) -> None:
    """Merge tensor by tensor into ``stage``, then rename it to ``out`` (the caller removes ``stage``
    on failure)."""
    from safetensors.torch import save_file

    from .models.loading import load_tokenizer

    p = cfg.parameters
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shard_files, index = 0, [], {}

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"shard-{len(shard_files):05d}.safetensors"
            save_file(shard, str(stage / name), metadata={"format": "pt"})
            shard_files.append(name)
            for k in shard:
                index[k] = name
            shard, shard_bytes = {}, 0

    normalize = bool(p.get("normalize", normalize_default(cfg.method)))
    log(f"merge {cfg.method}: {len(names)} tensors from {len(weights_of)} models")
    if cfg.ignored:
        log(f"note: {', '.join(cfg.ignored)} not read by {cfg.method}; ignored (posttrain merge --help lists what "
            "each method reads)")
    for n in names:
        tensors = [w.get(n) for w in weights_of]
        if cfg.method == "linear":
            ws = [param(m, "weight", 1.0) for m in ([base_entry] if base_entry else []) + entries]
            merged = linear(tensors, ws, normalize=normalize)
        elif cfg.method == "slerp":
            merged = slerp(tensors[0], tensors[1], float(p["t"]))
        else:
            sparsify, consensus, _ = _TASK_METHODS[cfg.method]
            merged = task_merge(tensors[0], tensors[1:], [param(m, "weight", 1.0) for m in entries],
                                [param(m, "density", 1.0) for m in entries], sparsify=sparsify, consensus=consensus,
                                normalize=normalize, lam=float(p.get("lambda", 1.0)),
                                generator_seed=_tensor_seed(cfg.seed, n))
        if not torch.isfinite(merged).all():
            raise ConfigError(f"merge: tensor '{n}' came out non-finite (NaN or inf); nothing was written.",
                              fix="check the input models and the weights / lambda.")
        merged = merged.to(dtype).contiguous()
        shard[n] = merged
        shard_bytes += merged.numel() * merged.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    if len(shard_files) == 1:
        (stage / shard_files[0]).rename(stage / "model.safetensors")
    else:
        total = len(shard_files)
        renames = {f: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, f in enumerate(shard_files)}
        for old, new in renames.items():
            (stage / old).rename(stage / new)
        (stage / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: renames[v] for k, v in index.items()}}, indent=2) + "\n")
    config = dict(weights_of[0].config)
    config["torch_dtype"] = config["dtype"] = cfg.dtype
    (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (weights_of[0].dir / "generation_config.json").is_file():
        shutil.copy(weights_of[0].dir / "generation_config.json", stage / "generation_config.json")
    try:
        load_tokenizer(str(weights_of[0].dir), key="base_model").save_pretrained(stage)
    except Exception as e:  # a model directory without a tokenizer: the merge is still usable
        log(f"note: no tokenizer copied from {weights_of[0].dir} ({type(e).__name__}); add one before training")
    (stage / "merge_config.json").write_text(json.dumps({
        "merge_method": cfg.method, "base_model": cfg.base_model, "parameters": p, "dtype": cfg.dtype,
        "seed": cfg.seed, "models": [{"model": m.path, "parameters": {k: v for k, v in
                                                                      (("weight", m.weight), ("density", m.density))
                                                                      if v is not None}} for m in cfg.models]},
        indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
