"""The quickstart: the built-in tiny world end to end, on a CPU, in a few minutes.

1. write the world's datasets (SFT conversations and preference pairs from the train split;
   held-out problems and pairs);
2. evaluate the shipped base model on the held-out problems (chat prompt, greedy);
3. ``sft``: SFT from the base model (assistant-only loss, packing), with held-out accuracy
   measured a few times along the way for the learning curves, then evaluate;
4. ``rm``: a reward model from the SFT checkpoint on the preference pairs; report its held-out
   pairwise accuracy;
5. ``dpo``: for each loss in ``dpo_losses``, preference optimization from the SFT checkpoint on
   the same pairs; evaluate and report the accuracy change over SFT and the displacement check;
6. ``rl``: online RL (``rl.algorithm``, GRPO by default) from the SFT checkpoint on train-split
   problems with the world's verifier as the reward; evaluate;
7. print the table and write the run directory: data/, sft/, rm/, dpo-<loss>/, rl/ (each with
   metrics.jsonl, config.yaml, checkpoints/, final/), learning_curves.png, summary.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .algorithms.dpo import DPOConfig, PreferenceDataConfig, PreferenceLossConfig, run_preference
from .algorithms.rl import RLConfig, RLDataConfig, RLLossConfig, RolloutConfig, run_rl
from .train.curves import plot_rl_curves, plot_sft_curves
from .algorithms.rm import RM_LOSS_DATA, RMConfig, run_rm
from .algorithms.sft import SFTConfig, SFTDataConfig, run_sft
from .config import ModelConfig, TrainConfig, option, reroot, rerooter, validated
from .errors import ConfigError, PosttrainError
from .models.loading import (
    check_attn_implementation,
    check_model_fits,
    load_causal_lm,
    locate,
    pick_device,
    tokenizer_for,
)
from .train.rundir import check_output_dir, run_lock
from .data import write_jsonl
from .world.datasets import problem_record, write_world_datasets
from .world.evaluate import EvalResult, evaluate_problems
from .world.preferences import preference_records
from .world.tasks import generate_problems

STAGES = ("sft", "rm", "dpo", "rl")
# the reward model is not used by the other stages; stages=[sft,rm,dpo,rl] adds it (keeps the default near 4 min)
DEFAULT_STAGES = ("sft", "dpo", "rl")


def _default_sft() -> SFTConfig:
    return SFTConfig(
        data=SFTDataConfig(train="", eval="", max_length=256, packing=True),
        train=TrainConfig(output_dir="", lr=1e-3, epochs=1.0, micro_batch_size=4, grad_accum=1,
                          warmup_ratio=0.05, min_lr_ratio=0.1, save_every=0, log_every=1),
    )


def _default_rm() -> RMConfig:
    return RMConfig(model=ModelConfig(name_or_path=""),
                    data=PreferenceDataConfig(train="", eval="", max_length=256, packing=True),
                    train=TrainConfig(output_dir="", lr=3e-4, epochs=1.0, micro_batch_size=8, warmup_ratio=0.05))


def _default_dpo() -> DPOConfig:
    return DPOConfig(model=ModelConfig(name_or_path=""),
                     data=PreferenceDataConfig(train="", eval="", max_length=256, packing=True),
                     loss=PreferenceLossConfig(beta=0.1),
                     train=TrainConfig(output_dir="", lr=5e-5, epochs=1.0, micro_batch_size=8, warmup_ratio=0.1))


def _default_rl() -> RLConfig:
    return RLConfig(algorithm="grpo", model=ModelConfig(name_or_path=""),
                    data=RLDataConfig(train="", eval=""),
                    rollout=RolloutConfig(group_size=8, prompts_per_step=16, max_new_tokens=64, samples_every=10),
                    loss=RLLossConfig(),
                    train=TrainConfig(output_dir="", lr=3e-5, max_steps=32, epochs=0.0, micro_batch_size=16,
                                      warmup_ratio=0.0, min_lr_ratio=1.0, weight_decay=0.0))


_OWN_DATA = "the quickstart writes the tiny world's data under output_dir; `posttrain sft` / `rm` / `dpo` train on yours"
# keys of the stage sections that the quickstart sets itself, and what to use instead
QUICKSTART_OWNED = {
    **{f"{st}.data.{k}": _OWN_DATA for st in STAGES for k in ("train", "eval", "world_examples",
                                                                "world_eval_examples")},
    **{f"{st}.train.output_dir": "each stage writes to output_dir/<stage>" for st in STAGES},
    **{f"{st}.train.seed": "set the quickstart's seed" for st in STAGES},
    **{f"{st}.train.resume": "the quickstart always starts over (run `posttrain sft` etc. to resume a run)"
       for st in STAGES},
    **{f"{st}.train.overwrite_output_dir": "the quickstart replaces its own run directory" for st in STAGES},
    "rm.model.name_or_path": "the reward model starts from the SFT model of the same run",
    "dpo.model.name_or_path": "preference optimization starts from the SFT model of the same run",
    "dpo.loss.name": "list the losses in dpo_losses, e.g. dpo_losses=[ipo]",
    "rl.model.name_or_path": "online RL starts from the SFT model of the same run",
}


@dataclass
class QuickstartConfig:
    """posttrain quickstart: the tiny world, from the base model through SFT, a reward model, DPO and online RL."""

    output_dir: str = option("runs/quickstart", "Run directory.")
    seed: int = option(0, "Seed for data generation and training.", min=0, max=2**32 - 1)
    stages: list[str] = option(default_factory=lambda: list(DEFAULT_STAGES),
                               help="Stages to run, in order: sft, rm, dpo, rl (rm, dpo and rl start from the SFT "
                                    "model; the reward model is not in the default list: add it with "
                                    "stages=[sft,rm,dpo,rl]).")
    train_examples: int = option(8000, "SFT conversations generated from the train split.", min=1, max=1_000_000)
    direct_answers: float = option(0.5, "Share of the SFT conversations at direct_answer_levels whose reply is only "
                                        "the final answer line (`#### n`) instead of the worked solution, as in "
                                        "instruction data that mixes terse and worked answers: the SFT model then "
                                        "answers some of those problems directly (and mostly wrongly), and the rl "
                                        "stage learns from the reward alone that working the steps pays. 0: every "
                                        "reply is worked.", min=0.0, max=1.0)
    direct_answer_levels: list[int] = option(default_factory=lambda: [3, 4],
                                             help="Difficulty levels (1-4) whose SFT replies direct_answers applies to "
                                                  "(3 and 4: the multi-step problems).")
    preference_pairs: int = option(600, "Preference pairs (correct vs one-slip solution) for rm and dpo.", min=2,
                                  max=1_000_000)
    dpo_losses: list[str] = option(default_factory=lambda: ["dpo", "dpop"],
                                   help="Preference losses to run from the SFT model (each its own run).")
    eval_problems: int = option(200, "Held-out problems for the table.", min=1, max=100_000)
    eval_pairs: int = option(200, "Held-out preference pairs for the reward model's accuracy.", min=2, max=100_000)
    curve_points: int = option(3, "Held-out accuracy measurements during SFT (for the plot).", min=0, max=100)
    curve_problems: int = option(100, "Held-out problems per learning-curve measurement.", min=1, max=100_000)
    max_new_tokens: int = option(64, "Generation budget per answer.", min=1)
    rl_prompts: int = option(4000, "Train-split problems (prompt + answer) the rl stage samples from.", min=1,
                             max=1_000_000)
    sft: SFTConfig = field(default_factory=_default_sft)
    rm: RMConfig = field(default_factory=_default_rm)
    dpo: DPOConfig = field(default_factory=_default_dpo)
    rl: RLConfig = field(default_factory=_default_rl)

    def validate(self) -> None:
        from .world.tasks import LEVELS

        if any(level not in LEVELS for level in self.direct_answer_levels):
            raise ConfigError(f"Config key 'direct_answer_levels' is {self.direct_answer_levels}; the world's levels "
                              f"are {list(LEVELS)}.", fix="list levels from 1 to 4, e.g. direct_answer_levels=[3,4].")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"Config key 'stages' has unknown stage(s) {bad}; valid stages are {list(STAGES)}.",
                              fix="write e.g. stages=[sft,rm,dpo].")
        if {"rm", "dpo", "rl"} & set(self.stages) and "sft" not in self.stages:
            raise ConfigError("Stages rm, dpo and rl start from the SFT model, so 'sft' must be in 'stages'.",
                              fix="use stages=[sft,rm,dpo,rl] (or stages=[sft]).")
        defaults = {"sft": _default_sft(), "rm": _default_rm(), "dpo": _default_dpo(), "rl": _default_rl()}
        for key, instead in QUICKSTART_OWNED.items():
            stage, *path = key.split(".")
            mine, default = getattr(self, stage), defaults[stage]
            for part in path:
                mine, default = getattr(mine, part), getattr(default, part)
            if mine != default:
                raise ConfigError(
                    f"Config key '{key}' is set to {mine!r}, but the quickstart sets it itself, so the value would "
                    "be ignored.", fix=f"remove it; {instead}.")
        from .ops import PREFERENCE_LOSSES

        if RM_LOSS_DATA[self.rm.loss.name] != "paired":
            raise ConfigError(f"Config key 'rm.loss.name' is {self.rm.loss.name!r}, which needs ranked data; the "
                              "quickstart trains its reward model on preference pairs.",
                              fix="use rm.loss.name=bt, hinge or mse (or `posttrain rm` with ranked data).")
        if len(set(self.dpo_losses)) != len(self.dpo_losses):
            raise ConfigError(f"Config key 'dpo_losses' lists a loss twice ({self.dpo_losses}); each loss is one run "
                              "into output_dir/dpo-<loss>.", fix="list each loss once.")
        for name in self.dpo_losses:
            if name not in PREFERENCE_LOSSES or PREFERENCE_LOSSES[name].data != "paired":
                paired = sorted(k for k, v in PREFERENCE_LOSSES.items() if v.data == "paired")
                raise ConfigError(f"Config key 'dpo_losses' has {name!r}; the quickstart's preference pairs "
                                  f"suit the paired losses {paired}.", fix="pick from those.")


def _fmt_pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def results_table(columns: dict[str, EvalResult]) -> str:
    """Accuracy (overall and per level), format compliance and length, one column per model;
    the last column's change is against the second (SFT) when there are more than two."""
    names = list(columns)
    res = list(columns.values())
    width = 10
    lines = ["".join([f"{'':24}"] + [f"{n:>{width}}" for n in names]), "-" * (24 + width * len(names))]

    def row(label, values, pct):
        cells = [f"{(_fmt_pct(v) if pct else f'{v:.1f}'):>{width}}" for v in values]
        lines.append(f"{label:24}" + "".join(cells))

    row("held-out accuracy", [r.accuracy for r in res], True)
    for level in sorted(res[0].per_level):
        row(f"  level {level}", [r.per_level.get(level, 0.0) for r in res], True)
    row("format compliance", [r.format_compliance for r in res], True)
    row("mean response tokens", [r.mean_response_tokens for r in res], False)
    return "\n".join(lines)


