"""A memory planner: will a run fit, and if not, what is the cheapest change that makes it fit?

    posttrain plan --model meta-llama/Llama-3.1-8B --method dpo --seq-len 2048 --micro-batch 4 \\
        --devices 8 --device-memory 80 --sharding zero3

Per device it adds up (bytes):

* **weights**: parameters x bytes of the weight dtype (QLoRA: 4-bit linear layers at 0.5 byte
  per weight plus one fp32 absmax per 64 weights, quantized again in double quantization to
  ~1/32 byte per weight, other parameters in the compute dtype);
* **gradients** of the trainable parameters (in the weight dtype);
* **optimizer state**: torch's AdamW keeps two moments per trainable parameter in the
  parameter's dtype: 8 bytes for fp32 weights (and for LoRA adapters, which train in fp32), 4
  for bf16 weights (no fp32 master copy: ``model.dtype=bfloat16`` is pure bf16 training);
  under DeepSpeed ZeRO with bf16 weights 12 (an fp32 master partition and two fp32 moments);
* **activations** kept for the backward pass, per token and layer (elements, times the
  activation dtype's bytes): the attention block's RMSNorm (input, statistics, output: ``3h``),
  q, k, v (``h + 2kv``), rotated q and k (``h + kv``), the attention output (``h``); the SwiGLU
  MLP's RMSNorm (``3h``), gate, up, the activated gate and the product (``4i``): ``9h + 3kv +
  4i`` per layer, plus ``4h`` per token for the embedding output and the final norm. Attention
  is the memory-efficient kernel (SDPA / flash), which stores no T x T matrix. With gradient
  checkpointing only each layer's input (``h``) is kept, plus one layer's full set during its
  recomputation. A sequence counts :func:`sequence_tokens` tokens: ``seq_len``, or for the
  online methods the prompt (``seq_len``) plus the completion (``new_tokens``);
* **logits**: the LM head's (B, T, V) output in fp32 with its log-softmax and gradient (3
  buffers), or with chunked log-probs (posttrain's default) 3 buffers of ``chunk_rows x V``;
* **copies** the method needs: a frozen reference (DPO family except the reference-free ones;
  online presets with a KL term) unless LoRA makes the reference the adapter-disabled model; a
  critic with its gradients and optimizer (PPO); a reward model (PPO / online with a learned
  reward);
* **KV cache** for online rollouts: ``2 x layers x kv_heads x head_dim x (prompt + new tokens)``
  per sequence, for :func:`rollout_rows` sequences in the weight dtype (posttrain's sampler
  decodes ``max(1, rollout_batch // group_size)`` prompts at a time, each repeated
  ``group_size`` times).

The **peak** is what stays for the whole run (weights, optimizer state, frozen copies) plus the
largest of: the forward pass's activations and logits, the gradients (the backward pass frees
activations as it allocates gradients, and gradients are freed between steps), and the
rollouts' KV cache.

Sharding divides what it shards by the number of devices: ``zero2`` the gradients and
optimizer state, ``zero3`` / ``fsdp`` also the weights (of the trained model and of the frozen
copies). The model is what the architecture's config says; parameters are counted on the meta
device (no weights are read, no repository code runs). A ``config.json`` that lacks a size the
estimate needs is refused (:func:`load_model_shape`): transformers would fill in its config
class's default (Llama-7B's sizes for ``llama``) and the planner would describe another model.

Limits (docs/memory.md): the estimate leaves out the framework's own overhead (CUDA context,
allocator fragmentation, communication buffers; budget ~1-2 GiB per GPU), temporary buffers of
single operations beyond the logits, and the memory of ``generate`` besides the KV cache.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .algorithms.rl.config import PRESETS
from .errors import ConfigError, setting
from .ops import PREFERENCE_LOSSES

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# the methods, read from the registries (a new loss or preset is planned without an edit here)
PREFERENCE = tuple(sorted(PREFERENCE_LOSSES))
REFERENCE_FREE = tuple(n for n in PREFERENCE if not PREFERENCE_LOSSES[n].needs_reference)
UNPAIRED = tuple(n for n in PREFERENCE if PREFERENCE_LOSSES[n].data != "paired")  # one sequence per example
ONLINE = (*PRESETS, "online-dpo")
METHODS = ("sft", "rm") + PREFERENCE + ONLINE

#: the ``posttrain plan`` flag of each numeric PlanInput field (errors name the flag)
FLAGS = {"seq_len": "--seq-len", "micro_batch": "--micro-batch", "devices": "--devices",
         "device_memory_gib": "--device-memory", "lora_r": "--lora-r", "rollout_batch": "--rollout-batch",
         "group_size": "--group-size", "new_tokens": "--new-tokens", "chunk_rows": "PlanInput.chunk_rows"}

#: the sizes the estimate reads from a model config: (what it is, the names configs use for it;
#: the first is transformers' common attribute name)
CONFIG_FIELDS = {
    "hidden_size": ("the hidden size", ("hidden_size", "n_embd", "n_embed", "d_model", "dim")),
    "num_hidden_layers": ("the number of layers", ("num_hidden_layers", "n_layer", "num_layers", "n_layers")),
    "num_attention_heads": ("the number of attention heads", ("num_attention_heads", "n_head", "num_heads",
                                                              "n_heads")),
    "num_key_value_heads": ("the number of key-value heads", ("num_key_value_heads", "num_kv_heads", "n_head_kv")),
    "intermediate_size": ("the MLP's intermediate size", ("intermediate_size", "n_inner", "ffn_dim",
                                                          "ffn_hidden_size", "d_ff")),
    "vocab_size": ("the vocabulary size", ("vocab_size",)),
}
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass
class ModelShape:
    """What the planner needs of an architecture."""

    params: int                 # all parameters
    linear_params: int          # parameters of the decoder's linear layers (LoRA / 4-bit targets)
    lora_dims: list = field(default_factory=list)   # (in, out) of every linear layer but the head
    hidden: int = 0
    intermediate: int = 0
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    vocab: int = 0
    tied: bool = False
    max_positions: int | None = None    # the model's position limit (None: its config names none)
    positions_given: bool = True        # False: the limit is the config class's default, not the file's
    source: str = ""                    # where the config came from (for messages)


def _intermediate(config, hidden: int) -> int:
    for name in CONFIG_FIELDS["intermediate_size"][1]:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4 * hidden      # GPT-2 (n_inner: null), Falcon, Bloom: the architecture's own 4h


def model_shape(config, *, source: str = "") -> ModelShape:
    """Count a transformers config's parameters on the meta device (nothing is allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models.loading import max_positions

    where = source or f"the {type(config).__name__}"
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = getattr(config, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            what = CONFIG_FIELDS[name][0]
            raise ConfigError(f"{where}: {name} ({what}) is {value!r}; the planner needs a whole number of at least "
                              "1.", fix=f"set {name} in the config.json to the model's {what.removeprefix('the ')}.")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise ConfigError(f"{where}: transformers cannot build a causal LM from this config "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__}).",
                          fix="give the config.json of a decoder-only language model (a model_type that "
                          "AutoModelForCausalLM knows).") from None
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    dims, linear = [], 0
    for _, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m is not head:
            dims.append((m.in_features, m.out_features))
            linear += m.weight.numel()
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return ModelShape(params=params, linear_params=linear, lora_dims=dims, hidden=hidden,
                      intermediate=_intermediate(config, hidden), layers=config.num_hidden_layers, heads=heads,
                      kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                      vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
                      max_positions=max_positions(config), source=source)


