"""Configuration of the online RL loop: the sections of ``posttrain rl`` and the named presets.

A preset is a named choice of the loop's parts (advantage estimator, policy loss, loss
aggregation, KL placement ...); it fills only the ``loss.*`` keys left null, so every part
can also be set on its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ...config import ModelConfig, TrainConfig, option
from ...errors import ConfigError
from ...ops import ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, get_advantage_estimator
from ...rollout.config import check_backend

from ..online.config import TEACHER_REWARD, EnvConfig, RewardConfig, RLDataConfig, RolloutConfig, check_reward_config

# --------------------------------------------------------------------------- presets

#: Named choices of the loop's parts. A preset fills only the ``loss.*`` keys left null.
PRESETS: dict[str, dict] = {
    # DeepSeekMath (Shao et al. 2024): group-normalized advantages, PPO clip, k3 KL in the loss,
    # per-sequence mean of token means
    "grpo": dict(advantage="grpo", normalize_by_std=True, policy_loss="ppo_clip", clip_eps=0.2,
                 aggregation="seq_mean_token_mean", kl_beta=0.04, kl_estimator="k3", kl_placement="loss"),
    # Liu et al. 2025 ("Understanding R1-Zero-like training"): no std division, a constant
    # normalizer (max completion length) instead of each response's length, no KL
    "dr_grpo": dict(advantage="grpo", normalize_by_std=False, policy_loss="ppo_clip", clip_eps=0.2,
                    aggregation="seq_mean_token_sum_norm", kl_beta=0.0),
    # Yu et al. 2025: clip-higher, dynamic sampling, token-level mean, soft overlong punishment, no KL
    "dapo": dict(advantage="grpo", normalize_by_std=True, policy_loss="ppo_clip", clip_eps=0.2,
                 clip_eps_high=0.28, aggregation="token_mean", kl_beta=0.0, dynamic_sampling=True,
                 overlong_penalty=True),
    # Zheng et al. 2025: a sequence-level (length-normalized) importance ratio, clipped per sequence
    "gspo": dict(advantage="grpo", normalize_by_std=True, policy_loss="gspo", clip_eps=3e-4, clip_eps_high=4e-4,
                 aggregation="seq_mean_token_mean", kl_beta=0.0),
    # Ahmadian et al. 2024: leave-one-out baseline, sequence-level REINFORCE, k1 KL in the reward
    "rloo": dict(advantage="rloo", policy_loss="ppo_clip", clip_eps=0.2, aggregation="seq_mean_token_sum",
                 kl_beta=0.05, kl_estimator="k1", kl_placement="reward"),
    # Li et al. 2024: the greedy completion's reward as the baseline, k1 KL in the reward
    "remax": dict(advantage="remax", policy_loss="ppo_clip", clip_eps=0.2, aggregation="seq_mean_token_sum",
                  kl_beta=0.05, kl_estimator="k1", kl_placement="reward"),
    # Hu 2025: batch-whitened returns (no critic, no group), k1 KL in the reward, token mean
    "reinforce_pp": dict(advantage="reinforce_pp", policy_loss="ppo_clip", clip_eps=0.2, aggregation="token_mean",
                         kl_beta=0.01, kl_estimator="k1", kl_placement="reward"),
    # Ouyang et al. 2022 (InstructGPT) / Ziegler et al. 2019: a critic, GAE over per-token rewards
    # (-beta * k1 on every token, the sequence reward at the last one), whitened advantages, token mean
    "ppo": dict(advantage="gae", policy_loss="ppo_clip", clip_eps=0.2, aggregation="token_mean", kl_beta=0.05,
                kl_estimator="k1", kl_placement="reward", whiten_advantages=True),
}

# what an unset key falls back to when the preset does not name it
_LOSS_FALLBACK = dict(normalize_by_std=True, clip_eps=0.2, clip_eps_high=None, dual_clip=None, kl_beta=0.0,
                      kl_estimator="k3", kl_placement="loss", dynamic_sampling=False, overlong_penalty=False,
                      whiten_advantages=False)

ONLINE_ADVANTAGES = tuple(sorted(ADVANTAGE_ESTIMATORS))


# --------------------------------------------------------------------------- config
@dataclass
class RLLossConfig:
    """The loop's parts; null means "what the algorithm preset says"."""

    advantage: str | None = option(None, "Advantage estimator: " + ", ".join(ONLINE_ADVANTAGES) + ".",
                                   choices=ONLINE_ADVANTAGES)
    normalize_by_std: bool | None = option(None, "grpo: divide by the group's std (false: Dr. GRPO).")
    advantage_eps: float = option(1e-6, "Added to the std before dividing.", gt=0.0)
    gamma: float = option(1.0, "gae: discount per token.", min=0.0, max=1.0)
    lam: float = option(0.95, "gae: lambda of the advantage estimate (1: Monte-Carlo return - V; 0: one-step TD).",
                        min=0.0, max=1.0)
    whiten_advantages: bool | None = option(None, "gae: whiten the advantages over the batch's tokens (returns stay "
                                                  "unwhitened).")
    subtract_group_mean: bool = option(False, "reinforce_pp: subtract the group mean from the reward before "
                                              "whitening (REINFORCE++-baseline).")
    policy_loss: str | None = option(None, "pg, ppo_clip, gspo or cispo.", choices=tuple(sorted(POLICY_LOSSES)))
    clip_eps: float | None = option(None, "Lower clip range (1 - eps); eps >= 1 means no lower clip (a large "
                                          "range switches the clip off).", gt=0.0)
    clip_eps_high: float | None = option(None, "Upper clip range (1 + eps_high; DAPO's clip-higher); null: "
                                               "clip_eps.", gt=0.0)
    dual_clip: float | None = option(None, "ppo_clip: bound the loss of negative-advantage tokens at "
                                           "dual_clip * |A| (> 1).", gt=1.0)
    aggregation: str | None = option(None, "token_mean, seq_mean_token_mean, seq_mean_token_sum or "
                                           "seq_mean_token_sum_norm (divides by rollout.max_new_tokens).",
                                     choices=tuple(sorted(LOSS_AGGREGATIONS)))
    kl_beta: float | None = option(None, "KL coefficient (0: no reference model is loaded).", min=0.0)
    kl_estimator: str | None = option(None, "k1, k2 or k3 (sampled estimators), or exact: the full-vocabulary KL "
                                            "at each sampled state (PPO-KL; needs kl_placement=loss; one extra "
                                            "reference forward per micro-batch and its (tokens, vocabulary) logits).",
                                      choices=("k1", "k2", "k3", "exact"))
    kl_placement: str | None = option(None, "loss: beta * k per token in the loss (GRPO); reward: -beta * k "
                                            "summed into the sequence reward (RLOO, ReMax); per token with gae (PPO) and reinforce_pp "
                                            "(each token is charged the KL of the tokens after it).",
                                      choices=("loss", "reward"))
    kl_target: float | None = option(None, "Adaptive KL (Ziegler et al.): steer beta toward this KL per "
                                           "sequence; null keeps beta fixed.", gt=0.0)
    kl_horizon: int = option(10000, "Adaptive KL horizon (samples).", min=1)
    entropy_coef: float = option(0.0, "Entropy bonus coefficient.", min=0.0)
    epochs: int = option(1, "Passes over each rollout batch (PPO's mu).", min=1)
    mini_batches: int = option(1, "Optimizer steps per pass over a rollout batch.", min=1)
    dynamic_sampling: bool | None = option(None, "DAPO: drop groups whose rewards are all equal and sample "
                                                 "more prompts to refill the batch.")
    dynamic_sampling_rounds: int = option(3, "Extra sampling rounds at most per iteration.", min=0)
    overlong_penalty: bool | None = option(None, "DAPO: add the soft overlong punishment to the reward.")
    tis_cap: float | None = option(None, "Truncated importance sampling between the rollout's and the "
                                         "trainer's log-probs, capped at this value (null: 2.0 with "
                                         "rollout.backend=vllm, off with the own sampler; 0: off).", min=0.0)
    tis_level: str = option("token", "token or sequence.", choices=("token", "sequence"))
    tis_mode: str = option("truncate", "truncate: weight min(ratio, cap); mask: weight the ratio where it is at "
                                       "most the cap and 0 (left out) where it exceeds it.",
                           choices=("truncate", "mask"))

    def resolved(self, algorithm: str, backend: str = "hf") -> RLLossConfig:
        """A copy with every null filled from the preset (then from the general fallbacks); tis_cap
        from the rollout backend (2.0 with vllm, off with the own sampler; 0 means off)."""
        preset = PRESETS[algorithm]
        values = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name in preset:
                v = preset[f.name]
            elif v is None and f.name in _LOSS_FALLBACK:
                v = _LOSS_FALLBACK[f.name]
            values[f.name] = v
        if values["tis_cap"] is None and backend == "vllm":
            values["tis_cap"] = VLLM_TIS_CAP
        if values["tis_cap"] == 0:
            values["tis_cap"] = None
        return RLLossConfig(**values)



