"""Process rewards: step segmentation, step-end positions, and scoring with a saved PRM.

A process reward model (``posttrain prm``) is an ``AutoModelForTokenClassification`` with one
label whose logit at each step's last token scores that step. :class:`StepScorer` loads one
and scores solutions step by step (aggregated by min, product or last step); the ``prm``
reward function gives the online loop a solution score, and :func:`process_token_rewards`
places per-step rewards at the completion tokens that end the steps (for per-token advantages).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.chat import render_prompt
from ..errors import CheckpointError, ConfigError, TokenizerError
from ..models.loading import load_sequence_classifier
from ..models.logprobs import forward_kwargs
from ..models.peft import hf_model
from ..ops import aggregate_step_scores
from ..train.engine import to_device


@dataclass
class StepExample:
    """A tokenized solution: ``input_ids`` (prompt + solution), the index of each step's last token,
    one label per step (None when unlabelled), and how many of the ids are the prompt."""

    input_ids: list[int]
    step_ends: list[int]
    labels: list[float] | None = None
    prompt_len: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def split_steps(completion, delimiter: str) -> list[str]:
    """The steps of a solution: a list as given, or a string split at ``delimiter`` (empty pieces,
    e.g. from a trailing delimiter, dropped)."""
    if isinstance(completion, str):
        return [s for s in completion.split(delimiter) if s.strip()]
    return list(completion)


def encode_steps(tokenizer, prompt, steps: list[str], *, delimiter: str) -> StepExample:
    """Chat-rendered prompt ids + the tokens of ``delimiter.join(steps)``; each step's end is the
    last token whose characters start before the step's end (tokenizer offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(f"{type(tokenizer).__name__} is a slow tokenizer; locating step ends needs a fast "
                             "tokenizer's character offsets.", fix="load the model's tokenizer.json (a fast tokenizer).")
    prompt_ids = render_prompt(tokenizer, prompt)
    text = delimiter.join(steps)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    ends, pos, t = [], 0, 0
    for i, s in enumerate(steps):
        end = pos + len(s)
        while t + 1 < len(offsets) and offsets[t + 1][0] < end:
            t += 1
        ends.append(len(prompt_ids) + t)
        pos = end + len(delimiter)
    return StepExample(input_ids=prompt_ids + ids, step_ends=ends, prompt_len=len(prompt_ids))


