"""Rejection-sampling fine-tuning (RFT, expert iteration): learn from the model's own best samples.

    posttrain rft --config cfg.yaml k=v ...

Each round::

    prompts --sample K per prompt (the current policy)--> completions
            --reward functions (any of the online loop's, a reward model included)--> rewards
            --select: reward >= threshold, finished, de-duplicated, <= max_per_prompt per prompt-->
            kept set (round_<r>/kept.jsonl)
            --SFT on the kept set (the SFT machinery: packing, masked NLL, the engine)--> new policy

and the next round samples from the new policy. Every round logs pass@K (the share of prompts
with at least one sample at or above the threshold), the kept fraction, the prompts with no
kept sample and the held-out accuracy (greedy, scored with the same reward functions) to
``rounds.jsonl``. Training continues from the current weights with a fresh optimizer each
round (each round is an SFT run of ``train.epochs`` over that round's kept set).

Selection (:func:`select_samples`) is a pure function: per prompt, samples with an invalid
reward, unfinished samples (``select.require_finished``) and samples below
``select.threshold`` are dropped; the rest are ranked by reward (ties: sampling order),
repeated completions are dropped (``select.dedup``), and the first ``select.max_per_prompt``
are kept. With ``select.threshold=null`` that is the top-k per prompt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig, TrainConfig, option, unused_notes, validated
from ..data.formats import write_jsonl
from ..errors import CheckpointError, ConfigError, TrainingError
from ..models.loading import (
    accelerator_for,
    check_model_fits,
    load_causal_lm,
    read_paths,
    tokenizer_for,
)
from ..models.peft import apply_peft, is_peft
from ..rewards import check_reward_fields
from ..rollout import BackendConfig, SamplingParams, backend_for, generate_shared, requests
from ..train.engine import fit
from ..train.plan import write_on_main
from ..train.rundir import check_output_dir
from ..train.sharding import refuse_sharding
from .online import (
    RewardConfig,
    RLDataConfig,
    build_rewards,
    check_reward_config,
    epoch_order_indices,
    evaluate_prompts,
    load_prompt_sets,
    score_rollouts,
)
from .sft import SFTAlgorithm, SFTPlan

# --------------------------------------------------------------------------- config


@dataclass
class RFTSamplingConfig(BackendConfig):
    """Sampling of each round: K completions for each of the round's prompts (sampling.backend: the own
    sampler or a colocated vLLM engine, synced to the model before each round)."""

    rounds: int = option(3, "Rounds of sample -> select -> SFT.", min=1, max=1000)
    prompts_per_round: int = option(512, "Prompts sampled each round (the next ones of a seeded shuffle of "
                                          "data.train; a new shuffle each pass).", min=1)
    samples_per_prompt: int = option(8, "K: completions sampled per prompt.", min=1, max=4096)
    max_new_tokens: int = option(64, "Longest completion; longer ones are cut (and dropped by "
                                     "select.require_finished).", min=1)
    temperature: float = option(1.0, "Sampling temperature.", gt=0.0)
    top_p: float = option(1.0, "Nucleus sampling mass.", gt=0.0, max=1.0)
    top_k: int = option(0, "Sample among the k most likely tokens (0: all).", min=0)
    batch_size: int = option(128, "Sequences decoded together.", min=1)
    eval_max_new_tokens: int = option(96, "Longest completion when evaluating (greedy).", min=1)


@dataclass
class RFTSelectConfig:
    """Which samples are kept for the round's SFT."""

    threshold: float | None = option(1.0, "Keep samples whose reward is >= this (world_correct: 1 = correct). "
                                          "Null: no threshold, so max_per_prompt keeps the k best (top-k).")
    max_per_prompt: int = option(4, "Keep at most this many samples per prompt, highest reward first "
                                    "(0: no cap).", min=0)
    dedup: bool = option(True, "Keep a completion only once per prompt (identical tokens).")
    require_finished: bool = option(True, "Drop completions that hit sampling.max_new_tokens without stopping.")