CRITIC_INITS = ("policy", "reward_model")
# truncated IS on by default with vLLM rollouts, at the cap of Yao et al. 2025 ("Your efficient RL
# framework secretly brings you off-policy RL training")
VLLM_TIS_CAP = 2.0


@dataclass
class CriticConfig:
    """PPO's value model (only for loss.advantage=gae)."""

    init: str | None = option(None, "policy: the policy's backbone with a new zero head; reward_model: a copy of "
                                    "reward.reward_model; or a directory (a saved critic such as <run>/final/critic, "
                                    "or a reward model). Null: policy when loss.advantage needs a critic.")
    lr: float | None = option(None, "Critic learning rate (null: train.lr); follows the same schedule.", gt=0.0)
    value_clip: float | None = option(0.2, "Clip the new values to old +- this in the value loss (null: no clip).",
                                      gt=0.0)
    vf_coef: float = option(0.1, "Weight of the value loss in the summed loss (policy and critic share one "
                                 "gradient-norm clip).", gt=0.0)


@dataclass
class RLTeacherConfig:
    """On-policy distillation as RL: the teacher that scores every sampled token (teacher_logprob).

    The teacher_logprob reward of token t is log p_teacher(y_t) - log p_policy(y_t)."""

    name_or_path: str | None = option(None, "Teacher model directory (or builtin:tiny-world-base) for "
                                            "reward.functions=[teacher_logprob]; it must use the policy's tokenizer.")
    dtype: str = option("auto", "Teacher weight dtype.", choices=("auto", "float32", "bfloat16", "float16"))
    batch_size: int = option(32, "Sequences per scoring forward pass (teacher and policy).", min=1)


