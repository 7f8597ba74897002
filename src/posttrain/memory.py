"""A memory planner: will a run fit, and if not, what is the cheapest change that makes it fit?

    posttrain plan --model meta-llama/Llama-3.1-8B --method dpo --seq-len 2048 --micro-batch 4 \\
        --devices 8 --device-memory 80 --sharding zero3

Per device it adds up (bytes):

* **weights**: parameters x bytes of the weight dtype (QLoRA: 4-bit linear layers at 0.5 byte
  per weight plus one fp32 absmax per 64 weights, quantized again in double quantization to
  ~1/32 byte per weight, other parameters in the compute dtype);
* **gradients** of the trainable parameters (in the weight dtype);
* **optimizer state**: AdamW keeps two fp32 moments per trainable parameter (8 bytes);
* **activations** kept for the backward pass, per token and layer (elements, times the
  activation dtype's bytes): the attention block's RMSNorm (input, statistics, output: ``3h``),
  q, k, v (``h + 2kv``), rotated q and k (``h + kv``), the attention output (``h``); the SwiGLU
  MLP's RMSNorm (``3h``), gate, up, the activated gate and the product (``4i``): ``9h + 3kv +
  4i`` per layer, plus ``4h`` per token for the embedding output and the final norm. Attention
  is the memory-efficient kernel (SDPA / flash), which stores no T x T matrix. With gradient
  checkpointing only each layer's input (``h``) is kept, plus one layer's full set during its
  recomputation;
* **logits**: the LM head's (B, T, V) output in fp32 with its log-softmax and gradient (3
  buffers), or with chunked log-probs (posttrain's default) 3 buffers of ``chunk_rows x V``;
* **copies** the method needs: a frozen reference (DPO family except the reference-free ones;
  online presets with a KL term) unless LoRA makes the reference the adapter-disabled model; a
  critic with its gradients and optimizer (PPO); a reward model (PPO / online with a learned
  reward);
* **KV cache** for online rollouts: ``2 x layers x kv_heads x head_dim x (prompt + new tokens)``
  per sequence, for ``rollout_batch`` sequences in the weight dtype.

The **peak** is what stays for the whole run (weights, optimizer state, frozen copies) plus the
largest of: the forward pass's activations and logits, the gradients (the backward pass frees
activations as it allocates gradients, and gradients are freed between steps), and the
rollouts' KV cache.

Sharding divides what it shards by the number of devices: ``zero2`` the gradients and
optimizer state, ``zero3`` / ``fsdp`` also the weights (of the trained model and of the frozen
copies). The model is what the architecture's config says; parameters are counted on the meta
device (no weights are read, no repository code runs).

Limits (docs/memory.md): the estimate leaves out the framework's own overhead (CUDA context,
allocator fragmentation, communication buffers; budget ~1-2 GiB per GPU), temporary buffers of
single operations beyond the logits, and the memory of ``generate`` besides the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PREFERENCE = ("dpo", "dpop", "hinge", "ipo", "kto", "orpo", "simpo", "tilt")
REFERENCE_FREE = ("orpo", "simpo")
ONLINE = ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "remax", "reinforce_pp", "ppo", "online-dpo")
METHODS = ("sft", "rm") + PREFERENCE + ONLINE


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


def model_shape(config) -> ModelShape:
    """Count a transformers config's parameters on the meta device (nothing is allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
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
                      intermediate=getattr(config, "intermediate_size", 4 * hidden),
                      layers=config.num_hidden_layers, heads=heads,
                      kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                      vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)))


