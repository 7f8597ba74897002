"""``reward_model``: a learned reward model scores each (prompt, completion) pair.

The model is the one-label ``AutoModelForSequenceClassification`` directory that
``posttrain rm`` saves (``<output_dir>/final``), or any such directory (safetensors only, no
repository code: it loads through :mod:`posttrain.models.loading`). It runs on the loop's
``device``, in eval mode, under ``torch.no_grad``, in batches of ``reward_model_batch_size``
sequences (sorted by length to keep padding small; the batch size does not change the scores
beyond float rounding).

**The RM's own tokenizer.** The text is re-tokenized with the tokenizer saved in the RM's
directory (``posttrain rm`` saves the one it trained with, pad token and chat template
included), so a policy with another vocabulary or chat template is fine; a one-line note says
so when they differ.

**Encoding = training's encoding.** With ``reward_model_format="chat"`` (default) the pair is
the conversation ``[user: prompt, assistant: completion]`` (a prompt that is already a list of
messages is used as is) rendered by the RM tokenizer's chat template,
``apply_chat_template(messages, tokenize=True)``. Those are exactly the token ids ``posttrain
rm`` trains on for chat-message records such as the world's preference data
(:func:`posttrain.data.tokenize.encode_sft_example` verifies that its rendering reproduces
``apply_chat_template``), and the input published reward models document. An RM trained on
plain-string ``prompt`` / ``chosen`` / ``rejected`` records needs ``reward_model_format="text"``:
prompt tokens with the tokenizer's special tokens, then the completion's tokens, then EOS (the
string branch of ``encode_sft_example``). A tokenizer without a chat template is refused for
``chat``.

**Pooling = the saved model's forward.** The score is read at the last token of the sequence
whose id differs from ``config.pad_token_id``: transformers' own rule for this model class,
computed with :func:`posttrain.algorithms.rm.sequence_rewards` (``pooling="last"``). ``posttrain
rm`` guarantees that rule gives what training scored for both of its poolings (``last``, and
``eos``, which it only accepts when the EOS token is the sequence's last token and not the pad
token), so the reward equals the RM's score for the same text in training and evaluation.

A sequence longer than the RM's position limit (``max_position_embeddings``) is not cut: its
reward is None (excluded and counted), since a truncated text would be scored at a token in
the middle of the completion.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, DataError, TokenizerError

KEY = "reward.reward_model"
FORMATS = ("chat", "text")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
HEAD_PREFIXES = ("score", "classifier")


def _weight_names(directory: Path) -> list[str]:
    """Tensor names of a local safetensors checkpoint (headers only, no tensor is read)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            return list(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
        except (OSError, ValueError, AttributeError):
            return []  # the loader reports a broken index
    from safetensors import safe_open

    names: list[str] = []
    for f in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                names += list(h.keys())
        except Exception:  # a corrupt file: the loader reports it with its own message
            return []
    return names


def check_reward_head(path: str, *, key: str = KEY) -> None:
    """Refuse a local model directory whose weights hold no sequence-classification head: loading
    it as a reward model would score with a randomly initialized head (a causal LM, an SFT run)."""
    from ..models.loading import locate

    source = locate(path, key=key, what="reward model")
    if not source.local:
        return
    d = Path(source.path)
    names = _weight_names(d)
    if names and not any(n.split(".")[0] in HEAD_PREFIXES for n in names):
        archs = []
        try:
            archs = json.loads((d / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            pass
        saved_as = f", and its config.json says {archs[0]}" if archs else ""
        raise CheckpointError(
            f"Config key '{key}' names '{path}', which holds no reward head (its weights have no 'score' "
            f"tensor{saved_as}): it is a language model, not a reward model, and loading it as one would score "
            "every completion with a randomly initialized head.",
            fix=f"point {key} to the final/ directory that `posttrain rm` saved (a one-label "
            "AutoModelForSequenceClassification), or train one first with `posttrain rm`.")


def _batch_size(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"Config key 'reward.reward_model_batch_size' has value {value!r}; it must be a positive "
                          "integer.", fix="set reward.reward_model_batch_size, e.g. 16 (lower it if the reward model "
                          "runs out of memory).")
    return value


class RewardModelScorer:
    """The ``reward_model`` reward function (see the module docstring). Call it like any reward
    function; :meth:`encode` gives the token ids a pair is scored on."""

    needs_fields: tuple[str, ...] = ()

    def __init__(self, path: str, *, device=None, batch_size: int = 16, dtype: str = "auto",
                 input_format: str = "chat", policy_tokenizer=None, log=print):
        from ..models.loading import check_tokenizer_fits, load_sequence_classifier, load_tokenizer, max_positions

        if not isinstance(path, str) or not path.strip():
            raise ConfigError(f"Reward function 'reward_model' needs config key '{KEY}' (the reward model's "
                              f"directory), which is {'unset' if path is None else repr(path)}.",
                              fix=f"set {KEY} to the final/ directory of a `posttrain rm` run.")
        self.batch_size = _batch_size(batch_size)
        if input_format not in FORMATS:
            raise ConfigError(f"Config key 'reward.reward_model_format' has value {input_format!r}; valid values: "
                              f"{', '.join(FORMATS)}.", fix="use chat (the RM was trained on chat messages, the "
                              "default) or text (it was trained on plain-string prompt/chosen/rejected records).")
        if dtype not in DTYPES:
            raise ConfigError(f"Config key 'reward.reward_model_dtype' has value {dtype!r}; valid values: "
                              f"{', '.join(DTYPES)}.", fix="use auto (float32) or bf16 on a GPU.")
        self.path = path
        self.input_format = input_format
        check_reward_head(path)
        self.tokenizer = load_tokenizer(path, key=KEY)
        self._check_tokenizer()
        device = "auto" if device is None else str(device)
        self.model = load_sequence_classifier(path, num_labels=1, dtype=dtype, device=device, key=KEY)
        self.model.eval()
        self.model.requires_grad_(False)
        check_tokenizer_fits(self.tokenizer, self.model, key=KEY)
        cfg_pad = self.model.config.pad_token_id
        # the token transformers' forward skips when it picks the scored token (posttrain rm saves the
        # tokenizer's pad id there); without one it reads each sequence's last token
        self.pool_pad_id = cfg_pad if cfg_pad is not None else self.tokenizer.pad_token_id
        pads = (self.tokenizer.pad_token_id, cfg_pad, self.tokenizer.eos_token_id, 0)
        self.batch_pad_id = next(p for p in pads if p is not None)  # padding is masked; any id works
        self.max_length = max_positions(self.model.config)
        self.encode("1 + 1 = ?", "1 + 1 = 2\n#### 2")  # fail now, not at the first step, if the template cannot render
        note = self._tokenizer_note(policy_tokenizer)
        if note and log:
            log(note)

    # ------------------------------------------------------------------ checks

    def _check_tokenizer(self) -> None:
        tok = self.tokenizer
        if self.input_format == "chat":
            template = getattr(tok, "chat_template", None)
            if isinstance(template, dict):
                template = template.get("default")
            if not template:
                raise TokenizerError(
                    f"The tokenizer of the reward model '{self.path}' ({KEY}) has no chat template, so it cannot "
                    "render (prompt, completion) as the conversation the reward model scores "
                    "(reward.reward_model_format=chat).",
                    fix="save the tokenizer the reward model was trained with into its directory (`posttrain rm` "
                    "does, chat template included), or set reward.reward_model_format=text if it was trained on "
                    "plain-string prompt/chosen/rejected records.")
        elif tok.eos_token_id is None:
            raise TokenizerError(
                f"The tokenizer of the reward model '{self.path}' ({KEY}) has no EOS token, which "
                "reward.reward_model_format=text appends to every completion (as training did).",
                fix="save the tokenizer the reward model was trained with into its directory.")

    def _tokenizer_note(self, policy) -> str | None:
        if policy is None:
            return None
        differences = []
        try:
            if policy.get_vocab() != self.tokenizer.get_vocab():
                differences.append(f"vocabulary: {len(policy)} vs {len(self.tokenizer)} tokens")
        except (AttributeError, TypeError):
            return None
        if getattr(policy, "chat_template", None) != getattr(self.tokenizer, "chat_template", None):
            differences.append("chat template")
        if not differences:
            return None
        return (f"note: the reward model '{self.path}' uses its own tokenizer, which differs from the policy's "
                f"({'; '.join(differences)}); completions are scored from their text, re-tokenized with the reward "
                "model's tokenizer, so this is fine.")

    # ------------------------------------------------------------------ encoding

    def encode(self, prompt, completion: str) -> list[int]:
        """The token ids the reward model scores for ``(prompt, completion)`` (see the module docstring)."""
        tok = self.tokenizer
        if self.input_format == "chat":
            messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))
            messages.append({"role": "assistant", "content": completion})
            try:
                ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=False, return_dict=False)
            except Exception as exc:  # jinja errors, a template's raise_exception(...)
                raise TokenizerError(
                    f"The chat template of the reward model '{self.path}' ({KEY}) failed to render a "
                    f"(user, assistant) conversation: {type(exc).__name__}: {exc}",
                    fix="use the reward model's own tokenizer and template (the one it was trained with).") from None
            return ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if not isinstance(prompt, str):
            raise DataError(
                f"reward.reward_model_format=text scores plain-string prompts, but a prompt is a list of messages "
                f"({str(prompt)[:60]}...).", fix="use reward.reward_model_format=chat for conversational prompts.")
        ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
        ids += list(tok(completion, add_special_tokens=False)["input_ids"])
        if not ids or ids[-1] != tok.eos_token_id:  # exactly the string branch of encode_sft_example
            ids.append(tok.eos_token_id)
        return ids

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """Scores of already-encoded sequences, in batches of ``batch_size`` (longest first)."""
        from ..algorithms.rm import sequence_rewards
        from ..data import EncodedExample, collate_sequences

        device = next(self.model.parameters()).device
        out = [0.0] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            # 'last' pooling reads no label; labels only fill the batch layout
            examples = [EncodedExample(list(sequences[i]), list(sequences[i])) for i in chunk]
            batch = collate_sequences(examples, self.batch_pad_id, packing=False)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            scores = sequence_rewards(self.model, batch, pooling="last", eos_token_id=self.tokenizer.eos_token_id,
                                      pad_token_id=self.pool_pad_id)
            for i, s in zip(chunk, scores.float().cpu().tolist(), strict=True):
                out[i] = s
        return out

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        fits = [i for i, ids in enumerate(encoded) if self.max_length is None or len(ids) <= self.max_length]
        out: list[float | None] = [None] * len(encoded)
        for i, s in zip(fits, self.score_ids([encoded[i] for i in fits]), strict=True):
            out[i] = s
        return out


def reward_model_reward(*, reward_model=None, reward_model_batch_size: int = 16, reward_model_dtype: str = "auto",
                        reward_model_format: str = "chat", tokenizer=None, device=None, log=print, **_options):
    """Factory of ``reward_model``: loads the model now, so a bad directory fails before training."""
    return RewardModelScorer(reward_model, device=device, batch_size=reward_model_batch_size,
                             dtype=reward_model_dtype, input_format=reward_model_format,
                             policy_tokenizer=tokenizer, log=log)
