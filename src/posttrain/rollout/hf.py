"""Length-sorted generation for evaluation: ``n`` completions per prompt (greedy or sampled), in
prompt order, with a progress bar.

Prompts are token-id lists (already chat-rendered); they are sorted by length and run in
batches through the rollout-backend interface (:class:`posttrain.rollout.backend.HFSampler`, the
own sampler), which drops a row from the batch and the KV cache as soon as it emits a stop
token. Each result keeps the completion ids *including* the stop token when the model stopped
by itself (``finished=True``), because later stages score and train on that token; ``text`` is
the decoded completion without special tokens. :func:`generate_rollouts` returns the backend's
:class:`~posttrain.rollout.sampler.Rollout` records (with ``shared``, each batch split over the
processes by :func:`~posttrain.rollout.backend.generate_shared`); :func:`generate` is its
one-completion form.

Hugging Face ``model.generate`` is not used: it keeps decoding finished rows as padding until
the longest answer of the batch ends, which on a CPU costs as much as decoding them (for answers
of ~20 tokens in batches whose longest runs to the 64-token budget, more than half of the
decoding work), and a model directory's ``generation_config.json`` would steer it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..models.peft import base_model_of
from .backend import HFSampler, RolloutBackend, SamplingParams, generate_shared, requests
from .sampler import Rollout, check_position_limit


@dataclass
class Generation:
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finished: bool


@torch.no_grad()
def generate_rollouts(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams,
    *,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "generating",
    key: str = "max_new_tokens",
    shared: bool = False,
    backend: RolloutBackend | None = None,
) -> list[Rollout]:
    """``sampling.n`` rollouts of each prompt, in prompt order (sample ``j`` of prompt ``i`` is
    element ``i * n + j``, its ``prompt_index`` is ``i``). Prompts run length-sorted, ``max(1,
    batch_size // n)`` at a time; sample ``j`` of prompt ``i`` draws from ``(sampling.seed, i, j)``,
    so neither the batching nor the number of processes changes what is drawn. ``shared``: each
    batch is split over the processes (:func:`~posttrain.rollout.backend.generate_shared`; every
    process must call this together) and every process gets the whole result. ``key`` names the
    setting in the error for a generation past the model's position limit. ``backend``: the
    rollout backend to generate with, synced to ``model`` first (None: the own sampler)."""
    if not prompts:
        return []
    check_position_limit(base_model_of(model), prompts, sampling.max_new_tokens, key=key)
    if backend is None:
        backend = HFSampler(model, tokenizer, batch_size=batch_size)
    else:
        backend.sync_weights(model)
    n = sampling.n
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    # the own sampler decodes batch_size sequences at a time; an engine schedules its own batches
    per_batch = len(prompts) if backend.serving_engine else max(1, batch_size // n)
    results: list[Rollout | None] = [None] * (len(prompts) * n)
    with tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False, unit="prompt") as bar:
        for start in range(0, len(order), per_batch):
            idx = order[start : start + per_batch]
            reqs = requests([prompts[i] for i in idx], idx)
            rolls = generate_shared(backend, reqs, sampling) if shared else backend.generate(reqs, sampling)
            for k, i in enumerate(idx):
                mine = rolls[k * n:(k + 1) * n]
                results[i * n:(i + 1) * n] = [dataclasses.replace(r, prompt_index=i) for r in mine]
            bar.update(len(idx))
    return results  # type: ignore[return-value]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 64,
    seed: int | None = None,
    progress: bool = False,
    desc: str = "generating",
) -> list[Generation]:
    """One completion per prompt (greedy when ``temperature == 0``; sampled, prompt ``i``
    drawing from ``(seed, i)``, otherwise), in prompt order (:func:`generate_rollouts`)."""
    rolls = generate_rollouts(model, tokenizer, prompts, SamplingParams(max_new_tokens, temperature, top_p, top_k,
                                                                        seed=seed or 0),
                              batch_size=batch_size, progress=progress, desc=desc)
    return [Generation(list(p), r.completion_ids, r.text, r.finished) for p, r in zip(prompts, rolls)]
