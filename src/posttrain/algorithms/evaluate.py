"""posttrain eval: accuracy, mean rewards and pass@k of any model on any prompt set — the one evaluator.

    posttrain eval model.name_or_path=runs/sft/final                       # the world's held-out problems, greedy
    posttrain eval model.name_or_path=DIR data.eval=my.jsonl reward.functions=[math_answer] \\
        eval.n=8 eval.temperature=1.0 output_dir=runs/eval                  # pass@1 and pass@8

The path::

    prompt records (data.eval: JSONL / Parquet with data.fields, or builtin:world-problems[-heldout])
      --chat template--> prompts (longer than data.max_prompt_length: dropped and counted)
      --rollout backend: eval.n completions each, greedy at eval.temperature=0--> completions
      --reward functions (the reward.* section of posttrain rl; reward.gold scored beside)--> rewards
      --summary--> greedy: accuracy; sampled: pass@1 and pass@n; mean reward per function, the
                   weighted total, response length, share stopped by itself; again per level

Data, field maps and rewards are posttrain rl's own (:func:`~posttrain.algorithms.online.load_prompt_source`,
:func:`~posttrain.algorithms.online.encode_prompts`, :func:`~posttrain.algorithms.online.build_rewards`,
:func:`~posttrain.algorithms.online.score_rollouts`), so a prompt file and a reward config that train
also evaluate. Accuracy and pass@k read one reward function as correctness (``eval.correct``;
default the verifier, ``world_correct`` or ``math_answer``, when one is scored): a sample is
correct when its value is ``>= eval.threshold``. pass@k is the unbiased estimator ``1 - C(n-c, k)
/ C(n, k)`` per prompt (:func:`posttrain.ops.pass_at_k`), averaged over the prompts whose ``n``
samples all have a valid correctness. Per-level breakdowns: the records' ``level`` (else
``difficulty``) field, or ``eval.group_by``.

Sample ``j`` of prompt ``i`` draws from ``(eval.seed, i, j)``, so a result does not depend on
``eval.batch_size`` or on the number of processes: under ``torchrun`` each process generates every
N-th prompt of a batch, every process gets the whole batch, and rank 0 writes.

The tiny world's evaluation (:func:`posttrain.world.evaluate.evaluate_problems`, behind the
quickstart and ``world build``) is :func:`evaluate_model` with ``world_correct`` and the world's
strict format, and the training loops' held-out evaluation
(:func:`~posttrain.algorithms.online.evaluate_prompts`) is it greedy with their reward functions
(tests pin the three to the same completions and numbers).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path


from ..config import ModelConfig, option, unused_notes, validated
from ..data.fields import FIELDS_HELP
from ..errors import ConfigError, DataError, TokenizerError
from ..models.loading import accelerator_for, check_tokenizer_fits, load_policy, tokenizer_for
from ..rewards import check_reward_fields
from ..rollout import BackendConfig, SamplingParams, backend_for
from ..train.plan import init_distributed, rank_world, write_on_main
from ..train.rundir import check_output_dir
from .online import (
    BUILTIN_PROMPTS,
    RewardConfig,
    RLDataConfig,
    TEACHER_REWARD,
    build_rewards,
    check_reward_config,
    encode_prompts,
    load_prompt_source,
)
from .online.evaluate import EvalResult, evaluate_model

EVAL_FILE, SAMPLES_FILE = "eval.json", "samples.jsonl"
VERIFIERS = ("world_correct", "math_answer")   # what eval.correct=auto reads as correctness
GROUP_FIELDS = ("level", "difficulty")          # what eval.group_by=auto breaks the metrics down by

# --------------------------------------------------------------------------- config


@dataclass
class EvalDataConfig:
    """The prompts: records with a prompt (string or messages) and the fields the rewards read."""

    eval: str = option(BUILTIN_PROMPTS + "-heldout",
                       "JSONL/Parquet prompt records, as for posttrain rl (e.g. {\"prompt\", \"answer\"}; every other "
                       "field is passed to the reward functions), or builtin:world-problems-heldout / "
                       "builtin:world-problems (the tiny world's held-out / train-split problems).")
    fields: dict | str | None = option(None, FIELDS_HELP)
    max_prompt_length: int = option(256, "Prompts longer than this (in tokens, chat-rendered) are dropped and "
                                         "counted.", min=1)
    world_examples: int = option(200, "Problems generated for a builtin:world-problems set.", min=1, max=1_000_000)
    seed: int = option(0, "Seed of the generated world problems (posttrain rl's held-out set uses train.seed, the "
                          "quickstart its seed; both 0 by default).", min=0, max=2**32 - 1)


@dataclass
class EvalSamplingConfig(BackendConfig):
    """Decoding and metrics: greedy (temperature 0), or n samples per prompt for pass@k (eval.backend: the
    own sampler or a vLLM engine)."""

    n: int = option(1, "Completions per prompt: 1 at temperature 0 is greedy accuracy; n samples at temperature > 0 "
                       "give pass@1 and pass@n.", min=1, max=4096)
    temperature: float = option(0.0, "0: greedy decoding; > 0: sampling at this temperature.", min=0.0)
    top_p: float = option(1.0, "Nucleus sampling mass.", gt=0.0, max=1.0)
    top_k: int = option(0, "Sample among the k most likely tokens (0: all).", min=0)
    seed: int = option(0, "Sampling seed: sample j of prompt i draws from (seed, i, j), whatever the batch size or "
                          "the number of processes.", min=0, max=2**32 - 1)
    max_new_tokens: int = option(96, "Longest completion (as posttrain rl's held-out evaluation: "
                                     "rollout.eval_max_new_tokens).", min=1)
    batch_size: int = option(64, "Sequences decoded together (changes nothing but speed).", min=1)
    correct: str | None = option("auto", "The reward function read as correctness for accuracy and pass@k (a sample "
                                         "is correct when its value >= eval.threshold); auto: world_correct or "
                                         "math_answer when scored; null: none (mean rewards only).")
    threshold: float = option(1.0, "A sample is correct when the eval.correct function gives at least this.")
    group_by: str | None = option("auto", "Record field to break the metrics down by; auto: level, else difficulty, "
                                          "when the records have it; null: no breakdown.")
    show_samples: int = option(0, "Print this many prompts with their first completion after the table.", min=0)
    progress: bool = option(True, "Show a progress bar.")


@dataclass
class EvalConfig:
    """posttrain eval: accuracy, mean rewards and pass@k of a model on a prompt set."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    output_dir: str | None = option(None, "Directory for eval.json (the metrics) and samples.jsonl (every completion "
                                          "with its rewards); null: print only.")
    overwrite: bool = option(False, "Replace an eval.json / samples.jsonl already in output_dir.")

    def validate(self) -> None:
        e = self.eval
        if self.model.peft.enabled:
            raise ConfigError(f"model.peft.method={self.model.peft.method}: posttrain eval trains nothing, so a new "
                              "adapter would only add untrained (zero) weights.",
                              fix="remove the model.peft.* keys; to evaluate a trained adapter, set "
                              "model.name_or_path to its directory (it loads merged into its base model).")
        if e.n > 1 and e.temperature == 0:
            raise ConfigError(f"eval.n={e.n} with eval.temperature=0: greedy decoding gives the same completion "
                              f"{e.n} times, so pass@{e.n} would be the greedy accuracy.",
                              fix="set eval.temperature > 0 (e.g. 1.0) to sample, or eval.n=1 for greedy accuracy.")
        check_reward_config(self.reward, command="eval")
        if TEACHER_REWARD in self.reward.functions + self.reward.gold:
            raise ConfigError(f"reward.functions names {TEACHER_REWARD}, which scores sampled tokens against "
                              "teacher.name_or_path during posttrain rl; posttrain eval has no teacher.",
                              fix=f"remove {TEACHER_REWARD} from reward.functions / reward.gold.")
        named = self.reward.functions + self.reward.gold
        if e.correct not in (None, "auto") and e.correct not in named:
            raise ConfigError(f"eval.correct={e.correct!r} is not one of the scored functions ({', '.join(named)}).",
                              fix="name one of reward.functions / reward.gold, add it to reward.gold, or set "
                              "eval.correct=auto.")
        if self.output_dir is not None and not str(self.output_dir).strip():
            raise ConfigError("Config key 'output_dir' is empty.",
                              fix="set output_dir to a directory, or null (the default) to print only.")


