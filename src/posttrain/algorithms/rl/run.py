"""``posttrain rl``: the entry point that wires the policy, rewards, runner and plan onto the engine."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path


from ...config import unused_notes, validated
from ...models.loading import read_paths
from ...models.peft import apply_peft
from ...ops import AdaptiveKLController, FixedKLController, get_advantage_estimator, get_policy_loss
from ...rewards import check_reward_fields
from ...train.engine import FitResult, fit
from ...train.rundir import check_output_dir
from .critic import PolicyWithCritic, check_critic_fits, critic_from_policy
from .config import CRITIC_INITS, RLConfig, RLLossConfig
from .monitor import RLState
from ...train.curves import plot_rl_curves
from ..sequences import reference_policy
from ..online.evaluate import prompt_evaluator
from ..online.prompts import load_prompt_sets
from ..online.setup import sampling_policy
from ..online.scoring import build_rewards
from .loss import OnlineRLAlgorithm
from .plan import RolloutPlan
from .runner import RLRunner


# --------------------------------------------------------------------------- entry point


@dataclass
class RLResult:
    fit: FitResult
    final_dir: Path | None
    loss: RLLossConfig
    eval_metrics: dict = dataclasses.field(default_factory=dict)


def _unused(cfg: RLConfig, loss: RLLossConfig) -> list[str]:
    notes = []
    spec = get_policy_loss(loss.policy_loss)
    for h in ("clip_eps_high", "dual_clip"):
        if getattr(cfg.loss, h) is not None and h not in spec.hyperparameters:
            notes.append(f"loss.{h}={getattr(cfg.loss, h)!r} is not used: policy loss '{loss.policy_loss}' "
                         f"takes {', '.join(spec.hyperparameters) or 'no hyper-parameters'}.")
    if loss.kl_beta == 0:
        notes += unused_notes(cfg.loss, "loss.", ["kl_estimator", "kl_placement", "kl_target"], "loss.kl_beta is 0")
    if not loss.dynamic_sampling:
        notes += unused_notes(cfg.loss, "loss.", ["dynamic_sampling_rounds"], "dynamic sampling is off")
    if loss.tis_cap is None:
        notes += unused_notes(cfg.loss, "loss.", ["tis_level", "tis_mode"], "truncated importance sampling is off")
    if "subtract_group_mean" not in get_advantage_estimator(loss.advantage).hyperparameters:
        notes += unused_notes(cfg.loss, "loss.", ["subtract_group_mean"],
                              f"loss.advantage={loss.advantage} does not take it")
    if "reward_model" not in cfg.reward.functions + cfg.reward.gold:
        notes += unused_notes(cfg.reward, "reward.", ["reward_model"], "no reward_model function is used")
    if "prm" not in cfg.reward.functions + cfg.reward.gold:
        notes += unused_notes(cfg.reward, "reward.", ["process_aggregation"], "no prm function is used")
    if cfg.reward.process_weight == 0:
        notes += unused_notes(cfg.reward, "reward.", ["process_mode"], "reward.process_weight is 0")
        if "prm" not in cfg.reward.functions + cfg.reward.gold:
            notes += unused_notes(cfg.reward, "reward.", ["process_reward_model"], "no prm function is used and "
                                  "reward.process_weight is 0")
    if not {"reward_model", "prm"} & set(cfg.reward.functions + cfg.reward.gold) and cfg.reward.process_weight == 0:
        notes += unused_notes(cfg.reward, "reward.", ["reward_model_batch_size"], "no model scores the rewards")
    if not cfg.teacher.name_or_path:
        notes += unused_notes(cfg.teacher, "teacher.", ["dtype", "batch_size"], "teacher.name_or_path is not set")
    if not cfg.env.name:
        notes += unused_notes(cfg.env, "env.", ["options", "tool_parser", "stop", "max_turns", "max_total_tokens", "credit",
                                                "gamma"], "env.name is not set (single-turn)")
    else:
        if cfg.env.credit != "turn":
            notes += unused_notes(cfg.env, "env.", ["gamma"], "env.credit is not turn")
        notes += unused_notes(cfg.rollout, "rollout.", ["eval_max_new_tokens"], "held-out episodes are played with the "
                              "training limits (rollout.max_new_tokens per turn, env.max_total_tokens)")
    return notes


def run_rl(cfg: RLConfig, *, model=None, tokenizer=None, log=print, extra_eval=None,
           eval_times: int | None = None) -> RLResult:
    """Run online RL as configured (see the module docstring)."""
    cfg = validated(cfg, RLConfig)
    log = log or (lambda line: None)
    loss = cfg.loss.resolved(cfg.algorithm, cfg.rollout.backend)
    critic_dir = cfg.critic.init if cfg.critic.init not in (None, "none", *CRITIC_INITS) else None
    check_output_dir(cfg.train.output_dir, resume=cfg.train.resume, overwrite=cfg.train.overwrite_output_dir,
                     protect=read_paths(cfg.model, **{"reward.reward_model": cfg.reward.reward_model,
                                                      "reward.process_reward_model": cfg.reward.process_reward_model,
                                                      "critic.init": critic_dir,
                                                      "teacher.name_or_path": cfg.teacher.name_or_path}))
    episodes = bool(cfg.env.name)   # multi-turn: an episode holds up to env.max_total_tokens after the prompt
    accelerator, tokenizer, model = sampling_policy(
        cfg, model=model, tokenizer=tokenizer,
        max_new_tokens=cfg.env.max_total_tokens if episodes else cfg.rollout.max_new_tokens,
        new_tokens_key="env.max_total_tokens" if episodes else "rollout.max_new_tokens")
    # the critic (only for estimators that need one) copies the policy's backbone before any adapter is added
    critic = None
    if get_advantage_estimator(loss.advantage).needs_critic:
        critic = build_critic(cfg, model, tokenizer, device=str(accelerator.device), log=log)
    model = apply_peft(model, cfg.model.peft, log=log)

    prompts, eval_prompts, train_source = load_prompt_sets(cfg.data, tokenizer, seed=cfg.train.seed, log=log)
    functions, gold = build_rewards(cfg.reward, tokenizer, accelerator.device, max_new_tokens=cfg.rollout.max_new_tokens,
                                    overlong=loss.overlong_penalty, teacher=cfg.teacher, policy=model,
                                    temperature=cfg.rollout.temperature,
                                    attn_implementation=cfg.model.attn_implementation)
    check_reward_fields(functions + gold, set(prompts[0].fields), train_source)

    # reference (only when the KL term is on)
    reference = None
    if loss.kl_beta > 0:
        reference = reference_policy(model)
    kl = (AdaptiveKLController(loss.kl_beta, loss.kl_target, loss.kl_horizon) if loss.kl_target is not None
          else FixedKLController(loss.kl_beta))
    algorithm = OnlineRLAlgorithm(loss, temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                                  critic=cfg.critic)
    algorithm.reference = reference
    # the critic (only for estimators that need one): trained beside the policy by the same engine
    trained = model
    if critic is not None:
        trained = PolicyWithCritic(model, critic, critic_lr=cfg.critic.lr or cfg.train.lr)
    state = RLState(cfg.monitor, kl, log=log, gold=bool(gold))
    out_dir = Path(cfg.train.output_dir)
    runner = RLRunner(cfg, loss, model=model, tokenizer=tokenizer, reference=reference, prompts=prompts,
                      rewards=functions, gold=gold, algorithm=algorithm, state=state, out_dir=out_dir, log=log,
                      critic=critic)
    plan = RolloutPlan(runner, cfg.train.max_steps)
    parts = {k: getattr(loss, k) for k in ("advantage", "policy_loss", "aggregation", "kl_beta")}
    log(f"algorithm {cfg.algorithm}: " + ", ".join(f"{k}={v}" for k, v in parts.items())
        + (f", kl {loss.kl_estimator} in the {loss.kl_placement}" if loss.kl_beta > 0 else "")
        + f"; {cfg.train.max_steps} optimizer steps, {cfg.train.max_steps // plan.per_iter} rollout batches of "
        f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size} samples")
    for note in _unused(cfg, loss):
        log(f"note: {note}")

    if runner.episodes is not None:
        from .multiturn import episode_evaluator

        log(f"environment {cfg.env.name}: at most {cfg.env.max_turns} turns and {cfg.env.max_total_tokens} tokens per "
            f"episode, tool calls read as {runner.episodes.parser}, credit per {cfg.env.credit}")
        evaluate = episode_evaluator(runner.episodes, tokenizer, eval_prompts, functions + gold, extra_eval=extra_eval,
                                     backend=runner.eval_backend)
    else:
        evaluate = prompt_evaluator(tokenizer, eval_prompts, functions + gold,
                                    max_new_tokens=cfg.rollout.eval_max_new_tokens, extra_eval=extra_eval,
                                    backend=runner.eval_backend)
    run_config = dataclasses.asdict(cfg)
    run_config["resolved_loss"] = dataclasses.asdict(loss)
    inputs = {"reward_model_sha256": _file_digest(cfg.reward.reward_model)} if cfg.reward.reward_model else {}
    if cfg.reward.process_reward_model:
        inputs["process_reward_model_sha256"] = _file_digest(cfg.reward.process_reward_model)
    if critic_dir:
        inputs["critic_init_sha256"] = _file_digest(critic_dir)
    if cfg.teacher.name_or_path:
        inputs["teacher_sha256"] = _file_digest(cfg.teacher.name_or_path)
    result = fit(trained, algorithm, plan, cfg.train, tokenizer=tokenizer, accelerator=accelerator,
                 evaluate=evaluate, run_config=run_config, inputs=inputs, log=log,
                 callbacks=[state], eval_times=eval_times, eval_at_start=True)
    if accelerator.is_main_process and result.history:
        plot_rl_curves(result.history, result.eval_history, out_dir / "curves.png", title=f"posttrain {cfg.algorithm}")
    return RLResult(fit=result, final_dir=result.final_dir, loss=loss,
                    eval_metrics=result.eval_history[-1] if result.eval_history else {})


def build_critic(cfg: RLConfig, policy, tokenizer, *, device: str, log):
    """The value model as ``critic.init`` says (see :mod:`posttrain.algorithms.critic`)."""
    from ..rm import load_reward_model

    init = cfg.critic.init or "policy"
    if init == "policy":
        critic = critic_from_policy(policy, pad_token_id=tokenizer.pad_token_id)
        log("critic: the policy's backbone with a zero value head")
    else:
        path = cfg.reward.reward_model if init == "reward_model" else init
        key = "reward.reward_model" if init == "reward_model" else "critic.init"
        critic = load_reward_model(path, tokenizer, dtype=cfg.model.dtype, device=device,
                                   attn_implementation=cfg.model.attn_implementation, key=key)
        check_critic_fits(critic, policy, source=init)
        log(f"critic: from {path}")
    critic.train()
    return critic


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    p = Path(path)
    for f in sorted(p.glob("*.safetensors")) if p.is_dir() else []:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]

