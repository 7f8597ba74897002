"""What every method that learns from its own samples shares (rl, rft, online-dpo, cai, prm
Monte-Carlo labels, distill seqkd / on-policy): the ``data`` / ``rollout`` / ``reward`` config
sections, prompt loading, seeds and the prompt order, scoring, and held-out evaluation. Sampling
itself goes through :mod:`posttrain.rollout`'s backend interface."""

from .config import BUILTIN_PROMPTS, TEACHER_REWARD, EnvConfig, RewardConfig, RLDataConfig, RolloutConfig, check_reward_config
from .evaluate import evaluate_prompts, prompt_evaluator
from .prompts import PromptItem, encode_prompts, load_prompt_sets, load_prompt_source, prompt_text, world_problem_records
from .scoring import build_rewards, score_rollouts
from .setup import sampling_policy
from .stream import LoopState, derive_seed, epoch_order_indices, refill_count

__all__ = ["BUILTIN_PROMPTS", "EnvConfig", "LoopState", "PromptItem", "RLDataConfig", "RewardConfig", "RolloutConfig", "TEACHER_REWARD", "build_rewards",
           "check_reward_config", "derive_seed", "encode_prompts", "epoch_order_indices", "evaluate_prompts",
           "load_prompt_sets", "load_prompt_source", "prompt_evaluator", "prompt_text", "refill_count",
           "sampling_policy", "score_rollouts", "world_problem_records"]