# --------------------------------------------------------------------------- the command


def _prompt_source(data: EvalDataConfig):
    """``data.eval`` loaded as posttrain rl loads prompts (field maps, built-in world sets)."""
    rl_data = RLDataConfig(train=data.eval, eval=None, fields=data.fields, max_prompt_length=data.max_prompt_length,
                           world_examples=data.world_examples, world_eval_examples=data.world_examples)
    ds = load_prompt_source(data.eval, rl_data, data.seed, key="data.eval")
    return ds, (data.eval if data.eval.startswith("builtin:") else ds.source)


def _group_field(ds, group_by: str | None) -> str | None:
    """The field the metrics break down by: ``auto`` picks the first of :data:`GROUP_FIELDS` every
    record has; a named field must be in every record (an error names the first that lacks it)."""
    if group_by is None:
        return None
    if group_by == "auto":
        return next((f for f in GROUP_FIELDS if ds.records and all(f in r for r in ds.records)), None)
    for i, r in enumerate(ds.records):
        if group_by not in r:
            raise DataError(f"{ds.where(i, group_by)}: eval.group_by={group_by!r} breaks the metrics down by this "
                            f"field, which the record lacks (it has {', '.join(sorted(r)) or 'no fields'}).",
                            fix=f"add '{group_by}' to every record, or set eval.group_by=auto / null.")
    return group_by