MARKER = ".posttrain-quickstart"


def claim_output_dir(output_dir: str) -> Path:
    """The quickstart replaces its own run directory on every run, but never a directory it did not
    write (one without its marker file that is not empty)."""
    check_output_dir(output_dir, overwrite=True, key="output_dir")
    out = Path(output_dir).expanduser()
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(
            f"Config key 'output_dir' is '{output_dir}', which holds files the quickstart did not write; the "
            "quickstart replaces its run directory on every run, so it refuses to write into another one.",
            fix="choose an empty or new output_dir (the default is runs/quickstart).")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("This directory is replaced by every `posttrain quickstart` run.\n")
    return out


def run_quickstart(cfg: QuickstartConfig, log=print) -> dict:
    cfg = validated(cfg, QuickstartConfig)
    log = log or (lambda line: None)
    t0 = time.time()

    @contextlib.contextmanager
    def stage_keys(stage: str):
        """Errors inside a stage name its keys from the top: loss.beta -> dpo.loss.beta."""
        try:
            yield
        except PosttrainError as e:
            raise reroot(e, f"{stage}.", type(getattr(cfg, stage))) from None

    def stage_log(stage: str):
        """The stage's log lines (its notes) name keys from the top too."""
        fix = rerooter(f"{stage}.", type(getattr(cfg, stage)))
        return lambda line: log(fix(line))

    out = claim_output_dir(cfg.output_dir)
    with run_lock(str(out), key="output_dir"):  # one quickstart per directory at a time
        return _run_quickstart(cfg, out, log, t0, stage_keys, stage_log)


