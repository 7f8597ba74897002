"""PPO's critic: a value model trained beside the policy, and the module that holds both.

The critic is a one-label ``AutoModelForSequenceClassification`` (the reward model's
format): a decoder backbone and a linear ``score`` head. As a critic its head is read at
*every* position, not only the last one: the value of the state before response token
``a_t`` is the head applied to the hidden state that predicts ``a_t`` (the same positions the
policy's log-probs are read at), so one forward pass on the training layout gives all values.

Where it starts (``critic.init``):

- ``policy``: a copy of the policy's backbone with a zero-initialized head, so every value
  starts at 0 and the first iteration's advantages are the discounted rewards themselves;
- ``reward_model``: a copy of ``reward.reward_model`` (InstructGPT's choice: the head already
  predicts the score of a finished response);
- a directory: a saved critic (``<run>/final/critic``) or reward model.

:class:`PolicyWithCritic` lets the shared engine train both with one optimizer: two sets of
parameter groups (the critic's with its own learning rate, both following the schedule), one
gradient-norm clip over all parameters, and checkpoints whose ``model/`` directory is the
policy's ``save_pretrained`` output with the critic's in ``model/critic/``. So a run's
``final/`` loads with ``AutoModelForCausalLM`` and ``final/critic/`` with
``AutoModelForSequenceClassification``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import ConfigError
from ...models.logprobs import forward_kwargs
from ...train.optim import parameter_groups

CRITIC_DIR = "critic"


def critic_head(model) -> torch.nn.Linear:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear) and head.out_features == 1:
            return head
    raise ConfigError(f"The critic ({type(model).__name__}) has no one-output linear 'score' head.",
                      fix="initialize the critic from the policy (critic.init=policy) or from a reward model saved "
                      "by `posttrain rm`.")


def critic_from_policy(policy, *, pad_token_id: int | None):
    """A one-label sequence classifier with the policy's backbone weights (copied) and a zero head."""
    from transformers import AutoModelForSequenceClassification

    config = policy.config.__class__.from_dict(policy.config.to_dict())
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    if getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = getattr(policy.config, "_attn_implementation", None)
    param = next(policy.parameters())
    critic = AutoModelForSequenceClassification.from_config(config, dtype=param.dtype)
    missing, unexpected = critic.base_model.load_state_dict(policy.base_model.state_dict(), strict=False)
    if missing or unexpected:
        raise ConfigError(f"The policy's backbone does not fit a {type(critic).__name__} (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}).", fix="initialize the critic from a directory (critic.init).")
    with torch.no_grad():
        head = critic_head(critic)
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    return critic.to(param.device)


def check_critic_fits(critic, policy, *, source: str) -> None:
    """The critic reads the policy's token ids: the vocabularies must match."""
    emb = critic.get_input_embeddings()
    pol = policy.get_input_embeddings()
    if emb.num_embeddings < pol.num_embeddings:
        raise ConfigError(
            f"critic.init={source!r} has {emb.num_embeddings} token embeddings, the policy {pol.num_embeddings}: "
            "the critic reads the policy's token ids, so it must use the same tokenizer.",
            fix="initialize the critic from the policy (critic.init=policy) or from a reward model trained on the "
            "policy's tokenizer.")


def critic_values(critic, batch: dict) -> torch.Tensor:
    """Values at the batch's selected rows (``lp_rows``, the positions that predict each completion
    token): ``(M,)`` float32, with gradient."""
    kwargs = forward_kwargs(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    hidden = critic.base_model(**kwargs).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["lp_rows"])
    return critic_head(critic)(picked).squeeze(-1).float()


class PolicyWithCritic(torch.nn.Module):
    """The policy and the critic as one trainable module for the shared engine (see the module
    docstring). Forward is not defined: the RL loss calls ``.policy`` and ``.critic``."""

    def __init__(self, policy, critic, *, critic_lr: float):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.critic_lr = critic_lr
        tied = getattr(policy, "_tied_weights_keys", None) or []
        if isinstance(tied, dict):
            tied = list(tied)
        self._tied_weights_keys = [f"policy.{k}" for k in tied]

    @property
    def config(self):
        return self.policy.config

    def get_input_embeddings(self):
        return self.policy.get_input_embeddings()

    def tie_weights(self):
        self.policy.tie_weights()

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """The policy's AdamW groups (the run's lr) then the critic's (``critic_lr``)."""
        groups = parameter_groups(self.policy, weight_decay)
        for g in parameter_groups(self.critic, weight_decay):
            groups.append({**g, "lr": self.critic_lr})
        return groups

    def checkpoint_parts(self) -> list[tuple[str, torch.nn.Module]]:
        """Where each part's ``save_pretrained`` output lies inside a saved directory."""
        return [("", self.policy), (CRITIC_DIR, self.critic)]

    def save_pretrained(self, directory, **kwargs) -> None:
        directory = Path(directory)
        self.policy.save_pretrained(directory, **kwargs)
        self.critic.save_pretrained(directory / CRITIC_DIR, **kwargs)