def _correct_name(correct: str | None, functions, gold) -> str | None:
    if correct != "auto":
        return correct
    names = [f.name for f in [*functions, *gold]]
    return next((name for name in names if name in VERIFIERS), None)


def _check_output(cfg: EvalConfig) -> Path | None:
    """The output directory, checked before anything is loaded: what every run directory gets
    (not a file, not under a file, writable), and no earlier eval.json / samples.jsonl there
    unless ``overwrite``."""
    if cfg.output_dir is None:
        return None
    check_output_dir(cfg.output_dir, overwrite=True, key="output_dir", overwrite_key="overwrite=true")
    out = Path(cfg.output_dir).expanduser()
    for name in (EVAL_FILE, SAMPLES_FILE):
        if (out / name).is_dir():
            raise ConfigError(f"'{out / name}' is a directory, but posttrain eval writes its {name} file there.",
                              fix="move the directory away or choose another output_dir.")
    existing = [name for name in (EVAL_FILE, SAMPLES_FILE) if (out / name).exists()]
    if existing and not cfg.overwrite:
        raise ConfigError(f"Config key 'output_dir' is '{cfg.output_dir}', which already holds "
                          f"{' and '.join(existing)}.",
                          fix="choose another output_dir, or set overwrite=true to replace those files.")
    return out


