"""Process reward models: a score for every step of a solution, from gold or Monte-Carlo step labels.

    posttrain prm --config cfg.yaml k=v ...

Data are stepwise records (TRL's stepwise-supervision layout): ``{"prompt", "completions":
[step, ...], "labels": [true/false or a number in [0, 1], ...]}``; a record may instead give the
whole ``completions`` as one string, split at ``data.delimiter`` (a line per step by default).
``builtin:world-steps`` generates the tiny world's: worked solutions and one-slip solutions,
whose gold labels are known by construction (right up to the slip, wrong from it on).

Labels (``labels.source``):

* ``given``: the records' ``labels``;
* ``mc``: Monte-Carlo estimates (Math-Shepherd): from the prefix ending at each step,
  ``labels.k`` completions of ``labels.policy`` are sampled and graded with the reward
  functions (``labels.functions``, e.g. the world's verifier with the record's ``answer``);
  the soft label is the success rate, the hard label whether any succeeded
  (:func:`posttrain.ops.mc_step_labels`). The final step's label is the grade of the whole
  solution (nothing is left to sample). The labelled records are saved as
  ``<output_dir>/step_labels.jsonl`` (with the gold labels beside them when the data has
  them).

The model is a Hugging Face ``AutoModelForTokenClassification`` with one label, started from a
causal LM's backbone with a new ``score`` head: its logit at each step's last token is that
step's score, trained with binary cross-entropy (``loss.target``: the soft labels or hard 0/1),
normalized by the optimizer step's number of labelled steps. ``final/`` loads with
``AutoModelForTokenClassification.from_pretrained`` (no dropout is applied in training, so
eval-mode transformers' scores equal the trained ones); :class:`StepScorer` scores new
solutions and aggregates step scores by min, product or last step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.fields import FIELDS_HELP
from ..config import ModelConfig, TrainConfig, option, unused_notes, validated
from ..data.chat import render_prompt
from ..data.formats import write_jsonl
from ..errors import ConfigError, DataError
from ..models.loading import (
    accelerator_for,
    check_model_fits,
    load_causal_lm,
    load_sequence_classifier,
    read_paths,
    tokenizer_for,
)
from ..models.peft import apply_peft
from ..ops import mc_step_labels, prm_step_loss
from ..world.sources import load_source
from ..rewards import compute_rewards, resolve_reward_functions
from ..rewards.process import (
    StepExample,
    StepScorer,
    collate_steps,
    encode_steps,
    score_examples,
    score_head,
    split_steps,
    step_logits,
)
from ..rollout import BackendConfig, SamplingParams, backend_for, requests
from ..train.engine import FitResult, fit
from ..train.plan import StepPlan, write_on_main
from ..train.rundir import check_output_dir
from .online import prompt_text

BUILTIN_STEPS = "builtin:world-steps"

# --------------------------------------------------------------------------- config


@dataclass
class PRMDataConfig:
    """Stepwise data."""

    train: str = option(BUILTIN_STEPS, "JSONL/Parquet stepwise records ({\"prompt\", \"completions\": [steps], "
                                       "\"labels\": [...]}) or builtin:world-steps.")
    eval: str | None = option("auto", "Held-out stepwise records (with labels); auto: the world's held-out steps "
                                      "for builtin data, else none.")
    fields: dict | str | None = option(None, FIELDS_HELP)
    delimiter: str = option("\n", "Splits a 'completions' string into steps (and joins steps into the text the "
                                  "model reads).")
    max_length: int = option(256, "Prompt + solution tokens; longer records are dropped and counted.", min=8)
    world_examples: int = option(2000, "Records generated for builtin:world-steps.", min=1, max=1_000_000)
    world_eval_examples: int = option(200, "Records generated for the held-out builtin set.", min=1, max=1_000_000)


@dataclass
class PRMLabelConfig(BackendConfig):
    """Where the step labels come from (labels.backend: what samples the Monte-Carlo rollouts)."""

    source: str = option("given", "given: the records' labels; mc: Monte-Carlo rollouts of labels.policy from "
                                  "every step prefix.", choices=("given", "mc"))
    policy: str | None = option(None, "labels.source=mc: the policy that completes each prefix (e.g. "
                                      "runs/sft/final).")
    k: int = option(8, "labels.source=mc: rollouts per step prefix.", min=1, max=4096)
    functions: list[str] = option(default_factory=lambda: ["world_correct"],
                                  help="labels.source=mc: reward functions grading a completed solution (summed).")
    threshold: float = option(1.0, "labels.source=mc: a rollout succeeds when its reward is >= this.")
    max_new_tokens: int = option(64, "labels.source=mc: longest rollout.", min=1)
    temperature: float = option(1.0, "labels.source=mc: rollout temperature.", gt=0.0)
    batch_size: int = option(128, "labels.source=mc: sequences decoded together.", min=1)


@dataclass
class PRMLossConfig:
    """The step loss."""

    target: str = option("soft", "soft: BCE to the label itself (an MC success rate); hard: to 1[label > 0] "
                                 "(Math-Shepherd's hard estimate).", choices=("soft", "hard"))


@dataclass
class PRMConfig:
    """posttrain prm: a process reward model (a score at every step's end)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PRMDataConfig = field(default_factory=PRMDataConfig)
    labels: PRMLabelConfig = field(default_factory=PRMLabelConfig)
    loss: PRMLossConfig = field(default_factory=PRMLossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/prm", lr=3e-4,
                                                                   micro_batch_size=8, epochs=1.0,
                                                                   warmup_ratio=0.05))

    def validate(self) -> None:
        if not self.data.delimiter:
            raise ConfigError("data.delimiter is empty.", fix="set it to the text between steps, e.g. '\\n'.")
        if self.labels.source == "mc" and not self.labels.policy:
            raise ConfigError("labels.source=mc samples completions of every step prefix, but labels.policy is not set.",
                              fix="set labels.policy to a causal LM directory (e.g. runs/sft/final).")
        if self.labels.source == "given" and self.labels.policy:
            raise ConfigError(f"labels.policy={self.labels.policy!r} is set, but labels.source=given reads the "
                              "records' labels.", fix="set labels.source=mc, or remove labels.policy.")
        if self.model.peft.quantize != "none":
            raise ConfigError(f"model.peft.quantize={self.model.peft.quantize}: QLoRA is not supported for reward "
                              "models (the score head would sit on a 4-bit backbone).",
                              fix="use model.peft.method=lora with model.peft.quantize=none.")


