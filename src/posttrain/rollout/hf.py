"""One completion per prompt: greedy decoding (evaluation) or sampling with Hugging Face ``generate``.

Prompts are token-id lists (already chat-rendered); they are sorted by length and run in
left-padded batches with a KV cache. Each result keeps the completion ids *including* the
stop token when the model stopped by itself (``finished=True``), because later stages score
and train on that token; ``text`` is the decoded completion without special tokens.

Greedy decoding (``temperature == 0``, every evaluation) runs the sampler's own loop
(:func:`posttrain.rollout.sampler.sample_groups` with one sample per prompt), which drops a row
from the batch and the KV cache as soon as it emits a stop token. ``model.generate`` keeps
decoding finished rows as padding until the longest answer of the batch ends, which on a CPU
costs as much as decoding them: for answers of ~20 tokens in batches whose longest runs to the
64-token budget, more than half of the decoding work. The tokens are the same argmax path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from ..errors import ConfigError
from ..models.loading import max_positions
from ..models.peft import base_model_of


@dataclass
class Generation:
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finished: bool


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end a reply: the tokenizer's EOS plus the model's generation-config EOS."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        extra = [extra]
    for t in extra or []:
        if int(t) not in ids:
            ids.append(int(t))
    return ids


def check_position_limit(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, key: str) -> None:
    """Refuse a generation that would run past the model's position limit, naming ``key``."""
    limit = max_positions(model.config)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + max_new_tokens > limit:
        raise ConfigError(
            f"Generation would run past the model's position limit of {limit} tokens: the longest prompt has "
            f"{longest} tokens and {key.split(' ')[0]} is {max_new_tokens}.",
            fix=f"lower {key} to at most {max(0, limit - longest)}, or shorten the prompts.")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)``, each ``(N, longest prompt)``."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attention[row, width - len(p):] = 1
    return input_ids, attention


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
    """Generate one completion per prompt (greedy when ``temperature == 0``)."""
    if not prompts:
        return []
    model = base_model_of(model)  # a PeftModel decodes through its transformers model (LoRA layers inside)
    check_position_limit(model, prompts, max_new_tokens, key="max_new_tokens (--max-new-tokens for posttrain eval)")
    stops = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    sampling = temperature > 0
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False, unit="prompt")
    if not sampling:  # (the sampler switches the model to eval mode and back itself)
        try:
            _greedy_batches(model, tokenizer, prompts, order, results, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, bar=bar)
        finally:
            bar.close()
        return results  # type: ignore[return-value]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    # a model directory's generation_config.json must not change decoding (beams, penalties, or
    # strategies that would need repository code): decode with a clean config, restored after
    saved_config = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=getattr(saved_config, "bos_token_id", None),
                                               eos_token_id=stops, pad_token_id=pad_id)
    try:
        _generate_batches(model, tokenizer, prompts, order, results, batch_size=batch_size, pad_id=pad_id,
                          stops=stops, device=device, max_new_tokens=max_new_tokens, sampling=sampling,
                          temperature=temperature, top_p=top_p, top_k=top_k, bar=bar)
    finally:
        model.generation_config = saved_config
        bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


def _greedy_batches(model, tokenizer, prompts, order, results, *, batch_size, max_new_tokens, bar) -> None:
    """Greedy completions of ``prompts`` in length-sorted batches, finished rows leaving the batch."""
    from .sampler import sample_groups  # (the sampler imports this module's helpers)

    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rolls = sample_groups(model, tokenizer, [prompts[i] for i in idx], group_size=1,
                              max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
        for i, r in zip(idx, rolls):
            results[i] = Generation(list(prompts[i]), r.completion_ids, r.text, r.finished)
        bar.update(len(idx))


def _generate_batches(model, tokenizer, prompts, order, results, *, batch_size, pad_id, stops, device, max_new_tokens,
                      sampling, temperature, top_p, top_k, bar) -> None:
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, attention = left_pad([prompts[i] for i in idx], pad_id)
        width = input_ids.shape[1]
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            eos_token_id=stops,
            pad_token_id=pad_id,
        )
        if sampling:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs
        )
        new = out[:, width:].tolist()
        for row, i in enumerate(idx):
            toks = new[row]
            finished = False
            for pos, t in enumerate(toks):
                if t in stops:
                    toks = toks[: pos + 1]
                    finished = True
                    break
            else:
                # generate pads finished rows; an unfinished row has no stop token at all
                toks = toks[:max_new_tokens]
            text = tokenizer.decode(toks, skip_special_tokens=True)
            results[i] = Generation(list(prompts[i]), toks, text, finished)
        bar.update(len(idx))