@dataclass
class PlanInput:
    method: str = "sft"
    seq_len: int = 2048
    micro_batch: int = 1
    devices: int = 1
    device_memory_gib: float = 80.0
    sharding: str = "none"            # none | zero2 | zero3 | fsdp
    weight_dtype: str = "float32"     # the trained weights (and gradients)
    activation_dtype: str = "float32"  # bfloat16 under train.mixed_precision=bf16
    peft: str = "none"                # none | lora | qlora
    lora_r: int = 16
    gradient_checkpointing: bool = False
    chunked_logprobs: bool = True
    chunk_rows: int = 256
    reward_model: bool = False        # online methods with a learned reward model
    kl: bool = True                   # online methods: a KL term needs the reference
    rollout_batch: int = 64           # sequences decoded together (online)
    new_tokens: int = 512             # longest completion (online)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"Unknown method {self.method!r} for the planner; it knows {', '.join(METHODS)}.",
                              fix="name one of those (--method).")
        if self.sharding not in ("none", "zero2", "zero3", "fsdp"):
            raise ConfigError(f"Unknown sharding {self.sharding!r}.", fix="use none, zero2, zero3 or fsdp.")
        if self.peft not in ("none", "lora", "qlora"):
            raise ConfigError(f"Unknown peft {self.peft!r}.", fix="use none, lora or qlora.")
        for name in ("weight_dtype", "activation_dtype"):
            if getattr(self, name) not in BYTES:
                raise ConfigError(f"Unknown {name} {getattr(self, name)!r}.", fix=f"use one of {sorted(BYTES)}.")
        for name in ("seq_len", "micro_batch", "devices", "lora_r", "chunk_rows", "rollout_batch", "new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)}).", fix=f"raise {name}.")


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
    out["optimizer"] = trainable * 8 / shard_go
    online = p.method in ONLINE
    seqs = p.micro_batch * (2 if p.method in PREFERENCE and p.method not in ("kto", "tilt") else 1)
    tokens = seqs * (p.seq_len if not online else p.seq_len + p.new_tokens)
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    per_layer = 9 * h + 3 * kv + 4 * i
    if p.gradient_checkpointing:
        out["activations"] = tokens * (shape.layers * h + per_layer + 4 * h) * ab
    else:
        out["activations"] = tokens * (shape.layers * per_layer + 4 * h) * ab
    rows = min(tokens, p.chunk_rows) if p.chunked_logprobs else tokens
    out["logits"] = 3 * rows * shape.vocab * 4
    needs_ref = ((p.method in PREFERENCE and p.method not in REFERENCE_FREE) or p.method == "online-dpo"
                 or (online and p.kl and p.method != "online-dpo"))
    frozen = shape.params * wb / shard_w
    if needs_ref and p.peft == "none":
        out["reference"] = frozen
    if p.method == "ppo":
        out["critic"] = shape.params * wb / shard_w + shape.params * 8 / shard_go
        out["critic_gradients"] = shape.params * wb / shard_go
        out["critic_activations"] = out["activations"]
    if online and p.reward_model:
        out["reward_model"] = frozen
    if online:
        out["kv_cache"] = (2 * shape.layers * kv * (p.seq_len + p.new_tokens) * p.rollout_batch * wb)
    return out


#: components alive during the whole run; the rest are the training step's (forward activations
#: and logits, or the gradients once the backward pass has freed them) and the rollouts' KV cache
STATIC = ("weights", "optimizer", "reference", "critic", "reward_model")


def peak_bytes(parts: dict[str, float]) -> float:
    """The peak: what stays + the larger of the training step's peak and the rollouts' cache.
    Within a step the forward's activations (and logits) peak before the backward pass allocates
    the gradients (they are freed between steps), so the step counts the larger of the two."""
    static = sum(v for k, v in parts.items() if k in STATIC)
    forward = sum(parts.get(k, 0.0) for k in ("activations", "logits", "critic_activations"))
    backward = parts.get("gradients", 0.0) + parts.get("critic_gradients", 0.0)
    return static + max(forward, backward, parts.get("kv_cache", 0.0))


@dataclass
class Verdict:
    total: float
    fits: bool
    advice: str