def _run_quickstart(cfg: QuickstartConfig, out: Path, log, t0: float, stage_keys, stage_log) -> dict:
    stages = [st for st in STAGES if st in cfg.stages]
    # what can be checked without training, checked before any stage trains
    for stage in stages:
        with stage_keys(stage):
            section = getattr(cfg, stage).model
            check_attn_implementation(section.attn_implementation, pick_device(section.device))
    if "dpo" in stages and cfg.dpo.loss.reference:
        with stage_keys("dpo"):
            locate(cfg.dpo.loss.reference, key="loss.reference")
    log("posttrain quickstart: the built-in tiny world (arithmetic word problems, verifiable answers)")
    log(f"stages: {' -> '.join(['base eval'] + stages)}")
    paths = write_world_datasets(out / "data", n_train=cfg.train_examples, n_heldout=cfg.eval_problems,
                                 seed=cfg.seed, direct_fraction=cfg.direct_answers,
                                 direct_levels=tuple(cfg.direct_answer_levels))
    if "rm" in stages or "dpo" in stages:
        paths["pairs_train"] = write_jsonl(out / "data" / "pairs_train.jsonl",
                                           preference_records(cfg.preference_pairs, seed=cfg.seed))
        paths["pairs_heldout"] = write_jsonl(out / "data" / "pairs_heldout.jsonl",
                                             preference_records(cfg.eval_pairs, seed=cfg.seed, split="heldout"))
    if "rl" in stages:
        paths["rl_prompts"] = write_jsonl(out / "data" / "problems_train.jsonl",
                                          [problem_record(p) for p in generate_problems(cfg.rl_prompts, seed=cfg.seed)])
    direct = (f" ({100 * cfg.direct_answers:.0f}% of those at levels {', '.join(map(str, cfg.direct_answer_levels))} "
              "answered with the final line only)" if cfg.direct_answers and cfg.direct_answer_levels else "")
    log(f"data: {cfg.train_examples} SFT conversations{direct}, {cfg.eval_problems} held-out problems"
        + (f", {cfg.preference_pairs} + {cfg.eval_pairs} held-out preference pairs" if "pairs_train" in paths else "")
        + f" -> {out / 'data'}")

    sft = cfg.sft
    with stage_keys("sft"):
        tokenizer = tokenizer_for(sft.model)
        model = load_causal_lm(sft.model.name_or_path, dtype=sft.model.dtype, device=sft.model.device,
                               attn_implementation=sft.model.attn_implementation)
        check_model_fits(model, tokenizer, sft.model, max_length=sft.data.max_length)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"base model: {sft.model.name_or_path} ({model.config.model_type}, {n_params / 1e6:.1f}M parameters)")
    problems = generate_problems(cfg.eval_problems, seed=cfg.seed, split="heldout")
    curve_set = problems[: cfg.curve_problems]

    def evaluate(m) -> EvalResult:
        return evaluate_problems(m, tokenizer, problems, max_new_tokens=cfg.max_new_tokens, progress=True)

    log(f"\n[base] evaluating the base model on {len(problems)} held-out problems (chat prompt, greedy)")
    with stage_keys("sft"):
        results: dict[str, EvalResult] = {"base": evaluate(model)}
    log(f"       accuracy {_fmt_pct(results['base'].accuracy).strip()}, format compliance "
        f"{_fmt_pct(results['base'].format_compliance).strip()}")
    summary: dict = {"stages": stages}

    if "sft" in stages:
        sft.data.train, sft.data.eval = str(paths["sft_train"]), str(paths["sft_heldout"])
        sft.train.output_dir, sft.train.seed = str(out / "sft"), cfg.seed
        sft.train.overwrite_output_dir = True  # the quickstart's own directory, replaced every run
        base_curve = sum(s["correct"] for s in results["base"].samples[: len(curve_set)]) / len(curve_set)
        curve: list[tuple[int, float]] = [(0, base_curve)]

        def curve_eval(m) -> dict:
            res = evaluate_problems(m, tokenizer, curve_set, max_new_tokens=cfg.max_new_tokens)
            return {"heldout_accuracy": res.accuracy, "format_compliance": res.format_compliance}

        log("\n[sft] SFT: assistant-only loss, packed rows, AdamW + warmup/cosine")
        with stage_keys("sft"):
            sft_result = run_sft(sft, model=model, tokenizer=tokenizer, log=stage_log("sft"), extra_eval=curve_eval,
                                 eval_times=cfg.curve_points + 1)
        curve += [(e["step"], e["heldout_accuracy"]) for e in sft_result.fit.eval_history if "heldout_accuracy" in e]
        log(f"\n[sft] evaluating the SFT model on the same {len(problems)} held-out problems")
        results["SFT"] = evaluate(model)
        plot_sft_curves(sft_result.fit.history, sft_result.fit.eval_history, curve, out / "learning_curves.png")
        summary.update(sft_steps=sft_result.fit.steps, sft_seconds=round(sft_result.fit.seconds, 1),
                       learning_curve=curve, data=sft_result.encode_summary, padding=sft_result.padding_summary)
        sft_dir = str(sft_result.final_dir)

    notes: list[str] = []
    if "rm" in stages:
        rm = cfg.rm
        rm.model.name_or_path = sft_dir
        rm.data.train, rm.data.eval = str(paths["pairs_train"]), str(paths["pairs_heldout"])
        rm.train.output_dir, rm.train.seed = str(out / "rm"), cfg.seed
        rm.train.overwrite_output_dir = True
        log(f"\n[rm] reward model from the SFT checkpoint: {rm.loss.name} loss, {rm.loss.pooling} pooling, "
            f"{cfg.preference_pairs} pairs")
        with stage_keys("rm"):
            rm_result = run_rm(rm, log=stage_log("rm"))
        m = rm_result.eval_metrics
        summary["reward_model"] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        notes.append(f"reward model (from SFT, {rm.loss.name}): held-out pairwise accuracy "
                     f"{_fmt_pct(m['eval_accuracy']).strip()} on {cfg.eval_pairs} pairs, mean margin "
                     f"{m['eval_margin']:.2f}, reward-length correlation {m['eval_length_correlation']:+.2f}")

    if "dpo" in stages:
        summary["preference"] = {}
        for loss_name in cfg.dpo_losses:
            dpo = dataclasses.replace(cfg.dpo, loss=dataclasses.replace(cfg.dpo.loss, name=loss_name),
                                      train=dataclasses.replace(cfg.dpo.train, output_dir=str(out / f"dpo-{loss_name}"),
                                                                seed=cfg.seed, overwrite_output_dir=True),
                                      data=dataclasses.replace(cfg.dpo.data, train=str(paths["pairs_train"]),
                                                               eval=str(paths["pairs_heldout"])),
                                      model=dataclasses.replace(cfg.dpo.model, name_or_path=sft_dir))
            log(f"\n[dpo] {loss_name} from the SFT checkpoint on {cfg.preference_pairs} pairs")
            with stage_keys("dpo"):
                policy = load_causal_lm(sft_dir, dtype=dpo.model.dtype, device=dpo.model.device,
                                        attn_implementation=dpo.model.attn_implementation)
                pref = run_preference(dpo, model=policy, tokenizer=tokenizer, log=stage_log("dpo"))
            results[f"+{loss_name}"] = evaluate(policy)
            hist = pref.fit.history
            displaced = any(h.get("likelihood_displacement") for h in hist)
            chosen = hist[-1].get("chosen_logratio")
            summary["preference"][loss_name] = {
                "accuracy": results[f"+{loss_name}"].accuracy, "displacement_warning": displaced,
                "final_chosen_logratio": chosen, "eval": {k: v for k, v in pref.eval_metrics.items()
                                                          if isinstance(v, (int, float))}}
            change = results[f"+{loss_name}"].accuracy - results["SFT"].accuracy
            chosen_txt = f"; chosen log-ratio vs reference at the end {chosen:+.2f} nats" if chosen is not None else ""
            notes.append(f"{loss_name}: held-out accuracy {100 * change:+.1f}pt over SFT; likelihood displacement "
                         f"{'DETECTED' if displaced else 'not detected'}{chosen_txt}")

    if "rl" in stages:
        rl = cfg.rl
        rl.model.name_or_path = sft_dir
        rl.data.train, rl.data.eval = str(paths["rl_prompts"]), None
        rl.train.output_dir, rl.train.seed = str(out / "rl"), cfg.seed
        rl.train.overwrite_output_dir = True
        name = f"+{rl.algorithm}"
        log(f"\n[rl] {rl.algorithm} from the SFT checkpoint: {rl.train.max_steps} steps of {rl.rollout.prompts_per_step} "
            f"train-split problems x {rl.rollout.group_size} samples, reward = {' + '.join(rl.reward.functions)}")
        with stage_keys("rl"):
            policy = load_causal_lm(sft_dir, dtype=rl.model.dtype, device=rl.model.device,
                                    attn_implementation=rl.model.attn_implementation)
            rl_result = run_rl(rl, model=policy, tokenizer=tokenizer, log=stage_log("rl"))
        results[name] = evaluate(policy)
        # the run's curves again, with this evaluation's held-out accuracy before (SFT) and after
        plot_rl_curves(rl_result.fit.history, rl_result.fit.eval_history + [
            {"step": 0, "heldout_accuracy": results["SFT"].accuracy},
            {"step": rl_result.fit.steps, "heldout_accuracy": results[name].accuracy}],
            out / "rl" / "curves.png", title=f"posttrain {rl.algorithm} (quickstart)")
        hist = [h for h in rl_result.fit.history if "reward/mean" in h]
        k = max(1, len(hist) // 5)
        first = sum(h["reward/mean"] for h in hist[:k]) / k
        last = sum(h["reward/mean"] for h in hist[-k:]) / k
        kl = hist[-1].get("rollout/kl_seq")
        summary["rl"] = {"algorithm": rl.algorithm, "accuracy": results[name].accuracy,
                         "reward_first": first, "reward_last": last, "kl_seq_last": kl,
                         "entropy_last": hist[-1].get("entropy"), "seconds": round(rl_result.fit.seconds, 1),
                         "loss": dataclasses.asdict(rl_result.loss)}
        change = results[name].accuracy - results["SFT"].accuracy
        kl_txt = f", KL to SFT {kl:.2f} nats per answer" if kl is not None else ""
        notes.append(f"{rl.algorithm}: held-out accuracy {100 * change:+.1f}pt over SFT; reward on its own samples "
                     f"{first:.2f} -> {last:.2f} (first / last fifth of {len(hist)} steps){kl_txt}; "
                     f"{rl_result.fit.seconds / 60:.1f} min")

    elapsed = time.time() - t0
    table = results_table(results)
    summary.update({name: r.metrics() for name, r in results.items()})
    summary["total_seconds"] = round(elapsed, 1)
    summary["config"] = dataclasses.asdict(cfg)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (out / "samples.jsonl").open("w") as fh:
        for i, b in enumerate(results["base"].samples):
            row = {"question": b["question"], "answer": b["answer"]}
            row.update({name: r.samples[i]["response"] for name, r in results.items()})
            fh.write(json.dumps(row) + "\n")
    log("\n" + table)
    for note in notes:
        log(note)
    last = results[list(results)[-1]]
    ex = next((s for s in last.samples if s["correct"] and s["level"] >= 3), last.samples[0])
    log(f"\nexample (held-out): {ex['question']}\n{list(results)[-1]} model: {ex['response']!r}")
    log(f"\nrun directory: {out}/  (summary.json, samples.jsonl"
        + (", learning_curves.png, sft/" if "sft" in stages else "") + (", rm/" if "rm" in stages else "")
        + "".join(f", dpo-{n}/" for n in (cfg.dpo_losses if "dpo" in stages else []))
        + (", rl/ (curves.png, samples.jsonl)" if "rl" in stages else "") + ")")
    log(f"total time: {elapsed / 60:.1f} min")
    return summary
