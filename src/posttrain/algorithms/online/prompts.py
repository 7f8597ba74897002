"""Prompt data of the sampling methods: records -> chat-rendered token ids, with the record's
fields kept for the reward functions."""

from __future__ import annotations

from dataclasses import dataclass

from ...data.chat import render_prompt
from ...errors import DataError
from ...world.sources import BUILTINS, load_source
from .config import BUILTIN_PROMPTS, RLDataConfig


@dataclass
class PromptItem:
    """A training prompt: token ids, its text for the reward functions, and the record's fields."""

    ids: list[int]
    text: str
    fields: dict
    prompt: str | list | None = None   # the record's prompt as given (string or messages)


def world_problem_records(n: int, *, split: str, seed: int) -> list[dict]:
    return BUILTINS[BUILTIN_PROMPTS].generate(n, split=split, seed=seed)


def load_prompt_source(spec: str, cfg: RLDataConfig, seed: int, key: str = "data.train"):
    ds = load_source(spec, cfg, kinds=("prompts",), seed=seed, key=key, what="prompt sets")
    if not all("prompt" in r for r in ds.records[:1]):
        raise DataError(f"{ds.source} holds {ds.format} records, which have no 'prompt' field to sample from.",
                        fix=f"give {key} records with a 'prompt' (e.g. {{\"prompt\": ..., \"answer\": ...}}).")
    return ds


def prompt_text(prompt) -> str:
    """What the reward functions see as the prompt: the string, or the last user message's text."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return str(users[-1] if users else prompt[-1].get("content", ""))


def encode_prompts(ds, tokenizer, *, max_prompt_length: int) -> tuple[list[PromptItem], int]:
    """Chat-render every record's prompt; records over ``max_prompt_length`` tokens are dropped
    (returned count)."""
    items, dropped = [], 0
    for i, r in enumerate(ds.records):
        try:
            ids = render_prompt(tokenizer, r["prompt"])
        except DataError as e:
            raise DataError(f"{ds.where(i, 'prompt')}: {e}", fix="correct the prompt.") from None
        if len(ids) > max_prompt_length:
            dropped += 1
            continue
        fields = {k: v for k, v in r.items() if k != "prompt"}
        items.append(PromptItem(ids=ids, text=prompt_text(r["prompt"]), fields=fields, prompt=r["prompt"]))
    return items, dropped



def load_prompt_sets(data: RLDataConfig, tokenizer, *, seed: int, log) -> tuple[list[PromptItem], list[PromptItem], str]:
    """The training prompts (chat-rendered, over-long ones dropped and counted), the held-out
    prompts (``data.eval``; ``auto``: the world's held-out problems for the world's prompts) and
    the training source's name."""
    train_ds = load_prompt_source(data.train, data, seed)
    prompts, dropped = encode_prompts(train_ds, tokenizer, max_prompt_length=data.max_prompt_length)
    log(f"train prompts {train_ds.source}: {len(prompts)} prompts"
        + (f", {dropped} longer than data.max_prompt_length={data.max_prompt_length} dropped" if dropped else ""))
    if not prompts:
        raise DataError(f"No training prompts are left from {train_ds.source}.",
                        fix="raise data.max_prompt_length or check the data.")
    eval_spec = data.eval
    if eval_spec == "auto":   # a built-in prompt set's held-out split (builtin:world-pieces -> ...-pieces-heldout)
        builtin = BUILTINS.get(data.train)
        eval_spec = data.train + "-heldout" if builtin is not None and builtin.kind == "prompts" else None
    eval_prompts: list[PromptItem] = []
    if eval_spec:
        eval_ds = load_prompt_source(eval_spec, data, seed, key="data.eval")
        eval_prompts, _ = encode_prompts(eval_ds, tokenizer, max_prompt_length=data.max_prompt_length)
    return prompts, eval_prompts, train_ds.source