def verdict(shape: ModelShape, p: PlanInput) -> Verdict:
    """Whether the plan fits ``device_memory_gib``, else the cheapest change that makes it fit
    (tried in order: chunked log-probs, gradient checkpointing, smaller micro-batches, LoRA,
    QLoRA, sharding)."""
    total = peak_bytes(estimate(shape, p))
    budget = p.device_memory_gib * GIB
    if total <= budget:
        return Verdict(total, True, f"fits: {total / GIB:.1f} of {p.device_memory_gib:g} GiB")
    # (text, change, kept): a kept change stays applied for the later tries; FSDP2 sharding is tried
    # on its own, because posttrain does not shard adapters
    tries: list[tuple[str, dict, bool]] = []
    if not p.chunked_logprobs:
        tries.append(("chunked log-probs (the default)", {"chunked_logprobs": True}, True))
    mb = p.micro_batch
    while mb > 1:
        mb //= 2
        tries.append((f"micro-batch {mb} ({p.micro_batch // mb}x the gradient accumulation)", {"micro_batch": mb},
                      True))
    if p.devices > 1 and p.sharding == "none" and p.method not in ONLINE and p.peft == "none":
        # ZeRO-2 keeps whole weights, so the fused, chunked head stays
        tries.append(("DeepSpeed ZeRO-2 (train.sharding=zero2)", {"sharding": "zero2"}, False))
    if p.devices > 1 and p.sharding in ("none", "zero2") and p.method not in ONLINE and p.peft == "none":
        # posttrain's FSDP2 and ZeRO-3 compute full logits (no fused, chunked head under sharded weights)
        tries.append(("FSDP2 or DeepSpeed ZeRO-3 sharding (train.sharding=fsdp2 / zero3; full logits)",
                      {"sharding": "fsdp", "chunked_logprobs": False}, False))
    if p.peft == "none":
        tries.append(("LoRA (model.peft.method=lora)", {"peft": "lora"}, True))
    if p.peft != "qlora":
        tries.append(("QLoRA (model.peft.quantize=nf4)", {"peft": "qlora"}, True))
    # what the estimate knows but posttrain's engine does not do yet
    if not p.gradient_checkpointing:
        tries.append(("gradient checkpointing (not in posttrain yet)", {"gradient_checkpointing": True}, True))
    if p.devices > 1 and p.sharding in ("none", "zero2"):
        tries.append(("sharding weights, gradients and optimizer state with chunked log-probs (zero3; posttrain's "
                      "sharding computes full logits and does not shard sampling methods or adapters)",
                      {"sharding": "zero3"}, True))
    applied: dict = {}
    steps: list[str] = []
    for text, change, kept in tries:
        q = PlanInput(**{**p.__dict__, **applied, **change})
        t = peak_bytes(estimate(shape, q))
        if t <= budget:
            return Verdict(total, False, f"does not fit: {total / GIB:.1f} GiB of {p.device_memory_gib:g}; "
                                         f"with {' + '.join(steps + [text])}: {t / GIB:.1f} GiB")
        if kept:
            applied.update(change)
            steps.append(text)
    return Verdict(total, False, f"does not fit: {total / GIB:.1f} GiB of {p.device_memory_gib:g}, not even with "
                                 f"{' + '.join(steps) or 'the changes the planner knows'}; use more or larger devices")


def table(parts: dict[str, float]) -> str:
    unit, scale = ("GiB", GIB) if peak_bytes(parts) >= GIB else ("MiB", 2**20)
    rows = [f"| {k} | {v / scale:,.2f} | {'whole run' if k in STATIC else 'step / rollout'} |" for k, v in parts.items()]
    return "\n".join([f"| component | {unit} per device | held |", "|---|---|---|", *rows,
                      f"| **peak** | **{peak_bytes(parts) / scale:,.2f}** | whole run + max(forward, gradients, "
                      "KV cache) |"])


def load_model_config(name_or_path: str):
    """A transformers config from a model directory, a config.json, a hub id (cached or
    reachable) or builtin:tiny-world-base; never runs repository code."""
    from .models.loading import load_model_config as load

    return load(name_or_path, key="--model")


__all__ = ["METHODS", "STATIC", "ModelShape", "PlanInput", "Verdict", "estimate", "load_model_config",
           "lora_params", "model_shape", "peak_bytes", "table", "verdict"]
