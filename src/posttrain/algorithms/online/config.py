"""The sections every sampling method shares: prompts (``data.*``), sampling (``rollout.*``) and
rewards (``reward.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import option
from ...rollout.config import BackendConfig
from ...data.fields import FIELDS_HELP
from ...errors import ConfigError

BUILTIN_PROMPTS = "builtin:world-problems"
TEACHER_REWARD = "teacher_logprob"   # the per-token reward of on-policy distillation as RL




@dataclass
class RLDataConfig:
    """Prompts: records with a ``prompt`` (string or messages) and the fields the rewards read."""

    train: str = option(BUILTIN_PROMPTS, "JSONL/Parquet prompt records (e.g. {\"prompt\", \"answer\"}; every "
                        "other field is passed to the reward functions), or builtin:world-problems.")
    eval: str | None = option("auto", "Held-out prompts scored greedily with the reward functions; auto: "
                              "the held-out split of a built-in prompt set (builtin:world-problems -> "
                              "builtin:world-problems-heldout), else none.")
    fields: dict | str | None = option(None, FIELDS_HELP)
    max_prompt_length: int = option(256, "Prompts longer than this (in tokens, chat-rendered) are dropped "
                                         "and counted.", min=1)
    world_examples: int = option(4000, "Problems generated for builtin:world-problems.", min=1, max=1_000_000)
    world_eval_examples: int = option(200, "Problems generated for the held-out builtin set.", min=1,
                                      max=1_000_000)


@dataclass
class RolloutConfig(BackendConfig):
    """Sampling: G completions per prompt (rollout.backend: the own sampler, an HF decoding loop with a
    shared prompt cache, or a colocated vLLM engine)."""

    group_size: int = option(8, "Completions per prompt (G). Group estimators (grpo, rloo) need >= 2.", min=1,
                             max=4096)
    prompts_per_step: int = option(16, "Prompts per rollout batch (each gives group_size completions).", min=1)
    max_new_tokens: int = option(64, "Longest completion; longer ones are cut and marked truncated.", min=1)
    temperature: float = option(1.0, "Sampling temperature; the trained policy is softmax(logits / temperature).",
                                gt=0.0)
    top_p: float = option(1.0, "Nucleus sampling mass.", gt=0.0, max=1.0)
    top_k: int = option(0, "Sample among the k most likely tokens (0: all).", min=0)
    batch_size: int = option(128, "Sequences decoded together.", min=1)
    mask_truncated: bool = option(False, "Leave completions that hit max_new_tokens out of the loss (counted).")
    eval_max_new_tokens: int = option(96, "Longest completion when evaluating (greedy).", min=1)
    samples_every: int = option(10, "Write the rollout's completions to samples.jsonl every N iterations "
                                    "(0: never).", min=0)


@dataclass
class RewardConfig:
    """Reward functions: registry names or module:function paths, weighted and summed."""

    functions: list[str] = option(default_factory=lambda: ["world_correct"],
                                  help="Reward functions (world_correct, format, math_answer, overlong, "
                                       "reward_model, prm, teacher_logprob (posttrain rl: log p_teacher - log "
                                       "p_policy per sampled token, with teacher.*), or package.module:function, "
                                       "which imports and runs that "
                                       "module).")
    weights: list[float] | None = option(None, "One weight per function (default 1 each).")
    gold: list[str] = option(default_factory=list, help="Functions computed and logged beside the reward but "
                             "not trained on (e.g. world_correct next to a reward_model): the reward-hacking "
                             "check compares them.")
    overlong_buffer: int | None = option(None, "DAPO's soft overlong punishment: the last N tokens before "
                                              "max_new_tokens are penalized linearly (default max_new_tokens/5).",
                                         min=1)
    reward_model: str | None = option(None, "Directory of a reward model saved by `posttrain rm` (for the "
                                            "reward_model function).")
    reward_model_batch_size: int = option(32, "Sequences per reward-model forward pass.", min=1)
    process_reward_model: str | None = option(None, "Directory of a process reward model saved by `posttrain prm` "
                                                    "(for the prm function and for process rewards).")
    process_aggregation: str = option("min", "prm function: a solution's score from its step scores (min, "
                                             "product or last).", choices=("min", "product", "last"))
    process_weight: float = option(0.0, "Process rewards: the PRM's per-step rewards, times this weight, at the "
                                        "tokens that end each step, added to the per-token rewards (needs "
                                        "a per-token estimator: loss.advantage=gae or reinforce_pp); 0: off.", min=0.0)
    process_mode: str = option("delta", "Process rewards: delta (s_i - s_(i-1), s_0 = 0.5: sums to s_last - 0.5, "
                                        "no reward for more steps) or step (s_i at each step, Math-Shepherd).",
                               choices=("delta", "step"))



@dataclass
class EnvConfig:
    """Multi-turn episodes: the policy talks to an environment (tool results, a simulated user)."""

    name: str | None = option(None, "Environment of multi-turn episodes: world-calculator, world-pieces, "
                              "world-pieces-heldout-user, world-retry, or package.module:Class (a subclass of "
                              "posttrain.envs.Environment; importing it runs that module). null: single-turn "
                              "prompt -> completion.")
    options: dict = option(default_factory=dict, help="Keyword arguments of the environment's constructor.")
    tool_parser: str | None = option(None, "How tool calls are read from the policy's text: hermes "
                                     "(<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>) or pythonic "
                                     "(<tool_call>name(key=\"value\")</tool_call>); null: the environment's own.",
                                     choices=(None, "hermes", "pythonic"))
    stop: list[str] = option(default_factory=list, help="Strings that end an assistant turn besides the end-of-turn "
                             "token (e.g. </tool_call>: the environment answers right after the call).")
    max_turns: int = option(8, "Assistant turns per episode at most (more: the episode ends truncated).", min=1)
    max_total_tokens: int = option(256, "Tokens per episode after the prompt, the policy's and the environment's "
                                        "(each turn also stops at rollout.max_new_tokens).", min=2)
    credit: str = option("episode", "episode: every turn of an episode gets the episode's advantage (the final "
                         "reward plus the per-turn rewards); turn: each turn gets the return from that turn on "
                         "(per-turn rewards discounted by env.gamma per turn), compared within the group turn by "
                         "turn (gae / reinforce_pp: per-turn rewards at each turn's last token).",
                         choices=("episode", "turn"))
    gamma: float = option(1.0, "env.credit=turn: discount per turn of the returns.", min=0.0, max=1.0)


def check_reward_config(reward: RewardConfig, *, command: str | None = None, env_rewards: bool = False) -> None:
    """The ``reward.*`` rules every sampling method shares: functions named, one weight each, a
    function either trained on or gold. ``command``: a method without per-token rewards (rft,
    online-dpo), which refuses process-reward placement instead of ignoring it. ``env_rewards``:
    an environment rewards the turns, so no reward function is needed."""
    if command is not None and reward.process_weight > 0:
        raise ConfigError(f"reward.process_weight={reward.process_weight}: `posttrain {command}` scores whole "
                          "completions, so per-step process rewards have no token to go to.",
                          fix="score solutions with the PRM as a reward function (reward.functions=[prm] with "
                          "reward.process_reward_model), and remove reward.process_weight.")
    if not reward.functions and not env_rewards:   # an environment's per-turn rewards can be the whole reward
        raise ConfigError("reward.functions is empty.", fix="name at least one reward function.")
    if reward.weights is not None and len(reward.weights) != len(reward.functions):
        raise ConfigError(f"reward.weights has {len(reward.weights)} values for {len(reward.functions)} reward "
                          "functions.", fix="give one weight per entry of reward.functions (or none for all 1).")
    overlap = set(reward.functions) & set(reward.gold)
    if overlap:
        raise ConfigError(f"reward.gold repeats {sorted(overlap)} from reward.functions.",
                          fix="list a function either as trained reward or as gold metric.")

