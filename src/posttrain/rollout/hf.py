"""One completion per prompt (greedy for evaluation, or sampled), in prompt order.

Prompts are token-id lists (already chat-rendered); they are sorted by length and run in
batches through the rollout-backend interface (:class:`posttrain.rollout.backend.HFSampler`, the
own sampler, one sample per prompt), which drops a row from the batch and the KV cache as soon
as it emits a stop token. Each result keeps the completion ids *including* the stop token when
the model stopped by itself (``finished=True``), because later stages score and train on that
token; ``text`` is the decoded completion without special tokens.

Hugging Face ``model.generate`` is not used: it keeps decoding finished rows as padding until
the longest answer of the batch ends, which on a CPU costs as much as decoding them (for answers
of ~20 tokens in batches whose longest runs to the 64-token budget, more than half of the
decoding work), and a model directory's ``generation_config.json`` would steer it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..models.peft import base_model_of
from .backend import HFSampler, SamplingParams, requests
from .sampler import check_position_limit


@dataclass
class Generation:
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finished: bool


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
    drawing from ``(seed, i)``, otherwise), in prompt order."""
    if not prompts:
        return []
    check_position_limit(base_model_of(model), prompts, max_new_tokens,
                         key="max_new_tokens (--max-new-tokens for posttrain eval)")
    backend = HFSampler(model, tokenizer, batch_size=batch_size)
    sampling = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed=seed or 0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False, unit="prompt") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rolls = backend.generate(requests([prompts[i] for i in idx], idx), sampling)
            for i, r in zip(idx, rolls):
                results[i] = Generation(list(prompts[i]), r.completion_ids, r.text, r.finished)
            bar.update(len(idx))
    return results  # type: ignore[return-value]
