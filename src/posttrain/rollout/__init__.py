"""Rollouts: the backend interface (:mod:`.backend`) every sampling method goes through, and the
own sampler (:mod:`.sampler`), its first implementation."""

from .backend import (
    BACKENDS,
    HFSampler,
    RolloutBackend,
    RolloutRequest,
    SamplingParams,
    backend_for,
    generate_shared,
    make_backend,
    my_share,
    place_groups,
    requests,
)
from .config import BackendConfig, VLLMConfig
from .sampler import Rollout, stop_token_ids

__all__ = ["BACKENDS", "BackendConfig", "HFSampler", "Rollout", "RolloutBackend", "RolloutRequest", "SamplingParams",
           "VLLMConfig", "backend_for", "generate_shared", "make_backend", "my_share", "place_groups", "requests", "stop_token_ids"]
