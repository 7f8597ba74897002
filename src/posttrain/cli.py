"""The posttrain command line.

    posttrain quickstart                      # the tiny world: base -> SFT -> DPO / DPOP and GRPO, table + plots
    posttrain sft --config cfg.yaml k=v ...   # supervised fine-tuning
    posttrain rm --config cfg.yaml k=v ...    # reward model (Bradley-Terry, hinge, MSE, listwise)
    posttrain dpo --config cfg.yaml k=v ...   # DPO family, KTO, tilt (loss.name=...)
    posttrain rl --config cfg.yaml algorithm=grpo k=v ...   # online RL; presets also as commands:
    posttrain grpo | dr_grpo | dapo | gspo | rloo | remax | reinforce_pp | ppo  k=v ...
    posttrain rft model.name_or_path=runs/sft/final ...   # rejection-sampling fine-tuning (expert iteration)
    posttrain online-dpo model.name_or_path=runs/sft/final ...   # online / iterative DPO on sampled pairs
    posttrain prm model.name_or_path=runs/sft/final labels.source=mc labels.policy=runs/sft/final   # PRM
    posttrain cai model.name_or_path=runs/sft/final revise.model=... judge.model=...   # Constitutional AI loop
    posttrain plan --model DIR --method dpo --seq-len 2048 --devices 8 --device-memory 80   # memory planner
    posttrain eval model.name_or_path=runs/sft/final data.eval=... eval.n=8 ...   # accuracy / rewards / pass@k
    posttrain export runs/sft/final --output merged/   # merge a LoRA adapter (model.peft.method=lora)
    posttrain merge merge.yaml out/           # merge models (mergekit-style YAML: linear, slerp, ties, dare...)
    posttrain distill teacher.name_or_path=runs/sft/final ...   # token-level KD, SeqKD or on-policy into model.name_or_path
    posttrain world data --out data/          # write the tiny world's datasets as JSONL
    posttrain world build --out DIR           # rebuild the tiny world's tokenizer + base model

Errors caused by input (config, data, model directory, tokenizer, checkpoint, file system) are
printed as one paragraph that says what is wrong and how to fix it, with exit status 2. Models
load from safetensors only and never run a repository's code (docs/security.md).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shlex
import sys
from pathlib import Path

from .config import describe, load_config
from .errors import ConfigError, PosttrainError, RunInterrupted

CONFIG_HELP = "YAML config file (repeat it to layer files: later ones override earlier ones)"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


def _config_help(cls) -> str:
    return "config keys (set in the YAML file or as key=value):\n" + "\n".join(describe(cls))


def _cmd_sft(args: argparse.Namespace) -> int:
    from .algorithms.sft import SFTConfig, run_sft

    cfg = load_config(SFTConfig, args.config, args.overrides)
    result = run_sft(cfg)
    print(f"done: {result.fit.steps} steps in {result.fit.seconds:.0f}s; final model in {result.final_dir}")
    _print_eval(result.eval_metrics)
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    from .algorithms.rm import RMConfig, run_rm

    result = run_rm(load_config(RMConfig, args.config, args.overrides))
    print(f"done: {result.fit.steps} steps in {result.fit.seconds:.0f}s; reward model in {result.final_dir}")
    _print_eval(result.eval_metrics)
    return 0


def _cmd_dpo(args: argparse.Namespace) -> int:
    from .algorithms.dpo import DPOConfig, run_preference

    result = run_preference(load_config(DPOConfig, args.config, args.overrides))
    print(f"done: {result.fit.steps} steps in {result.fit.seconds:.0f}s; final model in {result.final_dir}")
    _print_eval(result.eval_metrics)
    return 0


def _cmd_rl(args: argparse.Namespace) -> int:
    from .algorithms.rl import RLConfig, run_rl

    base = {"algorithm": args.preset} if args.preset else None
    cfg = load_config(RLConfig, args.config, args.overrides, base=base)
    if args.preset and cfg.algorithm != args.preset:
        raise ConfigError(f"`posttrain {args.preset}` runs the {args.preset} preset, but algorithm={cfg.algorithm!r} "
                          "was also given.", fix=f"use `posttrain rl algorithm={cfg.algorithm}`, or drop the algorithm key.")
    result = run_rl(cfg)
    print(f"done: {result.fit.steps} steps in {result.fit.seconds:.0f}s; final model in {result.final_dir}")
    _print_eval(result.eval_metrics)
    return 0


def _print_eval(metrics: dict) -> None:
    shown = {k: v for k, v in metrics.items() if isinstance(v, float)}
    if shown:
        print("eval: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import QuickstartConfig, run_quickstart

    cfg = load_config(QuickstartConfig, args.config, args.overrides)
    run_quickstart(cfg)
    return 0


# the flags of the earlier `posttrain eval` and the keys that replace them
_EVAL_FLAGS = {"--model": "model.name_or_path", "--n": "data.world_examples", "--seed": "data.seed",
               "--max-new-tokens": "eval.max_new_tokens", "--device": "model.device",
               "--chat-template": "model.chat_template", "--samples": "eval.show_samples"}


def _cmd_eval(args: argparse.Namespace) -> int:
    from .algorithms.evaluate import EvalConfig, run_eval

    used = [flag for flag in _EVAL_FLAGS if getattr(args, "legacy_" + flag[2:].replace("-", "_")) is not None]
    if used:
        raise ConfigError(f"posttrain eval takes key=value settings; {', '.join(used)} "
                          f"{'is' if len(used) == 1 else 'are'} no longer options.",
                          fix="write " + ", ".join(f"{f} X as {_EVAL_FLAGS[f]}=X" for f in used)
                          + " (posttrain eval --help lists every key).")
    # model=DIR is short for model.name_or_path=DIR
    short = [o.startswith("model=") and not o[6:].lstrip().startswith("{") for o in args.overrides]
    overrides = ["model.name_or_path=" + o[6:] if s else o for o, s in zip(args.overrides, short)]
    run_eval(load_config(EvalConfig, args.config, overrides))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .models.loading import (
        ADAPTER_CONFIG,
        find_adapter_base,
        is_adapter_dir,
        load_tokenizer,
        merge_adapter_dir,
    )
    from .train.checkpoint import save_pretrained_atomic
    from .train.rundir import check_output_target

    src = Path(args.adapter)
    if not is_adapter_dir(src):
        raise ConfigError(f"'{src}' is not a LoRA adapter directory (it needs {ADAPTER_CONFIG} and no config.json).",
                          fix="pass the final/ (or checkpoints/step-N/model/) directory of a model.peft.method=lora run.")
    if Path(args.output).expanduser().resolve() == src.resolve():
        raise ConfigError("--output is the adapter directory itself.", fix="choose another --output directory.")
    # what can be checked is checked before the merge: the base model is there, the output can be written
    base = args.base or find_adapter_base(src, base_option="--base", key="adapter")
    out = check_output_target(args.output, key="--output", overwrite=args.overwrite, command="posttrain export",
                              protect={"the adapter": src, "the base model": base})
    tok_dir = src if (src / "tokenizer_config.json").exists() or (src / "tokenizer.json").exists() else base
    tokenizer = load_tokenizer(str(tok_dir), key="adapter" if tok_dir is src else
                               "--base" if args.base else "base_model_name_or_path")
    model = merge_adapter_dir(src, base=args.base, dtype=args.dtype, device=args.device, key="adapter",
                              base_option="--base")
    save_pretrained_atomic(model, tokenizer, out, fix="free disk space or fix the permissions of the --output "
                           f"directory's folder ('{out.parent}'), or choose another --output; nothing was written.")
    n = sum(p.numel() for p in model.parameters())
    print(f"merged {src} into {base}: {type(model).__name__} with {n:,} parameters written to {out}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .config import yaml_load
    from .merge import parse_merge_config, run_merge

    path = Path(args.config)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"Cannot read the merge config '{path}': {e.strerror}.", fix="check the path.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"The merge config '{path}' is not UTF-8 text (is it a YAML file?).",
                          fix="give the merge YAML file, saved as UTF-8.") from None
    try:
        data = yaml_load(text)
    except Exception as e:  # yaml.YAMLError (syntax, a !!python tag) or the size check
        if isinstance(e, PosttrainError):
            raise
        raise ConfigError(f"The merge config is not valid YAML: {_yaml_error(path, e)}.",
                          fix="fix the YAML syntax at that line (python tags are not allowed).") from None
    cfg = parse_merge_config(data, source=str(path))
    run_merge(cfg, args.output, overwrite=args.overwrite, key="arg:output")
    return 0


def _yaml_error(path: Path, e: Exception) -> str:
    """``file:line:column: problem (context)`` for a YAML error with a position (1-based, as editors
    count), else ``file: the error's first line``."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if mark is None or not problem:
        return f"{path}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}"
    text = f"{path}:{mark.line + 1}:{mark.column + 1}: {problem}"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        text += f" ({context}" + (f" at line {cmark.line + 1}, column {cmark.column + 1}" if cmark else "") + ")"
    return text