def collate_steps(examples: list[StepExample], *, pad_token_id: int) -> dict:
    """Right-padded rows plus the flat (row, position, label) of every labelled step."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    rows, pos, lab = [], [], []
    for b, e in enumerate(examples):
        ids[b, : len(e)] = torch.tensor(e.input_ids)
        mask[b, : len(e)] = 1
        rows += [b] * len(e.step_ends)
        pos += e.step_ends
        lab += e.labels if e.labels is not None else [float("nan")] * len(e.step_ends)
    return {"input_ids": ids, "attention_mask": mask, "step_rows": torch.tensor(rows), "step_pos": torch.tensor(pos),
            "step_labels": torch.tensor(lab, dtype=torch.float32),
            "num_steps_per_row": torch.tensor([len(e.step_ends) for e in examples]),
            "num_input_tokens": sum(len(e) for e in examples)}


def step_logits(model, batch: dict) -> torch.Tensor:
    """``(N,)`` logits of the batch's steps: the score head at each step's last token (the
    backbone's hidden state; no classifier dropout)."""
    kwargs = forward_kwargs(batch["input_ids"], batch.get("attention_mask"), None)
    with hf_model(model) as m:
        hidden = m.base_model(**kwargs).last_hidden_state
        at = hidden[batch["step_rows"], batch["step_pos"]]
        return score_head(m)(at).squeeze(-1).float()


def score_head(model) -> torch.nn.Module:
    """The linear ``score`` (or ``classifier``) head of a sequence / token classifier (reward
    models, critics, PRMs); with LoRA the head trains in full inside peft's wrapper."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear) or isinstance(getattr(head, "original_module", None), torch.nn.Linear):
            return head
    raise CheckpointError(f"{type(model).__name__} has no linear 'score' head.",
                          fix="use a decoder model whose AutoModelFor{Sequence,Token}Classification has a 'score' "
                          "layer.")


@torch.no_grad()
def score_examples(model, examples: list[StepExample], *, pad_token_id: int, batch_size: int = 32) -> list[list[float]]:
    """Step probabilities ``sigmoid(logit)`` of every example's steps."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[float]] = []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            batch = to_device(collate_steps(chunk, pad_token_id=pad_token_id), device)
            probs = torch.sigmoid(step_logits(model, batch)).cpu().tolist()
            pos = 0
            for e in chunk:
                out.append(probs[pos:pos + len(e.step_ends)])
                pos += len(e.step_ends)
    finally:
        model.train(was)
    return out


class StepScorer:
    """A saved PRM (``posttrain prm``'s ``final/``) scoring solutions step by step.

    ``step_scores(prompts, completions)`` -> each solution's step probabilities (an empty
    solution has no steps); ``solution_scores(prompts, completions, method)`` -> one score per
    solution (min / product / last step; NaN without steps). Steps are split at the delimiter
    the PRM was trained with (saved in its config), else ``delimiter``."""

    def __init__(self, path: str, tokenizer=None, *, delimiter: str = "\n", device: str = "auto",
                 batch_size: int = 32, key: str = "the process reward model"):
        from ..models.loading import load_tokenizer

        self.model = load_sequence_classifier(path, num_labels=1, device=device, per_token=True, key=key)
        self.model.eval()
        self.tokenizer = tokenizer or load_tokenizer(path, key=key)
        self.delimiter = getattr(self.model.config, "posttrain_step_delimiter", None) or delimiter
        self.batch_size = batch_size

    def encode(self, prompt, completion) -> StepExample | None:
        steps = split_steps(completion, self.delimiter)
        return encode_steps(self.tokenizer, prompt, steps, delimiter=self.delimiter) if steps else None

    def score(self, examples: list[StepExample | None]) -> list[list[float]]:
        real = [e for e in examples if e is not None]
        scores = iter(score_examples(self.model, real, pad_token_id=self.tokenizer.pad_token_id,
                                     batch_size=self.batch_size)) if real else iter(())
        return [next(scores) if e is not None else [] for e in examples]

    def step_scores(self, prompts: list, completions: list) -> list[list[float]]:
        return self.score([self.encode(p, c) for p, c in zip(prompts, completions, strict=True)])

    def solution_scores(self, prompts: list, completions: list, method: str = "min") -> list[float]:
        return aggregate(self.step_scores(prompts, completions), method)


def aggregate(scores: list[list[float]], method: str) -> list[float]:
    """One score per solution from lists of step scores (:func:`posttrain.ops.aggregate_step_scores`)."""
    width = max([1] + [len(s) for s in scores])
    probs = torch.zeros((len(scores), width))
    mask = torch.zeros((len(scores), width))
    for i, s in enumerate(scores):
        probs[i, : len(s)] = torch.tensor(s, dtype=torch.float32)
        mask[i, : len(s)] = 1
    return aggregate_step_scores(probs, mask, method).tolist()


PROCESS_MODES = ("delta", "step")


def process_token_rewards(scorer: StepScorer, prompts: list, completion_ids: list[list[int]], *,
                          mode: str = "delta") -> tuple[list[list[float]], int]:
    """Per-token process rewards for sampled completions: at the token that ends each step, the
    step's reward (``step``: its score s_i, Math-Shepherd; ``delta``: s_i - s_{i-1} with s_0 = 0.5,
    a potential-based shaping whose sum is s_last - 0.5, so it adds credit assignment without
    paying for more steps); zero elsewhere.

    The completion is decoded and split into steps; step ends are located in its re-encoding,
    which must reproduce the sampled ids (it does for ordinary text). A completion whose
    re-encoding differs gets the sum of its step rewards at its last token instead (counted:
    the second value returned)."""
    if mode not in PROCESS_MODES:
        raise ConfigError(f"reward.process_mode={mode!r}; valid: {', '.join(PROCESS_MODES)}.",
                          fix="use delta (telescoping, the default) or step.")
    tok = scorer.tokenizer
    examples, offsets, mismatched = [], [], 0
    for p, ids in zip(prompts, completion_ids, strict=True):
        e = scorer.encode(p, tok.decode(ids, skip_special_tokens=True))
        examples.append(e)
        ok = e is not None and e.input_ids[e.prompt_len:] == list(ids[: len(e.input_ids) - e.prompt_len])
        offsets.append(e.prompt_len if ok else None)
        mismatched += int(e is not None and not ok)
    out = []
    for ids, e, off, s in zip(completion_ids, examples, offsets, scorer.score(examples)):
        r = [0.0] * len(ids)
        if not s or not ids:
            out.append(r)
            continue
        prev, vals = 0.5, []
        for x in s:
            vals.append(x - prev if mode == "delta" else x)
            prev = x
        if off is None:
            r[-1] = sum(vals)
        else:
            for end, v in zip(e.step_ends, vals):
                r[end - off] += v
        out.append(r)
    return out, mismatched


def prm_reward(*, process_reward_model=None, process_aggregation: str = "min", reward_model_batch_size: int = 16,
               tokenizer=None, device=None, log=print, **_options):
    """Factory of ``prm``: a solution's PRM score (``reward.process_aggregation`` of its step
    scores); a completion without steps gets None (invalid, counted)."""
    if not process_reward_model:
        raise ConfigError("reward.functions names 'prm' but reward.process_reward_model is not set.",
                          fix="set reward.process_reward_model to a directory saved by `posttrain prm`.")
    scorer = StepScorer(process_reward_model, device=str(device) if device is not None else "auto",
                        batch_size=reward_model_batch_size, key="reward.process_reward_model")

    def prm(prompts, completions, **kwargs):
        return [None if x != x else x for x in scorer.solution_scores(prompts, completions, process_aggregation)]

    prm.scorer = scorer
    return prm