# --------------------------------------------------------------------------- data


def load_step_source(spec: str, data: PRMDataConfig, seed: int, key: str = "data.train"):
    ds = load_source(spec, data, kinds=("steps",), seed=seed, key=key, what="step data")
    if ds.format != "stepwise":
        raise DataError(f"{ds.source} holds {ds.format} records; a process reward model trains on stepwise records "
                        "with a 'completions' list of steps.",
                        fix=f"give {key} records like {{\"prompt\": ..., \"completions\": [\"step 1\", \"step 2\"], "
                        "\"labels\": [true, false]}.")
    return ds


def step_lists(ds, delimiter: str, key: str) -> list[list[str]]:
    """Every record's steps. A record given as one string that the delimiter never splits is one
    step; if that holds for every record, the delimiter is surely wrong and this raises."""
    out = [split_steps(r["completions"], delimiter) if isinstance(r["completions"], str) else r["completions"]
           for r in ds.records]
    strings = [i for i, r in enumerate(ds.records) if isinstance(r["completions"], str)]
    if strings and all(len(out[i]) == 1 for i in strings):
        raise DataError(f"{ds.source}: data.delimiter={delimiter!r} occurs in none of the {len(strings)} solutions "
                        f"given as one string (e.g. {ds.where(strings[0], 'completions')}), so every solution would be "
                        "a single step.", fix=f"set data.delimiter to the text between the steps of {key}, or give "
                        "'completions' as a list of steps.")
    for i in strings:
        labels = ds.records[i].get("labels")
        if labels is not None and len(labels) != len(out[i]):
            raise DataError(f"{ds.where(i, 'labels')}: {len(labels)} labels for the {len(out[i])} steps that "
                            f"data.delimiter={delimiter!r} splits the solution into.",
                            fix="give one label per step, or check data.delimiter.")
    return out