def _cmd_distill(args: argparse.Namespace) -> int:
    from .algorithms.distill import DistillConfig, run_distill

    cfg = load_config(DistillConfig, args.config, args.overrides)
    res = run_distill(cfg)
    print(f"done: {res.fit.steps} steps in {res.fit.seconds:.0f}s; final model in {res.final_dir}")
    return 0


def _cmd_rft(args: argparse.Namespace) -> int:
    from .algorithms.rft import RFTConfig, run_rft

    res = run_rft(load_config(RFTConfig, args.config, args.overrides))
    print(f"done: {len(res.rounds) - 1} rounds; final model in {res.final_dir}")
    _print_eval(res.eval_metrics)
    return 0


def _cmd_online_dpo(args: argparse.Namespace) -> int:
    from .algorithms.online_dpo import OnlineDPOConfig, run_online_dpo

    res = run_online_dpo(load_config(OnlineDPOConfig, args.config, args.overrides))
    print(f"done: {res.fit.steps} steps in {res.fit.seconds:.0f}s; final model in {res.final_dir}")
    _print_eval(res.eval_metrics)
    return 0


def _cmd_prm(args: argparse.Namespace) -> int:
    from .algorithms.prm import PRMConfig, run_prm

    res = run_prm(load_config(PRMConfig, args.config, args.overrides))
    print(f"done: {res.fit.steps} steps in {res.fit.seconds:.0f}s; process reward model in {res.final_dir}")
    _print_eval(res.eval_metrics)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .memory import PlanInput, load_model_shape, report

    plan = PlanInput(method=args.method, seq_len=args.seq_len, micro_batch=args.micro_batch, devices=args.devices,
                     device_memory_gib=args.device_memory, sharding=args.sharding, weight_dtype=args.dtype,
                     activation_dtype="bfloat16" if args.mixed_precision == "bf16" else args.dtype, peft=args.peft,
                     lora_r=args.lora_r, gradient_checkpointing=args.gradient_checkpointing,
                     chunked_logprobs=not args.no_chunked_logprobs, reward_model=args.reward_model, kl=not args.no_kl,
                     rollout_batch=args.rollout_batch, group_size=args.group_size, new_tokens=args.new_tokens,
                     rollout_backend=args.rollout_backend, vllm_memory_utilization=args.vllm_memory_utilization,
                     vllm_sleep=not args.no_vllm_sleep)
    plan.check()   # every flag before the model is read
    print(report(load_model_shape(args.model), plan, args.model))
    return 0