def _unused(cfg: EvalConfig) -> list[str]:
    e, r = cfg.eval, cfg.reward
    named = r.functions + r.gold
    notes = []
    if e.temperature == 0:
        notes += unused_notes(e, "eval.", ["top_p", "top_k", "seed"], "eval.temperature=0 decodes greedily")
    if "reward_model" not in named:
        notes += unused_notes(r, "reward.", ["reward_model"], "no reward_model function is scored")
    if "prm" not in named:
        notes += unused_notes(r, "reward.", ["process_reward_model", "process_aggregation"],
                              "no prm function is scored")
    notes += unused_notes(r, "reward.", ["process_mode"], "posttrain eval places no per-step process rewards")
    if not {"reward_model", "prm"} & set(named):
        notes += unused_notes(r, "reward.", ["reward_model_batch_size"], "no model scores the rewards")
    if "overlong" not in named:
        notes += unused_notes(r, "reward.", ["overlong_buffer"], "no overlong function is scored")
    if e.correct is None or (e.correct == "auto" and not set(VERIFIERS) & set(named)):
        notes += unused_notes(e, "eval.", ["threshold"], "no function is read as correctness")
    return notes


def run_eval(cfg: EvalConfig, log=print, *, model=None, tokenizer=None) -> EvalResult:
    """Evaluate ``model.name_or_path`` (or ``model``) on ``data.eval`` as configured (see the module
    docstring): print the table, write ``eval.json`` and ``samples.jsonl`` to ``output_dir``."""
    cfg = validated(cfg, EvalConfig)
    log = log or (lambda line: None)
    e = cfg.eval
    out = _check_output(cfg)
    init_distributed()
    rank, world = rank_world()
    accelerator = accelerator_for(cfg.model)
    tokenizer = tokenizer or tokenizer_for(cfg.model)
    ds, source = _prompt_source(cfg.data)
    group_by = _group_field(ds, e.group_by)
    prompts, dropped = encode_prompts(ds, tokenizer, max_prompt_length=cfg.data.max_prompt_length)
    if not prompts:
        raise DataError(f"No prompts are left from {source}: all {len(ds.records)} are longer than "
                        f"data.max_prompt_length={cfg.data.max_prompt_length} tokens.",
                        fix="raise data.max_prompt_length or check the data.")
    if any(not p.ids for p in prompts):
        raise TokenizerError("the chat template renders a prompt as an empty prompt (no tokens).",
                             fix="correct the template (model.chat_template, or the tokenizer's chat_template).")
    functions, gold = build_rewards(cfg.reward, tokenizer, accelerator.device, max_new_tokens=e.max_new_tokens)
    check_reward_fields(functions + gold, set(prompts[0].fields), source)
    correct = _correct_name(e.correct, functions, gold)
    if model is None:
        model = load_policy(cfg.model, accelerator)
    check_tokenizer_fits(tokenizer, model, key="model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")
    sampling = SamplingParams(e.max_new_tokens, e.temperature, e.top_p, e.top_k, n=e.n, seed=e.seed)
    how = "greedy" if e.temperature == 0 else (f"{e.n} sample{'s' if e.n > 1 else ''} each at temperature "
                                              f"{e.temperature:g}" + (f", top_p {e.top_p:g}" if e.top_p < 1 else "")
                                              + (f", top_k {e.top_k}" if e.top_k else "") + f", seed {e.seed}")
    log(f"eval {cfg.model.name_or_path} on {source}: {len(prompts)} prompts"
        + (f" ({dropped} longer than data.max_prompt_length={cfg.data.max_prompt_length} dropped)" if dropped else "")
        + f", {how}, at most {e.max_new_tokens} new tokens; rewards "
        + ", ".join(f"{f.name}" + (f" x{f.weight:g}" if f.weight != 1 else "") for f in functions)
        + (f"; gold {', '.join(f.name for f in gold)}" if gold else "")
        + (f"; correctness: {correct} >= {e.threshold:g}" if correct else "; no correctness function")
        + (f"; {world} processes" if world > 1 else ""))
    for note in _unused(cfg):
        log(f"note: {note}")
    result = evaluate_model(model, tokenizer, prompts, functions, sampling, gold=gold, correct=correct,
                            threshold=e.threshold, group_by=group_by, batch_size=e.batch_size,
                            progress=e.progress and rank == 0, shared=True, key="eval.max_new_tokens",
                            backend=backend_for(e, model, tokenizer, key="eval.backend", batch_size=e.batch_size,
                                                max_model_len=max((len(p.ids) for p in prompts), default=1)
                                                + e.max_new_tokens))
    result.source, result.dropped = source, dropped
    log("\n" + results_table(result))
    for s in result.samples[: e.show_samples * e.n: e.n]:
        mark = "" if s["correct"] is None else ("  [correct]" if s["correct"] else "  [wrong]")
        log(f"\nprompt: {s['prompt'] if isinstance(s['prompt'], str) else json.dumps(s['prompt'])}\n"
            f"completion: {s['completion']!r}{mark}")
    if out is not None:
        write_on_main(_write_outputs, out, result, _header(cfg, result))
        result.output_dir = out
        log(f"\nwrote {out / EVAL_FILE} and {out / SAMPLES_FILE}")
    return result