# --------------------------------------------------------------------------- Monte-Carlo labels


def mc_success_counts(prefixes: list[list[int]], *, k: int, sample, grade) -> list[int]:
    """For each prefix, how many of ``k`` sampled completions succeed.

    ``sample(prefixes, k) -> list[str]`` returns ``len(prefixes) * k`` completion texts, prefix by
    prefix; ``grade(i, texts) -> list[bool]`` grades prefix ``i``'s ``k`` completions. A stub
    sampler with a known success probability tests the estimator (``tests/test_prm.py``).
    """
    if k < 1:
        raise ConfigError(f"labels.k={k}: a Monte-Carlo label needs at least one rollout.", fix="set labels.k >= 1.")
    texts = sample(prefixes, k)
    if len(texts) != len(prefixes) * k:
        raise ValueError(f"the sampler returned {len(texts)} completions for {len(prefixes)} prefixes x {k}")
    return [sum(bool(g) for g in grade(i, texts[i * k:(i + 1) * k])) for i in range(len(prefixes))]


@torch.no_grad()
def monte_carlo_labels(records: list[dict], steps: list[list[str]], *, policy, tokenizer, labels: PRMLabelConfig,
                       delimiter: str, seed: int, log) -> list[list[int]]:
    """Success counts (out of ``labels.k``) for every step of every record (see the module docstring)."""
    functions = resolve_reward_functions(list(labels.functions), None, tokenizer=tokenizer,
                                         device=next(policy.parameters()).device)
    jobs, texts, last = [], [], []  # (record, step) of each sampled prefix; prefix texts
    for r, st in enumerate(steps):
        for i in range(len(st)):
            if i == len(st) - 1:
                last.append(r)
                continue
            jobs.append((r, i))
            texts.append(delimiter.join(st[: i + 1]) + delimiter)
    prompt_ids = [render_prompt(tokenizer, rec["prompt"]) for rec in records]
    prefixes = [prompt_ids[r] + list(tokenizer(t, add_special_tokens=False)["input_ids"])
                for (r, _), t in zip(jobs, texts)]
    log(f"monte-carlo labels: {len(jobs)} step prefixes x {labels.k} rollouts of {labels.policy}")

    def grade_texts(rec_idx: list[int], completions: list[str]) -> list[bool]:
        recs = [records[i] for i in rec_idx]
        fields = {name: [r.get(name) for r in recs] for name in recs[0] if name not in ("prompt", "completions",
                                                                                        "labels")}
        res = compute_rewards(functions, [prompt_text(r["prompt"]) for r in recs], completions,
                              completion_ids=[[] for _ in completions], finished=[True] * len(completions),
                              max_new_tokens=labels.max_new_tokens, **fields)
        return [bool(v) and float(t) >= labels.threshold for v, t in zip(res.valid, res.total)]

    backend = backend_for(labels, policy, tokenizer, key="labels.backend", batch_size=labels.batch_size,
                          max_model_len=max((len(p) for p in prefixes), default=1) + labels.max_new_tokens)

    def sample(prefs, k):
        rolls = backend.generate(requests(prefs), SamplingParams(labels.max_new_tokens, labels.temperature, n=k,
                                                                 seed=seed))
        return [r.text for r in rolls]

    counts = mc_success_counts(
        prefixes, k=labels.k, sample=sample,
        grade=lambda i, outs: grade_texts([jobs[i][0]] * len(outs), [texts[i] + o for o in outs])) if jobs else []
    out = [[0] * len(st) for st in steps]
    for (r, i), c in zip(jobs, counts):
        out[r][i] = c
    finals = grade_texts(last, [delimiter.join(steps[r]) for r in last]) if last else []
    for r, ok in zip(last, finals):
        out[r][-1] = labels.k if ok else 0
    return out


