"""Rollouts: the backend interface (:mod:`.backend`) every sampling method goes through, the own
sampler (:mod:`.sampler`), the colocated vLLM engine (:mod:`.vllm_engine`) and the choice between
them (:mod:`.factory`, :mod:`.config`)."""

from .backend import (
    BACKENDS,
    HFSampler,
    RolloutBackend,
    RolloutRequest,
    SamplingParams,
    generate_shared,
    my_share,
    place_groups,
    requests,
)
from .config import BackendConfig, VLLMConfig
from .factory import backend_for, make_backend
from .sampler import Rollout, stop_token_ids

__all__ = ["BACKENDS", "BackendConfig", "HFSampler", "Rollout", "RolloutBackend", "RolloutRequest", "SamplingParams",
           "VLLMConfig", "backend_for", "generate_shared", "make_backend", "my_share", "place_groups", "requests",
           "stop_token_ids"]
