"""The start every sampling method shares: the policy loaded, checked and ready to sample."""

from __future__ import annotations


from ...errors import ConfigError
from ...models.loading import prepare_policy


def sampling_policy(cfg, *, model=None, tokenizer=None, max_new_tokens: int, new_tokens_key: str):
    """``(accelerator, tokenizer, model)`` of a sampling method's run config ``cfg`` (sections
    ``model``, ``data``, ``train``): torch seeded with ``train.seed``, the model loaded unless
    given, checked to hold ``data.max_prompt_length`` plus ``max_new_tokens`` (the config key
    ``new_tokens_key``) and to have a pad token."""
    accelerator, tokenizer, model = prepare_policy(
        cfg, model=model, tokenizer=tokenizer, max_length=cfg.data.max_prompt_length + max_new_tokens,
        parts={"data.max_prompt_length": cfg.data.max_prompt_length, new_tokens_key: max_new_tokens})
    if tokenizer.pad_token_id is None:
        raise ConfigError("The tokenizer has no pad token.", fix="set model.pad_token (e.g. to its EOS token).")
    return accelerator, tokenizer, model