def _cmd_cai(args: argparse.Namespace) -> int:
    from .algorithms.cai import CAIConfig, run_cai

    res = run_cai(load_config(CAIConfig, args.config, args.overrides))
    print(f"done in {res.summary['seconds']:.0f}s; artefacts in {Path(res.summary['output_dir'])}"
          + (f"; final model in {res.final_dir}" if res.final_dir else ""))
    _print_eval(res.eval_metrics)
    return 0


def _cmd_world_data(args: argparse.Namespace) -> int:
    from .train.rundir import check_output_dir
    from .world.datasets import WORLD_DATA_FILES, write_world_datasets

    check_output_dir(args.out, overwrite=True, key="--out")
    existing = [n for n in WORLD_DATA_FILES if (Path(args.out) / n).exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"Option '--out' is '{args.out}', which already holds {', '.join(existing)}.",
                          fix="choose another --out directory, or add --overwrite to replace those files.")
    try:
        paths = write_world_datasets(Path(args.out), n_train=args.train, n_heldout=args.heldout, seed=args.seed,
                                     direct_fraction=args.direct_answers)
    except OSError as e:
        raise ConfigError(f"Option '--out': could not write '{e.filename}': {e.strerror}.",
                          fix="choose another --out directory, or move the file or directory in the way.") from None
    for name, p in paths.items():
        print(f"{name}: {p}")
    return 0