@dataclass
class RFTConfig:
    """posttrain rft: rejection-sampling fine-tuning (expert iteration) on the model's own samples."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    sampling: RFTSamplingConfig = field(default_factory=RFTSamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    select: RFTSelectConfig = field(default_factory=RFTSelectConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        output_dir="runs/rft", lr=3e-5, micro_batch_size=8, epochs=1.0, warmup_ratio=0.0, min_lr_ratio=1.0))

    def validate(self) -> None:
        refuse_sharding(self.train.sharding, "rft")
        if self.select.threshold is None and self.select.max_per_prompt == 0:
            raise ConfigError(
                "select.threshold is null and select.max_per_prompt is 0, so every sample would be kept: that is "
                "SFT on unfiltered samples, not rejection sampling.",
                fix="set select.threshold (e.g. 1.0 for world_correct) or select.max_per_prompt=k for top-k.")
        if self.reward.gold:
            raise ConfigError(f"reward.gold={self.reward.gold} is not used by rft (it has no reward-hacking monitor).",
                              fix="score held-out answers with reward.functions, or remove reward.gold.")
        check_reward_config(self.reward, command="rft")
        if self.train.eval_every:
            raise ConfigError(f"train.eval_every={self.train.eval_every}: rft evaluates once at the end of each "
                              "round.", fix="remove train.eval_every.")


# --------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """What :func:`select_samples` kept: ``kept[i]`` lists prompt ``i``'s kept sample indices,
    best reward first; ``dropped`` counts the samples dropped by each rule (each sample once, by
    the first rule it fails, in the order invalid, unfinished, below_threshold, duplicate,
    over_cap); ``passed[i]``: prompt ``i`` had a valid sample at or above the threshold (pass@K)."""

    kept: list[list[int]]
    dropped: dict[str, int]
    passed: list[bool]

    @property
    def num_kept(self) -> int:
        return sum(len(k) for k in self.kept)


def select_samples(rewards: list[list[float | None]], completions: list[list], finished: list[list[bool]], *,
                   threshold: float | None, max_per_prompt: int, dedup: bool = True,
                   require_finished: bool = True) -> Selection:
    """Rejection sampling's keep rule, per prompt (see the module docstring).

    ``rewards[i][j]`` is sample ``j`` of prompt ``i`` (None / NaN: invalid), ``completions[i][j]``
    its completion (any hashable-able sequence: token ids; used for de-duplication),
    ``finished[i][j]`` whether it stopped by itself. ``max_per_prompt=0``: no cap.
    """
    dropped = dict(invalid=0, unfinished=0, below_threshold=0, duplicate=0, over_cap=0)
    kept_all: list[list[int]] = []
    passed: list[bool] = []
    for r_i, c_i, f_i in zip(rewards, completions, finished, strict=True):
        candidates = []
        ok_any = False
        for j, (r, fin) in enumerate(zip(r_i, f_i, strict=True)):
            if r is None or not math.isfinite(r):
                dropped["invalid"] += 1
                continue
            if threshold is None or r >= threshold:
                ok_any = True
            if require_finished and not fin:
                dropped["unfinished"] += 1
                continue
            if threshold is not None and r < threshold:
                dropped["below_threshold"] += 1
                continue
            candidates.append(j)
        passed.append(ok_any)
        candidates.sort(key=lambda j: -r_i[j])  # stable: equal rewards keep sampling order
        seen: set = set()
        kept: list[int] = []
        for j in candidates:
            key = tuple(c_i[j])
            if dedup and key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            if max_per_prompt and len(kept) >= max_per_prompt:
                dropped["over_cap"] += 1
                continue
            kept.append(j)
        kept_all.append(kept)
    return Selection(kept=kept_all, dropped=dropped, passed=passed)


# --------------------------------------------------------------------------- the rounds


def round_prompts(n_prompts: int, *, seed: int, start: int, count: int) -> list[int]:
    """Prompt indices ``start .. start+count-1`` of the endless sequence of seeded shuffles of
    ``range(n_prompts)`` (a new shuffle per pass)."""
    return epoch_order_indices(n_prompts, start, count, lambda epoch: f"rft-prompts-{seed}-{epoch}")


@dataclass
class RFTResult:
    rounds: list[dict]
    final_dir: Path | None
    eval_metrics: dict = dataclasses.field(default_factory=dict)


ROUNDS_FILE = "rounds.jsonl"


def _completed_rounds(out: Path) -> list[dict]:
    path = out / ROUNDS_FILE
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}, line {n}: not valid JSON ({e.msg}); the record of completed rounds is "
                                  "damaged.", fix="delete the run directory and start again, or repair the line.") from None
    return rows


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def rounds_table(rows: list[dict], metric: str) -> str:
    """The per-round table printed at the end (and in the docs)."""
    head = f"{'round':>5}  {'pass@K':>7}  {'kept':>6}  {'no kept':>7}  {'held-out':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['round']:>5}  {_fmt(r.get('pass_at_k')):>7}  {_fmt(r.get('kept_fraction')):>6}  "
                     f"{_fmt(r.get('no_kept_fraction')):>7}  {_fmt(r.get(metric)):>8}")
    return "\n".join(lines)


def run_rft(cfg: RFTConfig, *, model=None, tokenizer=None, log=print) -> RFTResult:
    """Run rejection-sampling fine-tuning as configured (see the module docstring).

    ``train.resume=auto`` continues a stopped run: finished rounds are skipped (the model is
    reloaded from the last finished round's ``final/``) and an interrupted round resumes from its
    latest checkpoint; the rounds' samples are seeded by (seed, round), so a resumed run gives
    the uninterrupted run's result.
    """
    cfg = validated(cfg, RFTConfig)
    log = log or (lambda line: None)
    s, sel = cfg.sampling, cfg.select
    out = Path(cfg.train.output_dir).expanduser()
    _check_run_dir(cfg, out)
    torch.manual_seed(cfg.train.seed)
    accelerator = accelerator_for(cfg.model)
    tokenizer = tokenizer or tokenizer_for(cfg.model)
    done = _completed_rounds(out) if cfg.train.resume else []
    done = [r for r in done if r["round"] > 0]
    last = done[-1]["round"] if done else 0
    if 0 < last < s.rounds and not (out / f"round_{last}" / "final").is_dir() and (out / "final").is_dir():
        # the earlier run ended after round `last` (its model was moved to final/): continue with more rounds
        os.replace(out / "final", out / f"round_{last}" / "final")
    if model is None or (last and not cfg.model.peft.enabled):
        if model is not None:
            log(f"note: resuming after round {last}: the model passed in is replaced by round {last}'s weights")
        model = _load_policy(cfg, accelerator, done, out)
    check_model_fits(model, tokenizer, cfg.model, max_length=cfg.data.max_prompt_length + s.max_new_tokens,
                     parts={"data.max_prompt_length": cfg.data.max_prompt_length, "sampling.max_new_tokens": s.max_new_tokens})
    if tokenizer.pad_token_id is None:
        raise ConfigError("The tokenizer has no pad token.", fix="set model.pad_token (e.g. to its EOS token).")
    if not is_peft(model):
        model = apply_peft(model, cfg.model.peft, log=log)
    if last and is_peft(model) and last < s.rounds:
        _load_adapter(model, out / f"round_{last}" / "final")

    prompts, eval_prompts, source = load_prompt_sets(cfg.data, tokenizer, seed=cfg.train.seed, log=log)
    functions, _ = build_rewards(cfg.reward, tokenizer, accelerator.device, max_new_tokens=s.max_new_tokens)
    check_reward_fields(functions, set(prompts[0].fields), source)
    for note in unused_notes(cfg.reward, "reward.", ["reward_model", "reward_model_batch_size"],
                             "no reward_model function is used") if "reward_model" not in cfg.reward.functions else []:
        log(f"note: {note}")
    metric = f"eval_reward/{functions[0].name}" if len(functions) == 1 else "eval_reward/total"

    backend = backend_for(s, model, tokenizer, key="sampling.backend", batch_size=s.batch_size,
                          max_model_len=cfg.data.max_prompt_length + max(s.max_new_tokens, s.eval_max_new_tokens))
    eval_backend = backend if backend.serving_engine else None

    def evaluate(m) -> dict:
        if not eval_prompts:
            return {}
        ev = evaluate_prompts(m, tokenizer, eval_prompts, functions, max_new_tokens=s.eval_max_new_tokens,
                              backend=eval_backend)
        if len(functions) > 1:
            ev["eval_reward/total"] = sum(f.weight * ev[f"eval_reward/{f.name}"] for f in functions)
        return ev

    out.mkdir(parents=True, exist_ok=True)
    rows = _completed_rounds(out) if cfg.train.resume else []
    if not rows:
        write_on_main(_clear_rounds, out)
        row0 = {"round": 0, **evaluate(model)}
        write_on_main(_append, out, row0)
        rows = [row0]
        log(f"round 0 (the starting model): held-out {_fmt(row0.get(metric))}")
    else:
        log(f"resuming after round {rows[-1]['round']} of {s.rounds}")
    row_length = cfg.data.max_prompt_length + s.max_new_tokens
    log(f"rft: {s.rounds} rounds of {s.prompts_per_round} prompts x {s.samples_per_prompt} samples; keep "
        + (f"reward >= {sel.threshold}" if sel.threshold is not None else "the best")
        + (f", at most {sel.max_per_prompt} per prompt" if sel.max_per_prompt else "")
        + (", distinct" if sel.dedup else "") + (", finished" if sel.require_finished else ""))

    for r in range(rows[-1]["round"] + 1, s.rounds + 1):
        t0 = time.time()
        idx = round_prompts(len(prompts), seed=cfg.train.seed, start=(r - 1) * s.prompts_per_round,
                            count=s.prompts_per_round)
        K = s.samples_per_prompt
        backend.sync_weights(model)   # the last round's SFT (vLLM: copied into the engine)
        rolls = generate_shared(
            backend, requests([prompts[i].ids for i in idx]),
            SamplingParams(s.max_new_tokens, s.temperature, s.top_p, s.top_k, n=K,
                           seed=random.Random(f"rft-sample-{cfg.train.seed}-{r}").getrandbits(62)))
        backend.release()   # GPU vLLM: the engine sleeps during the round's SFT
        t_sample = time.time() - t0
        res = score_rollouts(functions, [prompts[i] for i in idx for _ in range(K)], rolls,
                             max_new_tokens=s.max_new_tokens)
        total = res.total.view(len(idx), K)
        by_prompt = [rolls[g * K:(g + 1) * K] for g in range(len(idx))]
        selection = select_samples(
            [[float(v) for v in row] for row in total], [[ro.completion_ids for ro in g] for g in by_prompt],
            [[ro.finished for ro in g] for g in by_prompt], threshold=sel.threshold,
            max_per_prompt=sel.max_per_prompt, dedup=sel.dedup, require_finished=sel.require_finished)
        rdir = out / f"round_{r}"
        rdir.mkdir(parents=True, exist_ok=True)
        write_on_main(_write_kept, rdir / "kept.jsonl", [prompts[i] for i in idx], by_prompt, total, selection)
        n = len(idx) * K
        valid = res.valid
        row = {"round": r, "samples": n, "prompts": len(idx),
               "reward_mean": float(res.total[valid].mean()) if valid.any() else float("nan"),
               "pass_at_k": sum(selection.passed) / len(idx) if sel.threshold is not None else None,
               "kept": selection.num_kept, "kept_fraction": selection.num_kept / n,
               "no_kept_prompts": sum(1 for k in selection.kept if not k),
               "no_kept_fraction": sum(1 for k in selection.kept if not k) / len(idx),
               **{f"dropped/{k}": v for k, v in selection.dropped.items()}}
        log(f"round {r}: sampled {n} completions in {t_sample:.0f}s; "
            + (f"pass@{K} {_fmt(row['pass_at_k'])}, " if row["pass_at_k"] is not None else "")
            + f"kept {selection.num_kept} ({_fmt(row['kept_fraction'])}); {row['no_kept_prompts']} prompts with "
            f"nothing kept; dropped " + ", ".join(f"{k} {v}" for k, v in selection.dropped.items() if v))
        if not selection.num_kept:
            raise TrainingError(
                f"RFT round {r}: none of the {n} samples was kept ({', '.join(f'{k}: {v}' for k, v in selection.dropped.items() if v)}), "
                "so there is nothing to fine-tune on. The round's samples are in " + str(rdir / "kept.jsonl") + " (empty) "
                "and earlier rounds' models are kept.",
                fix="lower select.threshold (or set it to null for top-k), raise sampling.samples_per_prompt or "
                "sampling.temperature, set select.require_finished=false if answers are cut, or start from a "
                "stronger model.")
        examples = [g[j].training_example() for g, kept in zip(by_prompt, selection.kept) for j in kept]
        plan = SFTPlan(examples, micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                       epochs=cfg.train.epochs, max_steps=cfg.train.max_steps, packing=True, row_length=row_length,
                       pad_token_id=tokenizer.pad_token_id, seed=cfg.train.seed + r)
        # resume inside a round only from its own checkpoints (a round without any restarts clean)
        has_ckpt = (rdir / "checkpoints").is_dir() and any((rdir / "checkpoints").glob("step-*/checkpoint.json"))
        train_cfg = dataclasses.replace(cfg.train, output_dir=str(rdir), overwrite_output_dir=True,
                                        resume="auto" if cfg.train.resume and has_ckpt else None)
        log(f"round {r}: SFT on {len(examples)} kept samples, {plan.num_steps()} optimizer steps")
        result = fit(model, SFTAlgorithm(), plan, train_cfg, tokenizer=tokenizer, accelerator=accelerator,
                     run_config={**dataclasses.asdict(cfg), "round": r}, log=log)
        row.update({"train_loss": result.history[-1].get("loss") if result.history else None,
                    "steps": result.steps, **evaluate(model), "seconds": time.time() - t0})
        write_on_main(_append, out, row)
        rows.append(row)
        log(f"round {r}: held-out {_fmt(row.get(metric))} (round 0: {_fmt(rows[0].get(metric))}) in "
            f"{row['seconds']:.0f}s")

    write_on_main(_move_final, out / f"round_{s.rounds}" / "final", out / "final")
    table = rounds_table(rows, metric)
    log("\n" + table)
    write_on_main((out / "rounds.md").write_text, table + "\n", encoding="utf-8")
    return RFTResult(rounds=rows, final_dir=out / "final" if (out / "final").is_dir() else None,
                     eval_metrics={k: v for k, v in rows[-1].items() if k.startswith("eval_")})


def _check_run_dir(cfg: RFTConfig, out: Path) -> None:
    """Refuse what would mix two runs: a fresh run into a directory holding an earlier rft run
    (unless overwriting), a resume other than ``auto``, an overwrite deleting the model read."""
    if cfg.train.resume not in (None, "auto"):
        raise ConfigError(f"train.resume={cfg.train.resume!r}: rft resumes a run directory by rounds.",
                          fix="set train.resume=auto (it continues the run in train.output_dir).")
    earlier = (out / ROUNDS_FILE).is_file()
    if earlier and not cfg.train.resume and not cfg.train.overwrite_output_dir:
        raise ConfigError(
            f"train.output_dir is '{out}', which already holds an rft run ({out / ROUNDS_FILE}).",
            fix="continue it with train.resume=auto, choose another train.output_dir, or set "
            "train.overwrite_output_dir=true to delete its rounds and final model first.")
    protect = read_paths(cfg.model, **{"reward.reward_model": cfg.reward.reward_model})
    if earlier and cfg.train.overwrite_output_dir and not cfg.train.resume:
        for key, value in protect.items():
            if value and Path(value).expanduser().exists() and out.resolve() in Path(value).expanduser().resolve().parents:
                raise ConfigError(f"train.overwrite_output_dir=true would delete {key}={value}, which lies in the "
                                  f"run directory '{out}' and is read by this run.",
                                  fix="copy that model elsewhere and point the key there, or choose another "
                                  "train.output_dir.")
    check_output_dir(str(out), resume=None if earlier else cfg.train.resume,
                     overwrite=cfg.train.overwrite_output_dir or earlier, protect=protect)


def _move_final(final: Path, target: Path) -> None:
    """The last round's final/ becomes the run's final/."""
    if final.is_dir():
        if target.exists():
            raise CheckpointError(f"{target} already exists, so the last round's model stays in {final}.",
                                  fix="move or delete it, then move the last round's final/ there yourself.")
        os.replace(final, target)


def _clear_rounds(out: Path) -> None:
    """A fresh run: remove an earlier run's rounds (only what rft itself writes)."""
    import shutil

    for name in (ROUNDS_FILE, "rounds.md"):
        (out / name).unlink(missing_ok=True)
    for d in [*out.glob("round_*"), out / "final"]:
        if d.is_symlink():
            raise ConfigError(f"'{d}' is a symbolic link; posttrain does not delete through links.",
                              fix="remove the link yourself, or choose another train.output_dir.")
        if d.is_dir() and (d.name == "final" or d.name[6:].isdigit()):
            shutil.rmtree(d)


def _append(out: Path, row: dict) -> None:
    write_jsonl(out / ROUNDS_FILE, [row], append=True)


def _write_kept(path: Path, prompts, groups, total: torch.Tensor, selection: Selection) -> None:
    """The round's kept samples as prompt/completion records (``posttrain sft`` trains on them)."""
    write_jsonl(path, [{"prompt": [{"role": "user", "content": p.text}],
                        "completion": [{"role": "assistant", "content": rolls[j].text}],
                        "reward": float(total[g, j]), **p.fields}
                       for g, (p, rolls, kept) in enumerate(zip(prompts, groups, selection.kept)) for j in kept])


def _load_policy(cfg: RFTConfig, accelerator, done: list[dict], out: Path):
    """The starting model, or on resume the last finished round's full model (an adapter run
    reloads its base here and the adapter after :func:`apply_peft`)."""
    path = cfg.model.name_or_path
    last = done[-1]["round"] if done else 0
    if last and not cfg.model.peft.enabled:
        path = str(out / "final") if last >= cfg.sampling.rounds else str(out / f"round_{last}" / "final")
        if not Path(path).is_dir():
            raise CheckpointError(f"{out / ROUNDS_FILE} says round {last} finished, but {path} is missing.",
                                  fix="delete the run directory and start again (or set train.resume=null).")
    return load_causal_lm(path, dtype=cfg.model.dtype, device=str(accelerator.device),
                          attn_implementation=cfg.model.attn_implementation,
                          key="model.name_or_path" if path == cfg.model.name_or_path else "train.resume",
                          quantize=cfg.model.peft.quantize, compute_dtype=cfg.model.peft.compute_dtype)


def _load_adapter(model, directory: Path) -> None:
    from safetensors.torch import load_file

    from ..models.loading import ADAPTER_WEIGHTS
    from ..models.peft import load_adapter_state

    f = directory / ADAPTER_WEIGHTS
    if not f.is_file():
        raise CheckpointError(f"{directory} holds no {ADAPTER_WEIGHTS} to resume from.",
                              fix="delete the run directory and start again (or set train.resume=null).")
    load_adapter_state(model, load_file(str(f)), where=str(f))


__all__ = ["RFTConfig", "RFTResult", "RFTSamplingConfig", "RFTSelectConfig", "Selection", "round_prompts",
           "run_rft", "select_samples"]
