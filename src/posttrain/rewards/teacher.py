"""``teacher_logprob``: on-policy distillation as RL, the teacher scoring every sampled token.

The student (the policy being trained) samples; a teacher with the same tokenizer
(``teacher.name_or_path`` of ``posttrain rl``) scores each sampled token, and token ``t`` of a
completion ``y`` of prompt ``x`` is rewarded with

    u_t = log p_T(y_t | x, y_<t) - log p_S(y_t | x, y_<t)

both under ``softmax(logits / tau)`` with ``tau = rollout.temperature``: the student's
distribution is the one the sampler draws from and the loop trains, and the teacher is tempered
alike (at the default tau = 1 both are the models' own distributions). The completion's reward
is ``sum_t u_t = log p_T(y|x) - log p_S(y|x)``, the sampled estimate of ``-KL(p_S || p_T)``:
maximizing its expectation is minimizing the sequence-level reverse KL to the teacher
(reference note 001, section 14.1, on-policy distillation).

Both log-probs are constants (no gradient). With them the policy gradient is unbiased for
``-grad KL(p_S || p_T)``: ``grad E_y[sum_t u_t] = E_y[sum_t grad log p_S(y_t) * sum_{t'>=t} u_t']
- E_y[sum_t grad log p_S(y_t)]``, and the last term is zero in expectation (the score
function has mean zero), so treating ``u`` as a fixed reward loses nothing. Where the loop puts
``u``: sequence-level estimators (grpo, rloo, remax, ...) train on the sum; the token-level ones
(``reinforce_pp``, ``gae``) place ``u_t`` at token ``t`` (like process rewards), so the
return-to-go (gamma 1) credits each token with the reverse KL still to come.

**Whose log-probs.** The student's are recomputed here by a no-grad forward of the current
policy (its weights at sampling time, so they are the loop's "old" log-probs) on the same
batch and layout as the teacher's, not taken from the sampler's cached decode: both terms come
from identical forward passes, so a teacher equal to the student scores exactly 0, and greedy
evaluation (which samples at temperature 0) is scored at the same ``tau`` as training. The
extra forward pass costs little next to sampling.

Batches: ``teacher.batch_size`` sequences (prompt + completion, right-padded, longest first)
per forward pass of each model, only the completion positions go through the output heads
(:func:`posttrain.models.logprobs.selected_log_probs`). A sequence longer than the teacher's
position limit scores None (excluded, counted). With several processes each scores its own
share of the groups, as for every reward function. The teacher loads through
:func:`posttrain.models.loading.load_causal_lm` (safetensors only, no repository code) and must
have the policy's vocabulary (``check_same_vocabulary``, ``check_same_tokenizer``).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

KEY = "teacher.name_or_path"
NAME = "teacher_logprob"


class TeacherLogprobReward:
    """The ``teacher_logprob`` reward function (see the module docstring). Per token through
    :meth:`token_rewards`; called like any reward function it returns the per-completion sums."""

    needs_fields: tuple[str, ...] = ()

    def __init__(self, path: str, *, policy, tokenizer=None, device=None, dtype: str = "auto", batch_size: int = 32,
                 temperature: float = 1.0, attn_implementation: str | None = "sdpa", teacher=None):
        from ..models.loading import check_same_vocabulary, load_causal_lm, max_positions

        if teacher is None:
            teacher = load_causal_lm(path, dtype=dtype, device="auto" if device is None else str(device),
                                     attn_implementation=attn_implementation, key=KEY)
        check_same_vocabulary(teacher, policy, key=KEY)
        if tokenizer is not None and path:
            from ..models.loading import check_same_tokenizer

            check_same_tokenizer(path, tokenizer, key=KEY, why="the teacher scores the token ids the policy sampled",
                                 fix=f"set {KEY} to a model with the policy's tokenizer (e.g. the same model family), "
                                 "or distill through text with `posttrain distill loss.mode=seqkd`.")
        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher, self.policy = teacher, policy
        self.batch_size, self.temperature = batch_size, float(temperature)
        self.max_length = max_positions(teacher.config)

    @torch.no_grad()
    def log_probs(self, model, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """``log softmax(logits / tau)`` of every completion token of ``(prompt_ids, completion_ids)``
        under ``model`` (eval mode for the call), ``batch_size`` sequences per forward pass."""
        from ..models.logprobs import selected_log_probs

        was = model.training
        model.eval()
        device = next(model.parameters()).device
        out: list[list[float]] = [[] for _ in sequences]
        order = sorted(range(len(sequences)), key=lambda i: -(len(sequences[i][0]) + len(sequences[i][1])))
        try:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                width = max(len(sequences[i][0]) + len(sequences[i][1]) for i in chunk)
                ids = torch.zeros((len(chunk), width), dtype=torch.long)  # right padding: positions 0..n-1 stay
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                rows, targets = [], []
                for b, i in enumerate(chunk):
                    p, c = sequences[i]
                    ids[b, : len(p) + len(c)] = torch.tensor(list(p) + list(c))
                    mask[b, : len(p) + len(c)] = 1
                    # the hidden state at position len(p) - 1 + j predicts completion token j
                    rows += [b * width + len(p) - 1 + j for j in range(len(c))]
                    targets += list(c)
                if not targets:
                    continue
                lp = selected_log_probs(model, ids.to(device), torch.tensor(rows, device=device),
                                        torch.tensor(targets, device=device), attention_mask=mask.to(device),
                                        temperature=self.temperature)["log_probs"].float().cpu().tolist()
                pos = 0
                for i in chunk:
                    n = len(sequences[i][1])
                    out[i] = lp[pos:pos + n]
                    pos += n
        finally:
            model.train(was)
        return out

    def token_rewards(self, prompts, completions, *, completion_ids, prompt_ids=None, **_) -> list[list[float] | None]:
        """``u_t = log p_T - log p_S`` at every completion token; None for a sequence past the teacher's
        position limit."""
        if prompt_ids is None:
            raise ConfigError(f"{NAME} needs the prompts' token ids (prompt_ids), which this caller does not "
                                   "pass.", fix="use it in the online RL loop (posttrain rl).")
        seqs = list(zip(prompt_ids, completion_ids, strict=True))
        fits = [i for i, (p, c) in enumerate(seqs)
                if len(p) >= 1 and (self.max_length is None or len(p) + len(c) <= self.max_length)]
        picked = [seqs[i] for i in fits]
        teacher = self.log_probs(self.teacher, picked)
        student = self.log_probs(self.policy, picked)
        out: list[list[float] | None] = [None] * len(seqs)
        for i, t, s in zip(fits, teacher, student, strict=True):
            out[i] = [a - b for a, b in zip(t, s, strict=True)]
        return out

    def __call__(self, prompts, completions, **fields) -> list[float | None]:
        return [None if u is None else math.fsum(u) for u in self.token_rewards(prompts, completions, **fields)]


def teacher_logprob_reward(*, teacher_model=None, teacher_dtype: str = "auto", teacher_batch_size: int = 32,
                           teacher_temperature: float = 1.0, teacher_attn_implementation: str | None = "sdpa",
                           policy=None, tokenizer=None, device=None, log=print, **_options):
    """Factory of ``teacher_logprob``: loads the teacher now, so a bad directory or vocabulary fails
    before training. ``policy`` is the model being trained (the online loop passes it)."""
    if not teacher_model:
        raise ConfigError(f"Reward function '{NAME}' needs a teacher ({KEY}), which is not set.",
                          fix=f"set {KEY} to the teacher's directory (posttrain rl: on-policy distillation as RL), "
                          "or for distillation outside the online loop use `posttrain distill`.")
    if policy is None:
        raise ConfigError(f"Reward function '{NAME}' scores the samples of the policy being trained against the "
                          "teacher, and only the online RL loop (posttrain rl) gives it that policy.",
                          fix=f"use {NAME} with posttrain rl (teacher.name_or_path=...), or `posttrain distill` here.")
    return TeacherLogprobReward(teacher_model, policy=policy, tokenizer=tokenizer, device=device, dtype=teacher_dtype,
                                batch_size=teacher_batch_size, temperature=teacher_temperature,
                                attn_implementation=teacher_attn_implementation)
