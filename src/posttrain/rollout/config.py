"""The rollout-backend settings every sampling command shares: ``<section>.backend`` (``hf``: the
own sampler; ``vllm``: a colocated vLLM engine) and ``<section>.vllm.*``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import option
from ..errors import ConfigError

BACKEND_HELP = ("Rollout backend: hf (the own sampler: the default, exact resume, fastest for the tiny world "
                "on a CPU) or vllm (a colocated vLLM engine, weights synced before every rollout; needs the "
                "vllm extra, see docs/vllm.md).")


@dataclass
class VLLMConfig:
    """The colocated vLLM engine (``backend=vllm``); one engine per process, no tensor parallelism."""

    max_model_len: int | None = option(None, "Longest prompt + completion the engine serves (null: what the "
                                             "command's prompt and completion limits need, rounded up to a power "
                                             "of two and at least 2048, at most the model's position limit).",
                                       min=16)
    gpu_memory_utilization: float = option(0.3, "GPU only: the fraction of GPU memory vLLM may take for weights "
                                                "and KV cache (the trainer needs the rest).", gt=0.0, max=1.0)
    cpu_kv_cache_gib: float = option(1.0, "CPU only: the engine's KV cache in GiB (on a CPU vLLM otherwise "
                                          "reserves gpu_memory_utilization of the machine's RAM).", gt=0.0)
    sleep: bool = option(True, "GPU only: put the engine to sleep (free its KV cache and weights copy) while the "
                               "trainer runs, wake it for each rollout.")
    enforce_eager: bool = option(True, "Run the engine without torch.compile / CUDA graphs (starts in seconds "
                                       "instead of minutes; on a GPU, false is faster once started).")
    prefix_caching: bool = option(True, "Reuse the KV cache of shared prompt prefixes (the G samples of a "
                                        "prompt, the turns of an episode).")
    check_tolerance: float | None = option(None, "Right after each weight sync, the engine's log-probs of the "
                                                 "first sampled sequence must match the trainer's within this "
                                                 "mean absolute difference per token, else the run stops (null: "
                                                 "1e-3 in float32, 0.1 in bfloat16 / float16; 0: never stop).",
                                           min=0.0)


@dataclass
class BackendConfig:
    """Mixed into a command's sampling section: which backend samples and its vLLM settings."""

    backend: str = option("hf", BACKEND_HELP, choices=("hf", "vllm"))
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


def check_backend(section, train, name: str) -> None:
    """Refuse what the vLLM backend does not serve, naming ``<name>.backend`` and the fix."""
    if getattr(section, "backend", "hf") != "vllm":
        return
    sharding = getattr(train, "sharding", "none")
    if sharding not in ("none", None):
        raise ConfigError(
            f"{name}.backend=vllm syncs whole weights from each process's model, but train.sharding={sharding} "
            "splits the model over the processes.",
            fix=f"use train.sharding=none (data parallel: each process drives its own engine), or {name}.backend=hf.")