def check_config_fields(config, raw: dict, source: str) -> None:
    """Refuse a config file that lacks a size the estimate needs (:data:`CONFIG_FIELDS`, under
    any of its names or the config class's ``attribute_map``) where the config class would fill
    in a default of its own: that default describes another model (``llama``: Llama-7B's 4096 /
    32 layers / 11008), so the estimate would be silently wrong. A size whose class default is
    None is derived by the architecture itself (GPT-2's ``n_inner``: 4h; Llama's key-value heads:
    the attention heads) and may be left out."""
    given = dict(raw)
    if isinstance(raw.get("text_config"), dict):
        given.update(raw["text_config"])
    cls = type(config)
    try:
        signature = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    attribute_map = dict(getattr(cls, "attribute_map", {}) or {})
    for canonical, (what, names) in CONFIG_FIELDS.items():
        aliases = set(names) | {attribute_map.get(n) for n in names if n in attribute_map} - {None}
        param = next((n for n in (*names, attribute_map.get(canonical)) if n and n in signature), None)
        if param is None:
            continue                               # the architecture has no such size (Bloom: 4h MLP)
        default = signature[param].default
        if default is None or default is inspect.Parameter.empty:
            continue                               # derived by the architecture when absent
        if aliases & set(given):
            continue
        raise ConfigError(f"{source} has no {param!r} ({what}); without it transformers would use "
                          f"{cls.__name__}'s default of {default}, which describes a different model, so the "
                          "planner refuses to guess.",
                          fix=f"add \"{param}\": <the model's {what.removeprefix('the ')}> to {source} (the "
                          "model's published config.json has it).")