@dataclass
class MonitorConfig:
    """Failure-mode warnings (printed while training, flags logged every step)."""

    collapse_distinct: float = option(0.2, "Mode collapse: warn when the within-group rate of distinct "
                                           "completions falls below this ...", min=0.0, max=1.0)
    collapse_entropy: float = option(0.05, "... and the mean token entropy below this (nats) ...", min=0.0)
    collapse_fall: float = option(0.5, "... and below this fraction of the first iteration's entropy (a policy "
                                       "that starts peaked is not collapsing).", gt=0.0, max=1.0)
    kl_max: float = option(10.0, "KL blow-up: warn when the per-sequence KL to the reference exceeds this "
                                 "(nats) ...", gt=0.0)
    approx_kl_max: float = option(0.5, "... or the old-vs-new approximate KL per token exceeds this.", gt=0.0)
    hacking_window: int = option(5, "Reward hacking: iterations per half-window comparing the trained reward "
                                    "with the gold functions (0: off) ...", min=0)
    hacking_gold_drop: float = option(0.03, "... warning when the trained reward rose while the gold mean fell by "
                                            "more than this between the two half-windows.", min=0.0)
    no_reward_steps: int = option(3, "No signal: stop when this many iterations in a row have no valid reward (every "
                                     "reward NaN or None, so nothing is trained); the first one warns. 0: warn only.",
                                  min=0)
    zero_variance_warn: float = option(0.75, "Warn when, at the first iteration, at least this fraction of the "
                                             "prompt groups have identical rewards (no gradient from them; group-"
                                             "relative estimators). A later iteration warns only when every group "
                                             "does. 0: off. (The quickstart's GRPO stage starts with ~60% and learns "
                                             "well: below 3/4 is common and healthy.)", min=0.0, max=1.0)


def check_sequence_level_aggregation(loss: RLLossConfig) -> None:
    """A policy loss that declares ``sequence_level`` (GSPO: one ratio and one clip per response)
    is the paper's objective only under ``seq_mean_token_mean``: each response's tokens are
    averaged first, so every response weighs the same whatever its length. Under ``token_mean``
    (or the token-sum aggregations) a response of n tokens would weigh n times as much, which no
    sequence-level method defines; the mix is refused rather than silently reweighted."""
    if POLICY_LOSSES[loss.policy_loss].sequence_level and loss.aggregation != SEQUENCE_LEVEL_AGGREGATION:
        raise ConfigError(
            f"loss.policy_loss={loss.policy_loss} forms one importance ratio per response and averages each "
            f"response's tokens (seq_mean_token_mean), but loss.aggregation={loss.aggregation} would weight the "
            "responses by their length.",
            fix=f"set loss.aggregation={SEQUENCE_LEVEL_AGGREGATION} (the gspo preset's), or use a token-level "
            "policy loss (loss.policy_loss=ppo_clip / cispo) with this aggregation.")


