"""Which backend a command samples with: :func:`make_backend` by name, :func:`backend_for` from a
command's sampling section (``<section>.backend`` and ``<section>.vllm``)."""

from __future__ import annotations

from .backend import BACKENDS, HFSampler, RolloutBackend


def make_backend(name: str, model, tokenizer, **options) -> RolloutBackend:
    """The backend called ``name`` (``hf``: the own sampler; ``vllm``: a colocated vLLM engine,
    :class:`posttrain.rollout.vllm_engine.VLLMBackend`) over ``model``."""
    if name == "vllm":
        from .vllm_engine import VLLMBackend

        return VLLMBackend(model, tokenizer, **options)
    if name not in BACKENDS:
        raise ValueError(f"unknown rollout backend {name!r}; known: {', '.join(sorted([*BACKENDS, 'vllm']))}")
    return BACKENDS[name](model, tokenizer, **options)


def backend_for(section, model, tokenizer, *, key: str, max_model_len: int, batch_size: int = 64) -> RolloutBackend:
    """The backend a command's sampling section asks for (``<section>.backend``, with its
    ``<section>.vllm`` settings; a section without them: the own sampler). ``key``: that
    ``backend`` setting's full config key, named in errors; ``max_model_len``: the longest prompt +
    completion the command will request (the engine's default length)."""
    name = getattr(section, "backend", "hf")
    if name == "hf":
        return HFSampler(model, tokenizer, batch_size=batch_size)
    return make_backend(name, model, tokenizer, vllm=section.vllm, max_model_len=max_model_len, key=key)