def _raw_config(name_or_path: str) -> tuple[dict, str]:
    """The config file's own keys (before transformers adds its class defaults) and its name."""
    from .models.loading import locate

    path = Path(name_or_path).expanduser()
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    src = locate(name_or_path, key="--model")
    local = Path(src.path) / "config.json"
    if local.is_file():
        shown = str(local) if src.local and not name_or_path.startswith("builtin:") else f"{name_or_path}'s config.json"
        return json.loads(local.read_text(encoding="utf-8")), shown
    from transformers import PretrainedConfig

    try:
        raw, _ = PretrainedConfig.get_config_dict(src.path, **src.kwargs())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model: cannot read the config.json of '{name_or_path}' ({str(e).splitlines()[0]}).",
                          fix="give a model directory or a config.json.") from None
    return raw, f"{name_or_path}'s config.json"


def load_model_shape(name_or_path: str) -> ModelShape:
    """The :class:`ModelShape` of a model directory, config.json, hub id or builtin: model, after
    checking that its config file gives every size the estimate reads
    (:func:`check_config_fields`)."""
    config = load_model_config(name_or_path)
    raw, source = _raw_config(name_or_path)
    check_config_fields(config, raw, source)
    shape = model_shape(config, source=source)
    given = dict(raw, **(raw.get("text_config") or {}))
    shape.positions_given = any(n in given for n in POSITION_FIELDS)
    return shape


@dataclass
class PlanInput:
    method: str = "sft"
    seq_len: int = 2048               # tokens per sequence; online methods: the prompt
    micro_batch: int = 1
    devices: int = 1
    device_memory_gib: float = 80.0
    sharding: str = "none"            # none | zero2 | zero3 | fsdp
    weight_dtype: str = "float32"     # the trained weights (and gradients, and the frozen copies)
    activation_dtype: str = "float32"  # bfloat16 under train.mixed_precision=bf16
    peft: str = "none"                # none | lora | qlora
    lora_r: int = 16
    gradient_checkpointing: bool = False
    chunked_logprobs: bool = True
    chunk_rows: int = 256
    reward_model: bool = False        # online methods with a learned reward model
    kl: bool = True                   # online methods: a KL term needs the reference
    rollout_batch: int = 128          # sequences decoded together (online; posttrain's rollout.batch_size)
    group_size: int = 8               # completions per prompt (online; rollout.group_size)
    new_tokens: int = 512             # longest completion (online; rollout.max_new_tokens)
    reference_dtype: str | None = None  # None: the weight dtype (what posttrain does; others: not in posttrain)
    rollout_backend: str = "hf"       # online: hf (the own sampler's KV cache) or vllm (a colocated engine)
    vllm_memory_utilization: float = 0.3  # rollout.vllm.gpu_memory_utilization
    vllm_sleep: bool = True           # rollout.vllm.sleep: the engine frees its memory while the trainer runs

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"Unknown method {self.method!r} for the planner; it knows {', '.join(METHODS)}.",
                              fix="name one of those (--method).")
        if self.rollout_backend not in ("hf", "vllm"):
            raise ConfigError(f"Unknown rollout backend {self.rollout_backend!r}.", fix="use hf or vllm.")
        u = self.vllm_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ConfigError(f"{setting('--vllm-memory-utilization')} is {u!r}; it is a share of the device's "
                              "memory.", fix="pass a number in (0, 1], e.g. 0.3.")
        if self.sharding not in ("none", "zero2", "zero3", "fsdp"):
            raise ConfigError(f"Unknown sharding {self.sharding!r}.", fix="use none, zero2, zero3 or fsdp.")
        if self.peft not in ("none", "lora", "qlora"):
            raise ConfigError(f"Unknown peft {self.peft!r}.", fix="use none, lora or qlora.")
        for name in ("weight_dtype", "activation_dtype", "reference_dtype"):
            value = getattr(self, name)
            if value not in BYTES and not (name == "reference_dtype" and value is None):
                raise ConfigError(f"Unknown {name} {value!r}.", fix=f"use one of {sorted(BYTES)}.")
        for name in ("seq_len", "micro_batch", "devices", "lora_r", "chunk_rows", "rollout_batch", "group_size",
                     "new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{setting(FLAGS[name])} is {value!r}; it counts "
                                  f"{_COUNTS[name]}, so it must be a whole number of at least 1.",
                                  fix=f"pass {FLAGS[name]} N with N >= 1 (see posttrain plan --help for its default).")
        mem = self.device_memory_gib
        if (isinstance(mem, bool) or not isinstance(mem, (int, float)) or not math.isfinite(mem) or mem <= 0):
            raise ConfigError(f"{setting('--device-memory')} is {mem!r}; it is the memory of one device in GiB, so "
                              "it must be a finite number above 0.",
                              fix="pass the device's memory, e.g. --device-memory 80 for an 80 GB H100 (or the "
                              "memory you want to leave to the run).")


