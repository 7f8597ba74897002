"""The rollout-backend interface: the one place where every method that learns from its own
samples (rl, rft, online-dpo, cai, prm Monte-Carlo labels, distill seqkd / on-policy, the judge,
evaluation) gets its completions.

A backend turns :class:`RolloutRequest` s (token ids in: a chat-rendered prompt, or a whole
conversation so far, which is continued as is and never re-tokenized) and one
:class:`SamplingParams` into :class:`~posttrain.rollout.sampler.Rollout` records (token ids
out, with each token's rollout-time log-prob and whether the row stopped by itself). Nothing
else crosses the interface, so the training loop does not know which engine sampled:

* ``generate(requests, sampling)`` returns ``len(requests) * sampling.n`` rollouts in request
  order (sample ``j`` of request ``i`` is element ``i * n + j``).
* Seeds: sample ``j`` of a request draws from ``(seed, group_id, j)``, ``seed`` being the
  request's own seed or ``sampling.seed``, ``group_id`` the request's id in the whole batch
  (default: its position). A backend that honours this returns the same samples whatever the
  batching or the split over processes (the own sampler does, bit for bit).
* Stops: the tokenizer's / model's EOS, ``sampling.stop_token_ids`` and ``sampling.stop``
  strings; ``Rollout.finish_reason`` is ``"stop"`` or ``"length"``.
* ``sync_weights(model)`` makes the next ``generate`` sample from ``model``'s current weights
  (the own sampler decodes the live model, so it only keeps the reference); ``close()`` frees
  what the backend holds.

:func:`generate_shared` is the data-parallel form: with N processes, process r generates the
requests r, r+N, ... and every process gets the whole batch, identical to one process's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..train.plan import gather_objects, rank_world
from .sampler import Rollout, sample_groups


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: ``n`` completions per request of at most ``max_new_tokens`` tokens, at
    ``temperature`` (0: greedy, the evaluation setting) with top-p / top-k filtering (0 / 1.0:
    off); ``seed`` for the requests without their own; extra stop token ids and stop strings."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"max_new_tokens and n must be at least 1, not {self.max_new_tokens} and {self.n}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"temperature >= 0, 0 < top_p <= 1 and top_k >= 0 are needed, not {self.temperature}, "
                             f"{self.top_p} and {self.top_k}")


@dataclass(frozen=True)
class RolloutRequest:
    """One prompt to complete: its token ids (continued as they are), its id in the whole batch
    (seeds its samples; ``None``: its position in the request list) and its own seed (``None``:
    the sampling seed)."""

    prompt_ids: Sequence[int]
    group_id: int | None = None
    seed: int | None = None


def requests(prompts: Sequence[Sequence[int]], group_ids: Sequence[int] | None = None) -> list[RolloutRequest]:
    """Requests for token-id prompts, with the given group ids (default: their positions)."""
    ids = range(len(prompts)) if group_ids is None else group_ids
    return [RolloutRequest(list(p), int(g)) for p, g in zip(prompts, ids, strict=True)]


class RolloutBackend(ABC):
    """What samples completions for the online methods (see the module docstring)."""

    name: str = "?"
    #: a separate serving engine (vLLM) that schedules its own batches and holds its own copy of the
    #: weights: callers hand it every request at once and reuse it (evaluation included)
    serving_engine: bool = False
    #: the last weight-sync check's mean |engine - trainer| log-prob per token (None: no check made)
    mismatch: float | None = None

    @abstractmethod
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> list[Rollout]:
        """``sampling.n`` rollouts of each request, in request order."""

    def sync_weights(self, model) -> None:  # noqa: B027 (a backend that decodes the live model has nothing to do)
        """Sample from ``model``'s current weights from the next ``generate`` on."""

    def release(self) -> None:  # noqa: B027
        """Free generation memory while the trainer runs (a vLLM engine on a GPU sleeps); the next
        ``sync_weights`` / ``generate`` takes it back."""

    def close(self) -> None:  # noqa: B027
        """Free what the backend holds (engines, caches)."""


@dataclass
class HFSampler(RolloutBackend):
    """The own sampler (:func:`posttrain.rollout.sampler.sample_groups`) over a Hugging Face
    causal LM (or a PeftModel: the LoRA layers decode with it): the CPU / default backend. It
    decodes the model it holds, so after an optimizer step it already samples from the new
    weights; ``sync_weights`` only swaps which model it holds. ``batch_size`` bounds the
    sequences decoded together and changes nothing but speed."""

    model: object
    tokenizer: object
    batch_size: int = 64
    name: str = field(default="hf", init=False)

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> list[Rollout]:
        if not requests:
            return []
        return sample_groups(
            self.model, self.tokenizer, [r.prompt_ids for r in requests], group_size=sampling.n,
            max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, seed=sampling.seed, batch_size=self.batch_size,
            group_ids=[i if r.group_id is None else r.group_id for i, r in enumerate(requests)],
            seeds=[sampling.seed if r.seed is None else r.seed for r in requests],
            extra_stop_ids=sampling.stop_token_ids, stop_strings=sampling.stop)

    def sync_weights(self, model) -> None:
        self.model = model


BACKENDS = {"hf": HFSampler}


def place_groups(parts: Sequence[tuple[Sequence[int], Sequence[Rollout]]], n_groups: int, n: int) -> list[Rollout]:
    """The whole batch's rollouts from the processes' shares ``(request positions, their rollouts)``."""
    full: list = [None] * (n_groups * n)
    for ps, rs in parts:
        for k, p in enumerate(ps):
            full[p * n:(p + 1) * n] = rs[k * n:(k + 1) * n]
    return full


def my_share(n_requests: int) -> list[int]:
    """The request positions this process generates: r, r+N, ... of ``n_requests``."""
    rank, world = rank_world()
    return list(range(rank, n_requests, world))


def generate_shared(backend: RolloutBackend, reqs: Sequence[RolloutRequest], sampling: SamplingParams) -> list[Rollout]:
    """``backend.generate`` over N processes: process r generates requests r, r+N, ... (with
    their group ids, so the draws are the single-process ones) and every process returns the
    whole batch. In a single process, ``backend.generate`` itself."""
    _, world = rank_world()
    if world == 1:
        return backend.generate(reqs, sampling)
    mine = my_share(len(reqs))
    rolls = backend.generate([_with_group_id(reqs[p], p) for p in mine], sampling)
    return place_groups(gather_objects((mine, rolls)), len(reqs), sampling.n)


def _with_group_id(req: RolloutRequest, position: int) -> RolloutRequest:
    return req if req.group_id is not None else RolloutRequest(req.prompt_ids, position, req.seed)