# --------------------------------------------------------------------------- the algorithm


class PRMAlgorithm:
    """BCE over the step logits, normalized by the optimizer step's number of labelled steps."""

    def __init__(self, target: str = "soft"):
        self.target = target

    def counts(self, batch: dict) -> dict[str, int]:
        return {"steps": int(batch["step_labels"].numel()), "sequences": int(batch["input_ids"].shape[0]),
                "input_tokens": int(batch["num_input_tokens"])}

    def loss(self, model, batch: dict, totals: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = step_logits(model, batch)
        y = batch["step_labels"]
        if self.target == "hard":
            y = (y > 0).float()
        per_step, m = prm_step_loss(logits, y)
        n = totals["steps"].clamp(min=1)
        return per_step.sum() / n, {"step_accuracy": m["step_correct"].sum() / n,
                                    "mean_label": y.sum() / n, "mean_score": m["step_prob"].sum() / n}


class StepPlanPRM(StepPlan):
    """Shuffled micro-batches of solutions, per epoch."""

    def __init__(self, examples: list[StepExample], *, micro_batch_size: int, grad_accum: int, epochs: float,
                 max_steps: int, seed: int, pad_token_id: int):
        self.examples = examples
        super().__init__(n_items=len(examples),
                         epoch_units=lambda epoch, rng: rng.sample(range(len(examples)), len(examples)),
                         collate=lambda mb: collate_steps([examples[i] for i in mb], pad_token_id=pad_token_id),
                         content=lambda: ([e.input_ids, e.step_ends, e.labels] for e in examples),
                         micro_batch_size=micro_batch_size, grad_accum=grad_accum, epochs=epochs,
                         max_steps=max_steps, seed=seed, tag="prm")


def step_metrics(scores: list[list[float]], examples: list[StepExample], first_errors: list | None = None) -> dict:
    """Held-out step accuracy (score > 0.5 vs label > 0.5) and, where the first wrong step is known,
    how often the lowest-scored step / the first step scored below 0.5 is it (vs chance)."""
    right = total = 0
    for s, e in zip(scores, examples):
        if e.labels is None:
            continue
        for p, y in zip(s, e.labels):
            right += int((p > 0.5) == (y > 0.5))
            total += 1
    out = {"step_accuracy": right / total if total else float("nan")}
    if first_errors is not None:
        hits_min = hits_first = chance = n = 0
        for s, fe in zip(scores, first_errors):
            if fe is None or not s:
                continue
            n += 1
            hits_min += int(min(range(len(s)), key=lambda i: s[i]) == fe)
            below = [i for i, p in enumerate(s) if p < 0.5]
            hits_first += int(bool(below) and below[0] == fe)
            chance += 1 / len(s)
        if n:
            out.update(localization_min=hits_min / n, localization_first_below_half=hits_first / n,
                       localization_chance=chance / n, localization_solutions=n)
    return out


# --------------------------------------------------------------------------- entry point


@dataclass
class PRMResult:
    fit: FitResult
    final_dir: Path | None
    eval_metrics: dict = dataclasses.field(default_factory=dict)
    label_stats: dict = dataclasses.field(default_factory=dict)


def _encode(ds, steps, tokenizer, data: PRMDataConfig, labels: list[list[float]] | None, log, name: str):
    examples, keep, dropped = [], [], 0
    for i, (r, st) in enumerate(zip(ds.records, steps)):
        e = encode_steps(tokenizer, r["prompt"], st, delimiter=data.delimiter)
        if len(e) > data.max_length:
            dropped += 1
            continue
        e.labels = labels[i] if labels is not None else r.get("labels")
        examples.append(e)
        keep.append(i)
    log(f"{name} {ds.source}: {len(examples)} solutions, {sum(len(e.step_ends) for e in examples)} steps"
        + (f"; {dropped} longer than data.max_length={data.max_length} dropped" if dropped else ""))
    return examples, keep


def run_prm(cfg: PRMConfig, *, model=None, tokenizer=None, policy=None, log=print) -> PRMResult:
    """Train a process reward model as configured (see the module docstring). ``policy`` may be
    passed in for ``labels.source=mc`` instead of loading ``labels.policy``."""
    cfg = validated(cfg, PRMConfig)
    log = log or (lambda line: None)
    check_output_dir(cfg.train.output_dir, resume=cfg.train.resume, overwrite=cfg.train.overwrite_output_dir,
                     protect=read_paths(cfg.model, **{"labels.policy": cfg.labels.policy}))
    torch.manual_seed(cfg.train.seed)
    accelerator = accelerator_for(cfg.model)
    tokenizer = tokenizer or tokenizer_for(cfg.model)
    if tokenizer.pad_token_id is None:
        raise ConfigError("The tokenizer has no pad token.", fix="set model.pad_token (e.g. to its EOS token).")
    train_ds = load_step_source(cfg.data.train, cfg.data, cfg.train.seed)
    train_steps = step_lists(train_ds, cfg.data.delimiter, "data.train")
    out = Path(cfg.train.output_dir)
    label_stats: dict = {}
    labels = None
    if cfg.labels.source == "mc":
        if policy is None:
            policy = load_causal_lm(cfg.labels.policy, dtype=cfg.model.dtype, device=str(accelerator.device),
                                    attn_implementation=cfg.model.attn_implementation, key="labels.policy")
        counts = monte_carlo_labels(train_ds.records, train_steps, policy=policy, tokenizer=tokenizer,
                                    labels=cfg.labels, delimiter=cfg.data.delimiter, seed=cfg.train.seed, log=log)
        labels = [mc_step_labels(torch.tensor(c), cfg.labels.k).tolist() for c in counts]
        label_stats = _label_stats(train_ds.records, labels)
        log("monte-carlo labels: " + ", ".join(f"{k} {v:.3f}" for k, v in label_stats.items()))
        write_on_main(_write_labels, out / "step_labels.jsonl", train_ds.records, train_steps, labels, counts, cfg.labels.k)
        del policy
    else:
        missing = [i for i, r in enumerate(train_ds.records) if r.get("labels") is None]
        if missing:
            raise DataError(f"{train_ds.where(missing[0], 'labels')}: the record has no step labels "
                            f"({len(missing)} of {len(train_ds)} records lack them), and labels.source=given.",
                            fix="add 'labels' (one per step) to every record, or set labels.source=mc with "
                            "labels.policy to estimate them.")
    if model is None:
        model = load_sequence_classifier(cfg.model.name_or_path, num_labels=1, dtype=cfg.model.dtype,
                                         device=str(accelerator.device), per_token=True,
                                         attn_implementation=cfg.model.attn_implementation)
        if not any(a.endswith("ForTokenClassification") for a in model.config.architectures or []):
            # a new head on a language model: start every step at score 0.5 (loss ln 2), not at noise
            with torch.no_grad():
                score_head(model).weight.zero_()
                if score_head(model).bias is not None:
                    score_head(model).bias.zero_()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.posttrain_step_delimiter = cfg.data.delimiter
    check_model_fits(model, tokenizer, cfg.model, max_length=cfg.data.max_length)
    model = apply_peft(model, cfg.model.peft, task="TOKEN_CLS", log=log)
    examples, _ = _encode(train_ds, train_steps, tokenizer, cfg.data, labels, log, "train data")
    eval_spec = cfg.data.eval
    if eval_spec == "auto":
        eval_spec = BUILTIN_STEPS + "-heldout" if cfg.data.train == BUILTIN_STEPS else None
    eval_examples, first_errors = [], None
    if eval_spec:
        eval_ds = load_step_source(eval_spec, cfg.data, cfg.train.seed, key="data.eval")
        eval_examples, keep = _encode(eval_ds, step_lists(eval_ds, cfg.data.delimiter, "data.eval"), tokenizer,
                                      cfg.data, None, log, "eval data")
        if any(e.labels is None for e in eval_examples):
            raise DataError(f"{eval_ds.source}: held-out records need step labels to be scored against.",
                            fix="add 'labels' to the data.eval records, or set data.eval=null.")
        if all("first_error" in eval_ds.records[i] for i in keep):
            first_errors = [eval_ds.records[i]["first_error"] for i in keep]
    notes = []
    if cfg.labels.source == "given":
        notes += unused_notes(cfg.labels, "labels.", ["k", "functions", "threshold", "max_new_tokens", "temperature",
                                                      "batch_size"], "labels.source=given")
    for note in notes:
        log(f"note: {note}")
    algo = PRMAlgorithm(cfg.loss.target)
    plan = StepPlanPRM(examples, micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                       epochs=cfg.train.epochs, max_steps=cfg.train.max_steps, seed=cfg.train.seed,
                       pad_token_id=tokenizer.pad_token_id)
    log(f"process reward model: {len(examples)} solutions, BCE to {cfg.loss.target} labels; plan: "
        f"{plan.num_steps()} optimizer steps of {cfg.train.micro_batch_size} x {cfg.train.grad_accum} solutions")

    def evaluate(m) -> dict:
        scores = score_examples(m, eval_examples, pad_token_id=tokenizer.pad_token_id)
        return {f"eval_{k}": v for k, v in step_metrics(scores, eval_examples, first_errors).items()}

    result = fit(model, algo, plan, cfg.train, tokenizer=tokenizer, accelerator=accelerator,
                 evaluate=evaluate if eval_examples else None, run_config=dataclasses.asdict(cfg), log=log)
    return PRMResult(fit=result, final_dir=result.final_dir, label_stats=label_stats,
                     eval_metrics=result.eval_history[-1] if result.eval_history else {})


def _label_stats(records: list[dict], labels: list[list[float]]) -> dict:
    """Mean MC label, and where the records carry gold labels, the agreement of the hard
    (any success) and the 0.5-thresholded soft labels with them."""
    flat = [x for ls in labels for x in ls]
    out = {"mean_label": sum(flat) / len(flat) if flat else float("nan")}
    gold = [(g, x) for r, ls in zip(records, labels) if r.get("labels") is not None for g, x in zip(r["labels"], ls)]
    if gold:
        out["hard_agreement_with_gold"] = sum(int((x > 0) == (g > 0.5)) for g, x in gold) / len(gold)
        out["soft_agreement_with_gold"] = sum(int((x > 0.5) == (g > 0.5)) for g, x in gold) / len(gold)
    return out


def _write_labels(path: Path, records, steps, labels, counts, k: int) -> None:
    out = []
    for r, st, ls, cs in zip(records, steps, labels, counts):
        rec = {k2: v for k2, v in r.items() if k2 not in ("completions", "labels")}
        rec.update(completions=st, labels=ls, mc_successes=cs, mc_k=k)
        if r.get("labels") is not None:
            rec["gold_labels"] = r["labels"]
        out.append(rec)
    write_jsonl(path, out)


__all__ = ["PRMConfig", "PRMResult", "StepExample", "StepScorer", "encode_steps", "mc_success_counts",
           "monte_carlo_labels", "run_prm", "split_steps", "step_metrics"]