def _header(cfg: EvalConfig, result: EvalResult) -> dict:
    e = cfg.eval
    return {"model": cfg.model.name_or_path, "data": result.source, "prompts": int(result.metrics["prompts"]),
            "dropped_prompts": result.dropped, "mode": "greedy" if result.greedy else "sampled",
            "sampling": {"n": e.n, "temperature": e.temperature, "top_p": e.top_p, "top_k": e.top_k, "seed": e.seed,
                         "max_new_tokens": e.max_new_tokens},
            "rewards": {"functions": list(cfg.reward.functions),
                        "weights": list(cfg.reward.weights or [1.0] * len(cfg.reward.functions)),
                        "gold": list(cfg.reward.gold)},
            "correct": result.correct, "threshold": e.threshold if result.correct else None,
            "group_by": result.group_by}


def _plain_json(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    return value


def _write_outputs(out: Path, result: EvalResult, header: dict) -> None:
    """``eval.json`` and ``samples.jsonl``, each written beside itself and renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {**header, "metrics": _plain_json(result.metrics), "by_group": _plain_json(result.by_group)}
    texts = {EVAL_FILE: json.dumps(doc, indent=2) + "\n",
             SAMPLES_FILE: "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in result.samples)}
    for name, text in texts.items():
        tmp = out / f".{name}.partial"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)


# --------------------------------------------------------------------------- the table


_PERCENT = ("accuracy", "finished")


def _cell(name: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if name == "prompts" or name.startswith("invalid/"):
        return str(int(value))
    if name in _PERCENT or name.startswith("pass@"):
        return f"{100 * value:.1f}%"
    if name == "response_tokens":
        return f"{value:.1f}"
    return f"{value:.4g}"


def results_table(result: EvalResult) -> str:
    """The metrics as rows, a column for all prompts and one per group."""
    m = result.metrics
    rows = [k for k in m if k != "reward"]
    if len(result.functions) > 1 or any(w != 1 for w in result.functions.values()):  # else it is reward/<name>
        rows.insert(rows.index("response_tokens"), "reward")
    cols = [("all", m)] + [(f"{result.group_by} {g}", v) for g, v in result.by_group.items()]
    label = {"reward": "reward (weighted sum)", "response_tokens": "response tokens",
             "finished": "finished (stopped itself)", **{f"reward/{g}": f"reward/{g} (gold)" for g in result.gold}}
    width = max(len(label.get(r, r)) for r in rows) + 2
    colw = max(9, *(len(c) + 2 for c, _ in cols))
    lines = [" " * width + "".join(f"{c:>{colw}}" for c, _ in cols), "-" * (width + colw * len(cols))]
    for r in rows:
        lines.append(f"{label.get(r, r):<{width}}" + "".join(f"{_cell(r, v.get(r)):>{colw}}" for _, v in cols))
    return "\n".join(lines)


__all__ = ["EvalConfig", "EvalDataConfig", "EvalResult", "EvalSamplingConfig", "evaluate_model", "results_table",
           "run_eval"]