SEQUENCE_LEVEL_AGGREGATION = "seq_mean_token_mean"


@dataclass
class RLConfig:
    """posttrain rl: online RL (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, ReMax, REINFORCE++, PPO)."""

    algorithm: str = option("grpo", "Preset: " + ", ".join(PRESETS) + ".", choices=tuple(PRESETS))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: RLLossConfig = field(default_factory=RLLossConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    teacher: RLTeacherConfig = field(default_factory=RLTeacherConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        output_dir="runs/rl", lr=1e-5, micro_batch_size=4, max_steps=100, epochs=0.0, warmup_ratio=0.0,
        min_lr_ratio=1.0, weight_decay=0.0))

    def validate(self) -> None:
        loss = self.loss.resolved(self.algorithm, self.rollout.backend)
        check_backend(self.rollout, self.train, "rollout")
        est = get_advantage_estimator(loss.advantage)
        check_sequence_level_aggregation(loss)
        g = self.rollout.group_size
        if est.needs_groups and g < 2:
            raise ConfigError(
                f"loss.advantage={loss.advantage} compares the samples of a prompt with each other, but "
                f"rollout.group_size is {g}.",
                fix="set rollout.group_size to 2 or more (4-16 is usual), or use loss.advantage=remax / "
                "reinforce_pp / none, which work with one sample per prompt.")
        if est.needs_critic and self.critic.init == "none":
            raise ConfigError(
                f"loss.advantage={loss.advantage} estimates advantages with a value model, but critic.init is none.",
                fix="set critic.init=policy (or reward_model, or a saved critic's directory), or pick an estimator "
                "without a critic (loss.advantage=grpo / rloo / remax / reinforce_pp).")
        if not est.needs_critic:
            set_keys = [f"critic.{k}={getattr(self.critic, k)!r}" for k in ("init", "lr")
                        if getattr(self.critic, k) not in (None, "none")]
            if set_keys:
                raise ConfigError(
                    f"{', '.join(set_keys)} configures a critic, but loss.advantage={loss.advantage} uses none "
                    "(only gae does): it would be trained for nothing.",
                    fix="remove the critic.* keys, or use algorithm=ppo / loss.advantage=gae.")
        if est.needs_critic and self.critic.init in (None, "policy") and self.model.peft.quantize != "none":
            raise ConfigError(
                f"critic.init={self.critic.init or 'policy'} copies the policy's backbone, but model.peft.quantize="
                f"{self.model.peft.quantize} loads it in 4 bits, which a critic cannot train.",
                fix="set critic.init to a reward model or saved critic directory (it loads in full precision), or "
                "model.peft.quantize=none.")
        if self.critic.init == "reward_model" and not self.reward.reward_model:
            raise ConfigError("critic.init=reward_model but reward.reward_model is not set.",
                              fix="set reward.reward_model to a directory saved by `posttrain rm`, or use "
                              "critic.init=policy.")
        if self.train.grad_accum != 1:
            raise ConfigError(
                f"train.grad_accum={self.train.grad_accum}: in online RL the micro-batches of an optimizer step "
                "follow from the rollout batch (rollout.prompts_per_step / loss.mini_batches groups, "
                "train.micro_batch_size groups per forward pass).",
                fix="remove train.grad_accum; set loss.mini_batches and train.micro_batch_size instead.")
        if loss.mini_batches > self.rollout.prompts_per_step:
            raise ConfigError(
                f"loss.mini_batches={loss.mini_batches} is more than rollout.prompts_per_step="
                f"{self.rollout.prompts_per_step}: a mini-batch would hold no prompt group.",
                fix="lower loss.mini_batches or raise rollout.prompts_per_step.")
        if self.train.epochs != 0:
            raise ConfigError(
                f"train.epochs={self.train.epochs}: online RL counts optimizer steps (train.max_steps), since each "
                "iteration samples new completions.", fix="set train.epochs=0 and train.max_steps=N.")
        per_iter = loss.epochs * loss.mini_batches
        if self.train.max_steps % per_iter:
            raise ConfigError(
                f"train.max_steps={self.train.max_steps} is not a multiple of loss.epochs * loss.mini_batches = "
                f"{per_iter} (the optimizer steps of one rollout batch).",
                fix=f"set train.max_steps to a multiple of {per_iter}.")
        if self.train.save_every % per_iter:
            raise ConfigError(
                f"train.save_every={self.train.save_every} would checkpoint in the middle of a rollout batch "
                f"({per_iter} optimizer steps each), which a resume could not continue exactly.",
                fix=f"set train.save_every to a multiple of {per_iter}.")
        check_reward_config(self.reward, env_rewards=bool(self.env.name))
        uses_teacher = TEACHER_REWARD in self.reward.functions + self.reward.gold
        if uses_teacher and not self.teacher.name_or_path:
            raise ConfigError(
                f"reward.functions names {TEACHER_REWARD} (the teacher scores every sampled token: on-policy "
                "distillation as RL), but teacher.name_or_path is not set.",
                fix="set teacher.name_or_path to the teacher model's directory (it must use the policy's tokenizer).")
        if self.teacher.name_or_path and not uses_teacher:
            raise ConfigError(
                f"teacher.name_or_path={self.teacher.name_or_path!r} is set, but no reward function reads a teacher: "
                "it would be loaded for nothing.",
                fix=f"add {TEACHER_REWARD} to reward.functions (on-policy distillation as RL), or remove "
                "teacher.name_or_path.")
        if self.reward.process_weight > 0:
            if not est.token_level:
                raise ConfigError(
                    f"reward.process_weight={self.reward.process_weight} places rewards at the tokens ending each step, "
                    f"but loss.advantage={loss.advantage} gives one advantage per sequence.",
                    fix="use algorithm=ppo (loss.advantage=gae) or reinforce_pp, or score whole solutions with the "
                    "prm function (reward.functions=[prm]) and reward.process_weight=0.")
            if not self.reward.process_reward_model:
                raise ConfigError("reward.process_weight > 0 but reward.process_reward_model is not set.",
                                  fix="set reward.process_reward_model to a directory saved by `posttrain prm`.")
        if loss.kl_beta > 0 and loss.kl_estimator == "exact" and loss.kl_placement != "loss":
            raise ConfigError(
                f"loss.kl_estimator=exact computes the KL over the whole vocabulary inside the loss, but "
                f"loss.kl_placement={loss.kl_placement} puts a per-token estimate into the reward.",
                fix="set loss.kl_placement=loss, or use loss.kl_estimator=k1 (the usual in-reward estimator).")
        if self.env.name:
            check_env_config(self, loss, est)
        if loss.kl_target is not None and loss.kl_beta == 0:
            raise ConfigError("loss.kl_target is set but loss.kl_beta is 0: the adaptive controller scales beta.",
                              fix="set loss.kl_beta > 0 as the starting value, or remove loss.kl_target.")


