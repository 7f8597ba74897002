"""The start every sampling method shares: the policy loaded, checked and ready to sample."""

from __future__ import annotations

import torch

from ...errors import ConfigError
from ...models.loading import accelerator_for, check_model_fits, load_policy, tokenizer_for


def sampling_policy(cfg, *, model=None, tokenizer=None, max_new_tokens: int, new_tokens_key: str):
    """``(accelerator, tokenizer, model)`` of a sampling method's run config ``cfg`` (sections
    ``model``, ``data``, ``train``): torch seeded with ``train.seed``, the model loaded unless
    given, checked to hold ``data.max_prompt_length`` plus ``max_new_tokens`` (the config key
    ``new_tokens_key``) and to have a pad token."""
    torch.manual_seed(cfg.train.seed)
    accelerator = accelerator_for(cfg.model)
    tokenizer = tokenizer or tokenizer_for(cfg.model)
    if model is None:
        model = load_policy(cfg.model, accelerator)
    check_model_fits(model, tokenizer, cfg.model, max_length=cfg.data.max_prompt_length + max_new_tokens,
                     parts={"data.max_prompt_length": cfg.data.max_prompt_length, new_tokens_key: max_new_tokens})
    if tokenizer.pad_token_id is None:
        raise ConfigError("The tokenizer has no pad token.", fix="set model.pad_token (e.g. to its EOS token).")
    return accelerator, tokenizer, model
