"""``posttrain cai``'s configuration."""

from __future__ import annotations

from dataclasses import dataclass, field


from ...config import ModelConfig, TrainConfig, option
from ...errors import ConfigError
from ...rewards.judge import DEFAULT_COMPARE_TEMPLATE, DEFAULT_SCORE_TEMPLATE
from ...rollout.config import BackendConfig
from ...train.sharding import refuse_sharding
from ..online import RLDataConfig

POLICY = "policy"

# --------------------------------------------------------------------------- config


@dataclass
class CAISamplingConfig(BackendConfig):
    """The policy's responses: one per prompt (sampling.backend: the own sampler or a vLLM engine)."""

    prompts: int = option(512, "Training prompts answered (the first of a seeded shuffle of data.train).", min=1)
    max_new_tokens: int = option(64, "Longest response.", min=1)
    temperature: float = option(1.0, "Sampling temperature of the responses.", gt=0.0)
    top_p: float = option(1.0, "Nucleus sampling mass.", gt=0.0, max=1.0)
    batch_size: int = option(128, "Sequences decoded together.", min=1)
    eval_max_new_tokens: int = option(96, "Longest completion when evaluating held-out prompts (greedy).", min=1)


@dataclass
class CAIReviseConfig:
    """The critique / revision model and its rounds."""

    model: str = option(POLICY, "The reviser: policy (the policy itself, as in Bai et al.) or a model directory "
                                "with a chat template (an instruct model; in the tiny world one trained with "
                                "posttrain sft data.train=builtin:world-revise).")
    rounds: int = option(1, "Critique -> revision rounds; each samples a principle and revises the last revision.",
                         min=1, max=3)
    critique_max_new_tokens: int = option(48, "Longest critique.", min=1)
    revision_max_new_tokens: int = option(96, "Longest revision; a revision cut here is invalid (counted; the "
                                              "text stays as it was).", min=1)
    temperature: float = option(0.0, "Sampling temperature of critiques and revisions (0: greedy).", min=0.0)
    batch_size: int = option(64, "Sequences decoded together.", min=1)


@dataclass
class CAIJudgeConfig:
    """The AI labeller: scores one response (Yes / No) or compares two (A / B) under a principle."""

    model: str = option(POLICY, "The judge: policy or a model directory with a chat template (an instruct model; "
                                "in the tiny world one trained with posttrain sft data.train=builtin:world-judge).")
    score_principle: str | None = option(None, "Name of the principle under which every response and final "
                                               "revision is scored (Yes / No); null: the constitution's first.")
    score_template: str = option(DEFAULT_SCORE_TEMPLATE, "Prompt for scoring; fields {principle}, {prompt}, "
                                                         "{response}; the answer must be Yes or No.")
    compare_template: str = option(DEFAULT_COMPARE_TEMPLATE, "Prompt for comparing; fields {principle}, {prompt}, "
                                                             "{response_a}, {response_b}; the answer must be A or B.")
    reasoning: bool = option(False, "Let the judge work the question out before answering (a generative verifier): "
                                    "only its answer's last line is parsed; the default templates become the "
                                    "reasoning ones and judge.max_new_tokens must leave room for the working.")
    max_new_tokens: int = option(8, "Longest judge answer (one word; with reasoning, the working and the word).",
                                 min=1)
    pairs: str = option("compare", "How pairs are labelled: compare (the judge picks A or B, asked in both orders; a "
                                   "pair when both orders agree) or score (a pair when the judge accepts one side and "
                                   "rejects the other under judge.score_principle).", choices=("compare", "score"))
    batch_size: int = option(64, "Questions answered together.", min=1)


@dataclass
class CAISelectConfig:
    """What the loop keeps and trains on."""

    sft: str = option("all", "Final revisions written to sft.jsonl: all (valid ones, as in the paper) or judge_yes "
                             "(only those the judge scores Yes).", choices=("all", "judge_yes"))
    train: str = option("sft", "sft: fine-tune the policy on sft.jsonl (the supervised stage); none: only write "
                               "the artefacts.", choices=("sft", "none"))


@dataclass
class CAIConfig:
    """posttrain cai: Constitutional AI's critique -> revision loop, SFT data and AI-labelled pairs."""

    constitution: str = option("builtin:world", "YAML list of principles (name, critique_request, revision_request, "
                                                "optional principle: the statement the judge sees), or builtin:world.")
    verifier: list[str] = option(default_factory=lambda: ["world_correct"],
                                 help="Gold reward functions that only *measure* the loop (judge agreement, revision "
                                      "success, held-out accuracy); never trained on. [] when prompts have no answer.")
    verifier_threshold: float = option(1.0, "A response counts as correct when the verifier's reward is >= this.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    sampling: CAISamplingConfig = field(default_factory=CAISamplingConfig)
    revise: CAIReviseConfig = field(default_factory=CAIReviseConfig)
    judge: CAIJudgeConfig = field(default_factory=CAIJudgeConfig)
    select: CAISelectConfig = field(default_factory=CAISelectConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        output_dir="runs/cai", lr=3e-5, micro_batch_size=8, epochs=1.0, warmup_ratio=0.0, min_lr_ratio=1.0))

    def validate(self) -> None:
        refuse_sharding(self.train.sharding, "cai")
        if self.train.resume:
            raise ConfigError(f"train.resume={self.train.resume!r}: cai does not resume (its sampling stage is short "
                              "and is redone).", fix="remove train.resume and rerun into a new train.output_dir.")
        if self.train.eval_every:
            raise ConfigError(f"train.eval_every={self.train.eval_every}: cai evaluates before and after its SFT "
                              "stage.", fix="remove train.eval_every.")
        if self.select.sft == "judge_yes" and not self.judge.model:
            raise ConfigError("select.sft=judge_yes needs a judge.", fix="set judge.model.")
        if self.judge.reasoning and self.judge.max_new_tokens < 16:
            raise ConfigError(f"judge.reasoning=true with judge.max_new_tokens={self.judge.max_new_tokens}: a reasoning "
                              "judge needs room for its working before the answer.",
                              fix="raise judge.max_new_tokens (e.g. 96), or set judge.reasoning=false.")