_COUNTS = {"seq_len": "the tokens of a sequence (online methods: of the prompt)",
           "micro_batch": "the sequences (pairs for preference methods) of one forward pass",
           "devices": "the devices", "lora_r": "the LoRA rank", "chunk_rows": "the rows of a log-prob chunk",
           "rollout_batch": "the sequences decoded together", "group_size": "the completions per prompt",
           "new_tokens": "the tokens of the longest completion"}


def sequence_tokens(p: PlanInput) -> int:
    """The tokens of one trained sequence, as the activations, logits and KV cache count them:
    ``seq_len``, or for online methods the prompt (``seq_len``) plus the completion (``new_tokens``)."""
    return p.seq_len + p.new_tokens if p.method in ONLINE else p.seq_len


def sequences_per_micro_batch(p: PlanInput) -> int:
    """Sequences in one forward pass: preference pairs count two (chosen and rejected)."""
    return p.micro_batch * (2 if p.method in PREFERENCE and p.method not in UNPAIRED else 1)


def rollout_rows(p: PlanInput) -> int:
    """Sequences the rollout decodes together: posttrain's sampler takes ``max(1, rollout_batch //
    group_size)`` prompts at a time and repeats each one's prompt cache ``group_size`` times."""
    return max(1, p.rollout_batch // p.group_size) * p.group_size


def needs_reference_copy(p: PlanInput) -> bool:
    """Whether the method holds a frozen reference copy (none with LoRA: the adapter-disabled model)."""
    online = p.method in ONLINE
    needs_ref = ((p.method in PREFERENCE and p.method not in REFERENCE_FREE) or p.method == "online-dpo"
                 or (online and p.kl and p.method != "online-dpo"))
    return needs_ref and p.peft == "none"


def optimizer_bytes(p: PlanInput, *, adapters: bool) -> int:
    """AdamW state per trainable parameter: torch keeps both moments in the parameter's dtype (fp32
    weights and LoRA adapters: 8 bytes; bf16 weights: 4, and no fp32 master copy); DeepSpeed ZeRO with
    bf16 weights keeps an fp32 master partition and fp32 moments (12)."""
    if adapters or p.weight_dtype == "float32":
        return 8
    if p.sharding in ("zero2", "zero3"):
        return 12
    return 2 * BYTES[p.weight_dtype]


def check_model_limits(shape: ModelShape, p: PlanInput) -> None:
    """Refuse sequences longer than the model's position limit, naming the flags and the limit."""
    limit = shape.max_positions
    if limit is None:
        return
    where = f"{shape.source or 'the model'}'s position limit of {limit:,} tokens (max_position_embeddings" + (
        ")" if shape.positions_given else "; config.json gives none, so this is its config class's default)")
    if p.method in ONLINE and p.seq_len + p.new_tokens > limit:
        room = limit - p.seq_len
        raise ConfigError(f"--seq-len {p.seq_len:,} (the prompt) + --new-tokens {p.new_tokens:,} = "
                          f"{p.seq_len + p.new_tokens:,} tokens per sequence, past {where}.",
                          fix=(f"lower --new-tokens to at most {room:,}, or --seq-len, so that the two add up to at "
                               f"most {limit:,}." if room >= 1 else
                               f"lower --seq-len below {limit:,} and --new-tokens so that the two add up to at most "
                               f"{limit:,}."))
    if p.method not in ONLINE and p.seq_len > limit:
        raise ConfigError(f"--seq-len {p.seq_len:,} is past {where}.",
                          fix=f"lower --seq-len to at most {limit:,} (or name your model with --model).")


def lora_params(shape: ModelShape, r: int) -> int:
    """Adapter parameters of LoRA rank ``r`` on every linear layer but the head (all-linear)."""
    return sum(r * (i + o) for i, o in shape.lora_dims)


def estimate(shape: ModelShape, p: PlanInput) -> dict[str, float]:
    """Bytes per device, by component (see the module docstring)."""
    p.check()
    wb, ab = BYTES[p.weight_dtype], BYTES[p.activation_dtype]
    n = p.devices
    shard_w = n if p.sharding in ("zero3", "fsdp") else 1
    shard_go = n if p.sharding in ("zero2", "zero3", "fsdp") else 1
    out: dict[str, float] = {}
    if p.peft == "qlora":
        other = shape.params - shape.linear_params
        out["weights"] = (shape.linear_params * (0.5 + 1 / 32) + other * wb) / shard_w
    else:
        out["weights"] = shape.params * wb / shard_w
    trainable = lora_params(shape, p.lora_r) if p.peft != "none" else shape.params
    if p.peft != "none":
        out["weights"] += trainable * 4   # adapters train in fp32
    gb = 4 if p.peft != "none" else wb
    out["gradients"] = trainable * gb / shard_go
    out["optimizer"] = trainable * optimizer_bytes(p, adapters=p.peft != "none") / shard_go
    online = p.method in ONLINE
    tokens = sequences_per_micro_batch(p) * sequence_tokens(p)
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    per_layer = 9 * h + 3 * kv + 4 * i
    if p.gradient_checkpointing:
        out["activations"] = tokens * (shape.layers * h + per_layer + 4 * h) * ab
    else:
        out["activations"] = tokens * (shape.layers * per_layer + 4 * h) * ab
    rows = min(tokens, p.chunk_rows) if p.chunked_logprobs else tokens
    out["logits"] = 3 * rows * shape.vocab * 4
    frozen = shape.params * wb / shard_w
    if needs_reference_copy(p):
        out["reference"] = shape.params * BYTES[p.reference_dtype or p.weight_dtype] / shard_w
    if p.method == "ppo":
        out["critic"] = shape.params * wb / shard_w + shape.params * optimizer_bytes(p, adapters=False) / shard_go
        out["critic_gradients"] = shape.params * wb / shard_go
        out["critic_activations"] = out["activations"]
    if online and p.reward_model:
        out["reward_model"] = frozen
    if online and p.rollout_backend == "vllm":
        # the engine takes its share of the device for its weights copy and KV cache; asleep it frees
        # both while the trainer runs, awake it holds them for the whole run
        share = p.vllm_memory_utilization * p.device_memory_gib * GIB
        out["vllm_engine" if p.vllm_sleep else "vllm_engine_resident"] = share
    elif online:
        out["kv_cache"] = 2 * shape.layers * kv * sequence_tokens(p) * rollout_rows(p) * wb
    return out


#: components alive during the whole run; the rest are the training step's (forward activations
#: and logits, or the gradients once the backward pass has freed them) and the rollouts' KV cache
STATIC = ("weights", "optimizer", "reference", "critic", "reward_model", "vllm_engine_resident")


def peak_bytes(parts: dict[str, float]) -> float:
    """The peak: what stays + the larger of the training step's peak and the rollouts' cache.
    Within a step the forward's activations (and logits) peak before the backward pass allocates
    the gradients (they are freed between steps), so the step counts the larger of the two."""
    static = sum(v for k, v in parts.items() if k in STATIC)
    forward = sum(parts.get(k, 0.0) for k in ("activations", "logits", "critic_activations"))
    backward = parts.get("gradients", 0.0) + parts.get("critic_gradients", 0.0)
    return static + max(forward, backward, parts.get("kv_cache", 0.0), parts.get("vllm_engine", 0.0))


@dataclass
class Verdict:
    total: float
    fits: bool
    advice: str
    changes: list[str] = field(default_factory=list)   # the suggested combination, cheapest first


@dataclass
class _Try:
    text: str
    change: dict
    kept: bool = True         # stays applied for the later tries
    supported: bool = True    # posttrain can run it
    lossy: str = ""           # what it changes: "precision" (bf16 weights) or "capacity" (LoRA, QLoRA)


def _bf16_weights_text(p: PlanInput) -> str:
    if p.sharding in ("zero2", "zero3"):
        return ("bf16 weights (model.dtype=bfloat16; DeepSpeed keeps fp32 master weights and AdamW moments in its "
                "partitions)")
    ref = " and the frozen reference" if needs_reference_copy(p) else ""
    return (f"bf16 weights (model.dtype=bfloat16: weights, gradients, AdamW moments{ref} in bf16, with no fp32 "
            "master copy, so an update below ~1/256 of a weight rounds away; mind small learning rates)")


def _tries(p: PlanInput) -> list[_Try]:
    """The changes the verdict tries, in order of what they cost the user: free ones (chunked
    log-probs, bf16 autocast), slower steps (smaller micro-batches), communication (sharding),
    gradient checkpointing (recompute), then precision (bf16 weights) and capacity (LoRA, QLoRA); then what
    posttrain does not do."""
    tries: list[_Try] = []
    if not p.chunked_logprobs:
        tries.append(_Try("chunked log-probs (the default)", {"chunked_logprobs": True}))
    if p.weight_dtype == "float32" and p.activation_dtype == "float32":
        tries.append(_Try("bf16 autocast over the fp32 weights (train.mixed_precision=bf16; GPUs)",
                          {"activation_dtype": "bfloat16"}))
    mb = p.micro_batch
    while mb > 1:
        mb //= 2
        tries.append(_Try(f"micro-batch {mb} ({p.micro_batch // mb}x the gradient accumulation)", {"micro_batch": mb}))
    if not p.gradient_checkpointing:
        # same results, ~25-35% more compute: each layer's input kept, one layer's set recomputed at a time
        tries.append(_Try("gradient checkpointing (train.gradient_checkpointing=true; ~25-35% more compute)",
                          {"gradient_checkpointing": True}))
    if p.devices > 1 and p.sharding == "none" and p.method not in ONLINE and p.peft == "none":
        # ZeRO-2 keeps whole weights, so the fused, chunked head stays
        tries.append(_Try("DeepSpeed ZeRO-2 (train.sharding=zero2)", {"sharding": "zero2"}, kept=False))
    if p.devices > 1 and p.sharding in ("none", "zero2") and p.method not in ONLINE and p.peft == "none":
        # posttrain's FSDP2 and ZeRO-3 compute full logits (no fused, chunked head under sharded weights)
        tries.append(_Try("FSDP2 or DeepSpeed ZeRO-3 sharding (train.sharding=fsdp2 / zero3; full logits)",
                          {"sharding": "fsdp", "chunked_logprobs": False}, kept=False))
    if p.weight_dtype == "float32":
        tries.append(_Try(_bf16_weights_text(p), {"weight_dtype": "bfloat16", "activation_dtype": "bfloat16"},
                          lossy="precision"))
    if p.peft == "none":
        tries.append(_Try("LoRA (model.peft.method=lora)", {"peft": "lora"}, lossy="capacity"))
    if p.peft != "qlora":
        tries.append(_Try("QLoRA (model.peft.quantize=nf4)", {"peft": "qlora"}, lossy="capacity"))
    # what the estimate knows but posttrain's engine does not do yet
    if p.devices > 1 and p.sharding in ("none", "zero2"):
        tries.append(_Try("sharding weights, gradients and optimizer state with chunked log-probs (zero3; posttrain's "
                          "sharding computes full logits and does not shard sampling methods or adapters)",
                          {"sharding": "zero3"}, supported=False))
    return tries


def verdict(shape: ModelShape, p: PlanInput) -> Verdict:
    """Whether the plan fits ``device_memory_gib``, else the cheapest change that makes it fit.

    The changes of :func:`_tries` are tried in order, each on top of the earlier ones that are
    kept (sharding is tried on its own); the first combination that fits is reported, less any
    earlier change it does not need. When that combination changes precision (bf16 weights), the
    first change of capacity (LoRA, QLoRA) that fits instead of it is named too; and when it
    changes either, so is a bf16 frozen reference under fp32 weights (which posttrain does not do:
    its reference is a copy in ``model.dtype``) where that would fit instead. Only if nothing
    posttrain supports fits are the changes it does not support tried."""
    budget = p.device_memory_gib * GIB

    def peak(steps: list[_Try], extra: dict | None = None) -> float:
        d = dict(p.__dict__)
        for s in steps:
            d.update(s.change)
        return peak_bytes(estimate(shape, PlanInput(**{**d, **(extra or {})})))

    def walk(candidates: list[_Try], applied: list[_Try]) -> tuple[list[_Try], _Try | None]:
        for t in candidates:
            if peak(applied + [t]) <= budget:
                return applied, t
            if t.kept:
                applied = applied + [t]
        return applied, None

    def prune(applied: list[_Try], hit: _Try) -> list[_Try]:
        keep = list(applied)
        for s in reversed(applied):
            trial = [x for x in keep if x is not s]
            if peak(trial + [hit]) <= budget:
                keep = trial
        return keep + [hit]

    def gib(x: float) -> str:
        return f"{x / GIB:,.1f} GiB" if x >= GIB else f"{x / 2**20:,.0f} MiB"

    total = peak([])
    if total <= budget:
        return Verdict(total, True, f"fits: {gib(total)} of {p.device_memory_gib:g} GiB "
                                    f"({gib(budget - total)} to spare; keep 1-2 GiB for the CUDA context and the "
                                    "allocator)")
    head = f"does not fit: {gib(total)} of {p.device_memory_gib:g} GiB per device"
    tries = _tries(p)
    supported = [t for t in tries if t.supported]
    applied, hit = walk(supported, [])
    cheap = [s for s in applied if not s.lossy]
    if hit is not None:
        steps = prune(applied, hit)
        lines = [head, f"  cheapest change that fits: {' + '.join(s.text for s in steps)}: {gib(peak(steps))}"]
        if hit.lossy:
            for t in supported[supported.index(hit) + 1:]:
                if t.lossy and t.lossy != hit.lossy and peak(cheap + [t]) <= budget:
                    alt = prune(cheap, t)
                    lines.append(f"  or instead: {' + '.join(s.text for s in alt)}: {gib(peak(alt))}")
                    break
    else:
        more, hit = walk([t for t in tries if not t.supported], applied)
        if hit is not None:
            steps = prune(more, hit)
            lines = [head, "  nothing posttrain does today fits; it would fit with "
                           f"{' + '.join(s.text for s in steps)}: {gib(peak(steps))}"]
        else:   # less the steps a later one overrides (micro-batch 2 by 1, LoRA by QLoRA)
            steps = [s for i, s in enumerate(more)
                     if not set(s.change) <= {k for later in more[i + 1:] for k in later.change}]
            lines = [head, f"  not even with {' + '.join(s.text for s in steps) or 'the changes the planner knows'}: "
                           f"{gib(peak(more))}; use more or larger devices"]
    q = PlanInput(**{**p.__dict__, **{k: v for s in cheap for k, v in s.change.items()}})
    ref16 = _Try("a bf16 frozen reference under the fp32 weights (not in posttrain yet: its reference is a copy in "
                 "model.dtype)", {"reference_dtype": "bfloat16"}, supported=False)
    if ((hit is None or hit.lossy) and needs_reference_copy(q) and q.weight_dtype == "float32"
            and peak(cheap + [ref16]) <= budget):
        alt = prune(cheap, ref16)
        lines.append(f"  or instead: {' + '.join(s.text for s in alt)}: {gib(peak(alt))}")
    return Verdict(total, False, "\n".join(lines), [s.text for s in steps])


def table(parts: dict[str, float]) -> str:
    unit, scale = ("GiB", GIB) if peak_bytes(parts) >= GIB else ("MiB", 2**20)
    rows = [f"| {k} | {v / scale:,.2f} | {'whole run' if k in STATIC else 'step / rollout'} |" for k, v in parts.items()]
    return "\n".join([f"| component | {unit} per device | held |", "|---|---|---|", *rows,
                      f"| **peak** | **{peak_bytes(parts) / scale:,.2f}** | whole run + max(forward, gradients, "
                      "KV cache) |"])


def describe(shape: ModelShape, p: PlanInput, name: str = "") -> str:
    """The model and every assumption the estimate uses, one line each, naming the flag that sets it."""
    online = p.method in ONLINE
    kinds = {"sft": "supervised fine-tuning", "rm": "reward model"}
    if p.method in PREFERENCE:
        kind = "preference, " + ("one sequence per example" if p.method in UNPAIRED else "chosen + rejected per pair")
    else:
        kind = kinds.get(p.method, "online: rollouts, then training steps on them")
    ref = ("frozen copy in " + (p.reference_dtype or p.weight_dtype) if needs_reference_copy(p)
           else "the adapter-disabled model (no copy)" if p.peft != "none" and needs_reference_copy(
               PlanInput(**{**p.__dict__, "peft": "none"})) else "none")
    adapters = p.peft != "none"
    opt = optimizer_bytes(p, adapters=adapters)
    opt_text = {8: "2 x float32", 4: f"2 x {p.weight_dtype}, no fp32 master copy",
                12: "fp32 master + 2 x float32 (DeepSpeed)"}[opt]
    limit = ("none in the config" if shape.max_positions is None else f"{shape.max_positions:,}"
             + ("" if shape.positions_given else " (config class default; config.json gives none)"))
    lines = [
        f"{name or shape.source or 'model'}: {shape.params / 1e6:,.1f}M parameters ({shape.layers} layers, hidden "
        f"{shape.hidden:,}, {shape.heads} heads / {shape.kv_heads} key-value heads, MLP {shape.intermediate:,}, "
        f"vocab {shape.vocab:,}, position limit {limit})",
        "assumptions (flags of posttrain plan; defaults in --help):",
        f"  method       {p.method} ({kind})",
    ]
    if online:
        lines.append(f"  tokens       {sequence_tokens(p):,} per sequence, as every row below counts them: "
                     f"{p.seq_len:,} prompt (--seq-len) + {p.new_tokens:,} new (--new-tokens)")
    else:
        lines.append(f"  tokens       {sequence_tokens(p):,} per sequence (--seq-len)")
    seqs = sequences_per_micro_batch(p)
    unit = ("pair" if seqs == 2 * p.micro_batch else "sequence") + ("s" if p.micro_batch > 1 else "")
    lines.append(f"  micro-batch  {p.micro_batch} {unit} (--micro-batch) = {seqs} x {sequence_tokens(p):,} = "
                 f"{seqs * sequence_tokens(p):,} tokens per forward and backward")
    if online and p.rollout_backend == "vllm":
        lines.append(f"  rollouts     a colocated vLLM engine (--rollout-backend vllm) holding "
                     f"{p.vllm_memory_utilization:g} of the device (--vllm-memory-utilization) for its weights and KV "
                     "cache, " + ("asleep while the trainer runs (the default; --no-vllm-sleep keeps it awake)" if p.vllm_sleep else
                                  "awake for the whole run (--no-vllm-sleep)")
                     + (", plus a reward model" if p.reward_model else ""))
    elif online:
        prompts = max(1, p.rollout_batch // p.group_size)
        lines.append(f"  rollouts     {rollout_rows(p)} sequences decoded together: {prompts} prompts x {p.group_size} "
                     f"completions (--rollout-batch {p.rollout_batch}, --group-size {p.group_size}); KV cache in "
                     f"{p.weight_dtype}" + (", plus a reward model" if p.reward_model else ""))
    autocast = "bf16" if p.activation_dtype == "bfloat16" and p.weight_dtype == "float32" else "no"
    lines.append(f"  precision    weights {p.weight_dtype} (--dtype), gradients "
                 f"{'float32 (adapters)' if adapters else p.weight_dtype}, AdamW moments {opt_text}, activations "
                 f"{p.activation_dtype} (--mixed-precision {autocast}), logits float32; reference: {ref}")
    lines.append(f"  devices      {p.devices} x {p.device_memory_gib:g} GiB (--devices, --device-memory), sharding "
                 f"{p.sharding}, peft {p.peft}{f' r={p.lora_r}' if adapters else ''}, "
                 f"{'chunked log-probs (' + str(p.chunk_rows) + ' rows)' if p.chunked_logprobs else 'full logits'}, "
                 f"{'' if p.gradient_checkpointing else 'no '}gradient checkpointing")
    return "\n".join(lines)


def report(shape: ModelShape, p: PlanInput, name: str = "") -> str:
    """What ``posttrain plan`` prints: the model and the assumptions, the table, the verdict."""
    p.check()
    check_model_limits(shape, p)
    return "\n".join([describe(shape, p, name), table(estimate(shape, p)), verdict(shape, p).advice])


def load_model_config(name_or_path: str):
    """A transformers config from a model directory, a config.json, a hub id (cached or
    reachable) or builtin:tiny-world-base; never runs repository code."""
    from .models.loading import load_model_config as load

    return load(name_or_path, key="--model")


def parse_count(text: str) -> int:
    """argparse type of the planner's counts: a whole number (its range is :meth:`PlanInput.check`'s)."""
    import argparse

    try:
        return int(str(text).strip().replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number. Fix: pass a whole number of at least 1 "
                                         "(see posttrain plan --help for the default).") from None


def parse_gib(text: str) -> float:
    """argparse type of ``--device-memory``: a number of GiB (finite and above 0: :meth:`PlanInput.check`)."""
    import argparse

    try:
        return float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB. Fix: pass the number alone, e.g. "
                                         "--device-memory 80 for an 80 GB GPU.") from None


__all__ = ["CONFIG_FIELDS", "FLAGS", "METHODS", "STATIC", "ModelShape", "PlanInput", "Verdict", "check_config_fields",
           "check_model_limits", "describe", "estimate", "load_model_config", "load_model_shape", "lora_params",
           "model_shape", "optimizer_bytes", "parse_count", "parse_gib", "peak_bytes", "report", "rollout_rows",
           "sequence_tokens", "table", "verdict"]