def _cmd_world_build(args: argparse.Namespace) -> int:
    from .world import build

    build.main([a for a in args.build_args if a != "--"])
    return 0


def _int_at_least(lowest: int):
    """An argparse type: a whole number >= ``lowest``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{value} must be at least {lowest}")
        return value
    return parse


_positive_int, _nonnegative_int = _int_at_least(1), _int_at_least(0)


def _fraction(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .algorithms.dpo import DPOConfig
    from .algorithms.rm import RMConfig
    from .algorithms.sft import SFTConfig
    from .quickstart import QuickstartConfig

    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="command")

    p = sub.add_parser("sft", help="supervised fine-tuning", formatter_class=_HelpFormatter,
                       description="Supervised fine-tuning with assistant-only / completion-only loss. "
                       "Defaults train the built-in tiny world; for a real model set model.name_or_path and "
                       "a suitable train.lr (e.g. 2e-5).", epilog=_config_help(SFTConfig))
    p.add_argument("--config", action="append", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    p.set_defaults(func=_cmd_sft)

    from .algorithms.distill import DistillConfig

    p = sub.add_parser("distill", help="distillation from a teacher: token-level KD (forward / reverse KL, JSD), "
                       "SeqKD or on-policy", formatter_class=_HelpFormatter,
                       description="Token-level KD on SFT data (loss.mode=token, loss.divergence=forward_kl / "
                       "reverse_kl / jsd), SFT on the teacher's answers (loss.mode=seqkd), or token-level KD on the "
                       "student's own samples (loss.mode=on_policy, loss.on_policy_fraction = GKD's lambda); "
                       "teacher.name_or_path must share the student's tokenizer.", epilog=_config_help(DistillConfig))
    p.add_argument("--config", action="append", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("rm", help="reward-model training (Bradley-Terry, hinge, MSE, listwise)",
                       formatter_class=_HelpFormatter,
                       description="Train a scalar reward model (AutoModelForSequenceClassification, one label) on "
                       "preference or ranked data. Defaults use the tiny world's preference pairs; set "
                       "model.name_or_path to your SFT model.", epilog=_config_help(RMConfig))
    p.add_argument("--config", action="append", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_rm)

    p = sub.add_parser("dpo", help="offline preference optimization (dpo, ipo, hinge, dpop, simpo, orpo, kto, tilt)",
                       formatter_class=_HelpFormatter,
                       description="Offline preference optimization; loss.name selects the loss. Start from an SFT "
                       "model (model.name_or_path=runs/sft/final).", epilog=_config_help(DPOConfig))
    p.add_argument("--config", action="append", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_dpo)

    from .algorithms.rl import PRESETS, RLConfig

    rl_help = ("Online RL on one loop: prompts -> G sampled completions each -> rewards -> advantages -> "
               "policy loss (+ KL) -> the shared engine. algorithm=<preset> fills the loss.* keys left unset; "
               "any part can be set on its own. Start from an SFT model (model.name_or_path=runs/sft/final).\n\n"
               "presets (the loss.* values each fills in):\n"
               + "\n".join(f"  {name:13} " + " ".join(f"{k}={v}" for k, v in parts.items())
                           for name, parts in PRESETS.items()))
    p = sub.add_parser("rl", help="online RL (presets: " + ", ".join(PRESETS) + ")", formatter_class=_HelpFormatter,
                       description=rl_help, epilog=_config_help(RLConfig))
    p.add_argument("--config", action="append", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_rl, preset=None)
    for name in PRESETS:
        p = sub.add_parser(name, help=f"online RL, the {name} preset (= posttrain rl algorithm={name})",
                           formatter_class=_HelpFormatter, description=rl_help, epilog=_config_help(RLConfig))
        p.add_argument("--config", action="append", help=CONFIG_HELP)
        p.add_argument("overrides", nargs="*", metavar="key=value")
        p.set_defaults(func=_cmd_rl, preset=name)

    from .algorithms.rft import RFTConfig

    p = sub.add_parser("rft", help="rejection-sampling fine-tuning (expert iteration) on the model's own samples",
                       formatter_class=_HelpFormatter,
                       description="Rounds of: sample K completions per prompt -> score them with the reward "
                       "functions -> keep those at or above select.threshold (distinct, at most "
                       "select.max_per_prompt per prompt) -> SFT on the kept set. Start from an SFT model "
                       "(model.name_or_path=runs/sft/final). Per round: pass@K, kept fraction, prompts with nothing "
                       "kept, held-out accuracy (rounds.jsonl); each round's kept set in round_<r>/kept.jsonl.",
                       epilog=_config_help(RFTConfig))
    p.add_argument("--config", action="append", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_rft)

    from .algorithms.online_dpo import OnlineDPOConfig

    p = sub.add_parser("online-dpo", help="online / iterative DPO on pairs sampled from the current policy",
                       formatter_class=_HelpFormatter,
                       description="Every online.steps_per_rollout optimizer steps: sample rollout.group_size "
                       "completions per prompt, score them with the reward functions, pair the best with the worst "
                       "(ties skipped and counted), and train with a paired loss of the DPO family (loss.name). "
                       "online.reference: initial (the starting policy) or refresh (the policy at each iteration's "
                       "start). Start from an SFT model (model.name_or_path=runs/sft/final).",
                       epilog=_config_help(OnlineDPOConfig))
    p.add_argument("--config", action="append", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_online_dpo)

    from .algorithms.prm import PRMConfig

    p = sub.add_parser("prm", help="process reward model: a score at every step, from gold or Monte-Carlo step labels",
                       formatter_class=_HelpFormatter,
                       description="Train an AutoModelForTokenClassification (one label) whose logit at each step's "
                       "last token scores that step, with BCE to the step labels: the records' own "
                       "(labels.source=given) or Monte-Carlo estimates from labels.policy's rollouts "
                       "(labels.source=mc, saved as step_labels.jsonl). Data: stepwise records {prompt, completions: "
                       "[steps], labels} or builtin:world-steps.", epilog=_config_help(PRMConfig))
    p.add_argument("--config", action="append", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_prm)

    class _PlanHelp(argparse.ArgumentDefaultsHelpFormatter, _HelpFormatter):   # every flag shows its default
        pass

    from .memory import METHODS, parse_count, parse_gib

    p = sub.add_parser("plan", help="memory planner: will a run fit, and what makes it fit",
                       formatter_class=_PlanHelp,
                       description="Estimate the bytes per device of weights, gradients, optimizer state, activations, "
                       "logits, frozen copies (reference, critic, reward model) and the rollouts' KV cache for a "
                       "model (directory, config.json, cached hub id or builtin:tiny-world-base) and a method, and say "
                       "whether it fits or the cheapest change that makes it fit (docs/memory.md). The output starts "
                       "with every assumption the estimate uses.")
    p.add_argument("--model", required=True, default=argparse.SUPPRESS, help="model directory, config.json, cached "
                   "hub id, or builtin:tiny-world-base (required)")
    p.add_argument("--method", default="sft", choices=METHODS, help="the posttrain method")
    p.add_argument("--seq-len", type=parse_count, default=2048, metavar="N",
                   help="tokens per sequence; online methods: of the prompt (a sequence is then --seq-len + "
                        "--new-tokens)")
    p.add_argument("--micro-batch", type=parse_count, default=1, metavar="N",
                   help="sequences (pairs for preference methods) per forward")
    p.add_argument("--devices", type=parse_count, default=1, metavar="N", help="devices (GPUs)")
    p.add_argument("--device-memory", type=parse_gib, default=80.0, metavar="GIB", help="GiB per device")
    p.add_argument("--sharding", default="none", choices=("none", "zero2", "zero3", "fsdp"),
                   help="zero2 / zero3: DeepSpeed ZeRO (train.sharding=zero2 / zero3); fsdp: FSDP2 full shard "
                        "(train.sharding=fsdp2)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weight dtype (model.dtype); also of the gradients, the AdamW moments and the frozen copies")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16"),
                   help="bf16: activations in bf16 (train.mixed_precision)")
    p.add_argument("--peft", default="none", choices=("none", "lora", "qlora"), help="adapters (model.peft)")
    p.add_argument("--lora-r", type=parse_count, default=16, metavar="N", help="LoRA rank (model.peft.r)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="estimate it (train.gradient_checkpointing=true)")
    p.add_argument("--no-chunked-logprobs", action="store_true", help="full (B, T, V) logits")
    p.add_argument("--reward-model", action="store_true", help="online: a learned reward model in memory")
    p.add_argument("--no-kl", action="store_true", help="online: no KL term, so no reference model")
    p.add_argument("--rollout-batch", type=parse_count, default=128, metavar="N",
                   help="online: sequences decoded together (rollout.batch_size)")
    p.add_argument("--group-size", type=parse_count, default=8, metavar="N",
                   help="online: completions per prompt (rollout.group_size); the sampler decodes "
                        "max(1, rollout batch // group size) prompts x group size sequences at a time")
    p.add_argument("--new-tokens", type=parse_count, default=512, metavar="N",
                   help="online: longest completion (rollout.max_new_tokens; multi-turn: a whole episode after the prompt, env.max_total_tokens)")
    p.add_argument("--rollout-backend", default="hf", choices=("hf", "vllm"),
                   help="online: hf (the own sampler's KV cache) or vllm (a colocated engine: rollout.backend=vllm)")
    p.add_argument("--vllm-memory-utilization", type=float, default=0.3, metavar="F",
                   help="online, vllm: the share of the device the engine takes (rollout.vllm.gpu_memory_utilization)")
    p.add_argument("--no-vllm-sleep", action="store_true",
                   help="online, vllm: the engine stays awake while the trainer runs (rollout.vllm.sleep=false), so "
                        "its share adds to the training step's memory")
    p.set_defaults(func=_cmd_plan)

    from .algorithms.cai import CAIConfig

    p = sub.add_parser("cai", help="Constitutional AI: critique -> revise loop, SFT data and AI-labelled pairs",
                       formatter_class=_HelpFormatter,
                       description="Sample a response per prompt from the policy; for revise.rounds rounds, sample a "
                       "principle of the constitution and have the reviser critique and revise (one chat "
                       "conversation); write the final revisions as SFT data (sft.jsonl), have the judge compare "
                       "response and revision in both orders (pairs.jsonl, for posttrain dpo / rm), measure the judge "
                       "and the revisions against the verifier, and (select.train=sft) fine-tune the policy on the "
                       "revisions. Tiny world: train the judge and reviser first with posttrain sft "
                       "data.train=builtin:world-judge / builtin:world-revise (docs/cai.md).",
                       epilog=_config_help(CAIConfig))
    p.add_argument("--config", action="append", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_cai)

    p = sub.add_parser("quickstart", help="tiny world: base model -> SFT -> DPO / DPOP and GRPO, with a table",
                       formatter_class=_HelpFormatter, epilog=_config_help(QuickstartConfig),
                       description="The built-in tiny world end to end on a CPU: writes its datasets, evaluates the "
                       "shipped base model on held-out problems, runs SFT, then DPO and DPOP and online RL (GRPO) "
                       "from the SFT model (stages=[sft,dpo,rl]; add rm for a reward model from the SFT model), "
                       "evaluates each, then prints a results table and writes "
                       "summary.json, samples.jsonl and learning_curves.png (SFT) under output_dir (default "
                       "runs/quickstart, replaced on every run), and each stage's run directory there (dpo-<loss>/ "
                       "and rl/ with their curves.png).")
    p.add_argument("--config", action="append", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_quickstart)

    from .algorithms.evaluate import EvalConfig

    p = sub.add_parser("eval", help="accuracy, mean rewards and pass@k of any model on any prompt set",
                       formatter_class=_HelpFormatter,
                       description="Evaluate a model (model.name_or_path: a run's final/, a LoRA adapter directory "
                       "(loaded merged), a merged or Hugging Face directory, builtin:tiny-world-base; model=DIR for "
                       "short) on prompt records (data.eval: JSONL / Parquet with data.fields, as posttrain rl reads "
                       "them, or builtin:world-problems-heldout, the default) with posttrain rl's reward functions "
                       "(reward.functions, reward.gold). Greedy (eval.temperature=0, the default): accuracy and the "
                       "mean reward per function; eval.n=k samples at eval.temperature > 0: pass@1 and pass@k "
                       "(unbiased estimator), mean rewards; both per level when the records have a level / "
                       "difficulty field. Prints a table; output_dir=DIR also writes eval.json (the metrics) and "
                       "samples.jsonl (every completion with its rewards). Under torchrun the processes split the "
                       "generation and rank 0 writes.", epilog=_config_help(EvalConfig))
    p.add_argument("--config", action="append", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    for flag in _EVAL_FLAGS:  # the earlier flags: refused with the key that replaces each
        p.add_argument(flag, dest="legacy_" + flag[2:].replace("-", "_"), default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="merge a LoRA adapter (a model.peft run's final/) into a full model directory")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--output", required=True, help="directory for the merged Hugging Face model (+ tokenizer)")
    p.add_argument("--base", default=None, help="base model (default: base_model_name_or_path of the adapter)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    p.set_defaults(func=_cmd_export)

    from .merge import METHODS as MERGE_METHODS, help_text as merge_help

    p = sub.add_parser("merge", help=f"merge models from a mergekit-style YAML ({', '.join(MERGE_METHODS)})",
                       formatter_class=_HelpFormatter, epilog=merge_help(),
                       description="Merge models tensor by tensor (in float32, streaming one tensor at a time) as "
                       "a mergekit-style YAML file says, and write a Hugging Face model directory.")
    p.add_argument("config", help="merge YAML (its keys, methods and parameters are listed below)")
    p.add_argument("output", help="directory for the merged Hugging Face model (+ tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_cmd_merge)

    world = sub.add_parser("world", help="the built-in tiny world")
    wsub = world.add_subparsers(dest="world_command", metavar="subcommand")
    p = wsub.add_parser("data", help="write SFT / problem datasets as JSONL")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=_positive_int, default=4000)
    p.add_argument("--heldout", type=_positive_int, default=200)
    p.add_argument("--seed", type=_nonnegative_int, default=0)
    p.add_argument("--direct-answers", type=_fraction, default=0.0, metavar="F",
                   help="share of the train conversations whose reply is only the final answer line "
                        "(`#### n`) instead of the worked solution (the quickstart uses 0.5, on levels 3 and 4 only)")
    p.add_argument("--overwrite", action="store_true", help="replace data files already in --out")
    p.set_defaults(func=_cmd_world_data)
    p = wsub.add_parser("build", help="rebuild tokenizer and base model (pre-training from scratch; "
                        "`posttrain world build --help` lists its options)", add_help=False)
    p.add_argument("build_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_world_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading / shard writing bars; ours are enough
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["world", "build"]:  # its options belong to the builder's own parser
        argv = ["world", "build", "--", *argv[2:]]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    if importlib.util.find_spec("deepspeed") is not None:
        # accelerate and transformers import deepspeed wherever it is installed, also where nothing
        # runs under it (save_pretrained unwraps the model, checking for a DeepSpeed engine)
        from .train.zero import quiet_deepspeed_import

        quiet_deepspeed_import()
    terminated = []

    def on_sigterm(signum, frame):  # a scheduler stopping the job: end like Ctrl-C, with the resume hint
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = _install_sigterm(on_sigterm)
    # under several processes only rank 0 prints progress and results (the others would repeat
    # every line); errors still go to every process's stderr, naming the rank
    other_rank = int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if other_rank else sys.stdout):
            return args.func(args)
    except PosttrainError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\n{_interrupted_message(args, e)}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        _install_sigterm(previous)


def _rl_presets() -> tuple[str, ...]:
    from .algorithms.rl import PRESETS

    return tuple(PRESETS)


def _install_sigterm(handler):
    """Set the SIGTERM handler (main thread only); returns the previous one."""
    import signal
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _interrupted_message(args: argparse.Namespace, e: KeyboardInterrupt) -> str:
    """What Ctrl-C stopped, and the command that continues it."""
    if not isinstance(e, RunInterrupted):
        return "interrupted."
    text = f"interrupted after step {e.step}/{e.total_steps}."
    if args.command not in ("sft", "rm", "dpo", "rl", *_rl_presets()):
        return text + " Run the command again to start over."
    if e.checkpoint is None:
        return (text + " No checkpoint was written yet, so the run cannot be resumed (train.save_every=N writes "
                "one every N steps).")
    cmd = ["posttrain", args.command]
    for c in args.config or []:
        cmd += ["--config", c]
    cmd += [o for o in args.overrides if not o.startswith("train.resume=")] + ["train.resume=auto"]
    return (text + f" The latest complete checkpoint is {e.checkpoint}. Continue the run with:\n  "
            + " ".join(shlex.quote(c) for c in cmd))


if __name__ == "__main__":
    sys.exit(main())