def check_env_config(cfg: RLConfig, loss: RLLossConfig, est) -> None:
    """The combinations multi-turn episodes do not support, refused with the way out."""
    if TEACHER_REWARD in cfg.reward.functions + cfg.reward.gold or cfg.reward.process_weight > 0:
        raise ConfigError(
            f"env.name={cfg.env.name!r} with per-token rewards ({TEACHER_REWARD} or reward.process_weight): "
            "per-token rewards of multi-turn episodes are not supported.",
            fix="use the environment's per-turn rewards (env.credit=turn), or train single-turn (env.name=null).")
    if cfg.env.credit == "turn" and est.needs_baseline:
        raise ConfigError(
            f"env.credit=turn with loss.advantage={loss.advantage}: ReMax's baseline is one greedy episode's "
            "reward, which has no return per turn.",
            fix="use env.credit=episode with remax, or a group estimator (grpo, rloo) with env.credit=turn.")
    if cfg.env.max_total_tokens < cfg.rollout.max_new_tokens:
        raise ConfigError(
            f"env.max_total_tokens={cfg.env.max_total_tokens} is less than rollout.max_new_tokens="
            f"{cfg.rollout.max_new_tokens}: no turn could use its whole budget.",
            fix="raise env.max_total_tokens (it bounds the whole episode after the prompt) or lower "
            "rollout.max_new_tokens (one turn).")
