"""RLAIF / Constitutional AI: generate -> critique -> revise, then SFT data and AI-labelled pairs.

    posttrain cai --config cfg.yaml k=v ...

The loop of Bai et al. 2022 (note 001 §13)::

    prompts --policy samples--> responses
            --for each of revise.rounds rounds: sample a principle of the constitution;
              the reviser answers the principle's critique request, then its revision request
              (one chat conversation: question, response, critique request, critique, revision
              request, revision)--> revisions
            --(a) the final revisions--> sft.jsonl (prompt/completion records)
            --(b) the judge compares response and final revision under the last principle, in
              both orders (position bias cancels; judge.pairs=compare), or accepts one and rejects
              the other (judge.pairs=score)--> pairs.jsonl (prompt/chosen/rejected records)
            --select.train=sft: fine-tune the policy on sft.jsonl (CAI's supervised stage)

``pairs.jsonl`` is in the preference format of ``posttrain dpo`` / ``posttrain rm`` (the RL
stage: ``posttrain dpo data.train=runs/cai/pairs.jsonl``). The reviser and the judge are any
causal LMs with a chat template (``policy`` = the policy itself, as in the paper); their
answers are parsed strictly and what does not parse is counted, never guessed.

When the prompts carry a reference answer (``verifier``, e.g. the world's ``world_correct``),
the loop also *measures* itself, without training on it: the judge's agreement with the gold
verifier, the revision success rate (wrong responses made right) and breakage rate (right ones
made wrong), and the held-out accuracy before and after the SFT stage. Everything lands in
``samples.jsonl`` (one record per prompt with every critique and revision), ``cai.json`` and
``cai.md``.

The tiny world's roles are trained with this library's own SFT (``posttrain sft
data.train=builtin:world-judge`` / ``builtin:world-revise``); see :mod:`posttrain.world.feedback`
and docs/cai.md.
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

from ..config import ModelConfig, TrainConfig, option, validated
from ..data.formats import load_records
from ..data.tokenize import encode_dataset
from ..errors import ConfigError, DataError, TrainingError
from ..models.loading import (
    accelerator_for,
    check_model_fits,
    load_causal_lm,
    load_policy,
    load_tokenizer,
    read_paths,
    tokenizer_for,
)
from ..models.peft import apply_peft
from ..rewards import check_reward_fields
from ..rewards.judge import (
    DEFAULT_COMPARE_TEMPLATE,
    DEFAULT_SCORE_TEMPLATE,
    REASONING_COMPARE_TEMPLATE,
    REASONING_SCORE_TEMPLATE,
    Comparison,
    Judge,
    Principle,
    chat_replies,
)
from ..rollout import HFSampler, Rollout, SamplingParams, requests
from ..train.engine import fit
from ..train.plan import write_on_main
from ..train.rundir import check_output_dir
from ..train.sharding import refuse_sharding
from ..world.feedback import load_constitution
from .rl import build_rewards, epoch_order_indices, evaluate_prompts, load_prompt_sets, score_rollouts
from .rl_config import RewardConfig, RLDataConfig
from .sft import SFTAlgorithm, SFTPlan

POLICY = "policy"

# --------------------------------------------------------------------------- config


@dataclass
class CAISamplingConfig:
    """The policy's responses: one per prompt."""

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


# --------------------------------------------------------------------------- pure parts


def sample_principles(n: int, constitution: list[Principle], *, seed: int, round_: int) -> list[Principle]:
    """One principle per prompt for a revision round, uniformly at random (seeded by seed, round)."""
    rng = random.Random(f"cai-principles-{seed}-{round_}")
    return [rng.choice(constitution) for _ in range(n)]


@dataclass
class PairResult:
    """AI-labelled pairs from both-order comparisons of (response, revision): ``pairs[i]`` is
    ``(chosen, rejected)`` or None. Counts: ``unchanged`` (identical texts, not asked), and the
    comparison's ``unparseable`` answers, ``inconsistent`` pairs and ``agreed`` pairs."""

    pairs: list[tuple[str, str] | None]
    unchanged: int = 0
    unparseable: int = 0
    inconsistent: int = 0
    agreed: int = 0
    tied: int = 0   # score mode: both sides got the same verdict

    @property
    def agreement_rate(self) -> float:
        parsed = self.agreed + self.inconsistent
        return self.agreed / parsed if parsed else float("nan")


def ai_pairs(compare, prompts: list[str], originals: list[str], revisions: list[str | None],
             principles: list[Principle]) -> PairResult:
    """Ask ``compare(prompts, xs, ys, principle=statement) -> Comparison`` about each changed
    (response, revision), grouped by principle; agreed answers become (chosen, rejected)."""
    out = PairResult(pairs=[None] * len(prompts))
    groups: dict[str, list[int]] = {}
    for i, (o, r) in enumerate(zip(originals, revisions)):
        if r is None:
            continue
        if o.strip() == r.strip():
            out.unchanged += 1
            continue
        groups.setdefault(principles[i].name, []).append(i)
    for idx in groups.values():
        c: Comparison = compare([prompts[i] for i in idx], [originals[i] for i in idx], [revisions[i] for i in idx],
                                principle=principles[idx[0]].statement)
        out.unparseable += c.unparseable
        out.inconsistent += c.inconsistent
        out.agreed += c.agreed
        for i, pick in zip(idx, c.preferred):
            if pick is not None:
                a, b = (originals[i], revisions[i])
                out.pairs[i] = (a, b) if pick == 0 else (b, a)
    return out


def score_pairs(originals: list[str], revisions: list[str | None], v_orig: list[bool | None],
                v_rev: list[bool | None]) -> PairResult:
    """AI-labelled pairs from pointwise verdicts: a changed (response, revision) is a pair when the
    judge accepts one side and rejects the other (the accepted side is chosen); equal verdicts
    are ``tied``, a side without a verdict counts as ``unparseable``. ``agreed`` = pairs made."""
    out = PairResult(pairs=[None] * len(originals))
    for i, (o, r) in enumerate(zip(originals, revisions)):
        if r is None:
            continue
        if o.strip() == r.strip():
            out.unchanged += 1
        elif v_orig[i] is None or v_rev[i] is None:
            out.unparseable += 1
        elif v_orig[i] == v_rev[i]:
            out.tied += 1
        else:
            out.agreed += 1
            out.pairs[i] = (r, o) if v_rev[i] else (o, r)
    return out


def revision_stats(before: list[bool | None], after: list[bool | None]) -> dict[str, float | int]:
    """Gold correctness before / after revision -> success rate (wrong made right, over wrong),
    breakage rate (right made wrong, over right); None entries (no verdict) are skipped."""
    both = [(b, a) for b, a in zip(before, after) if b is not None and a is not None]
    wrong = [a for b, a in both if not b]
    right = [a for b, a in both if b]
    return {"wrong": len(wrong), "fixed": sum(wrong), "right": len(right), "broken": sum(1 for a in right if not a),
            "success_rate": sum(wrong) / len(wrong) if wrong else float("nan"),
            "breakage_rate": sum(1 for a in right if not a) / len(right) if right else float("nan")}


def verdict_agreement(verdicts: list[bool | None], gold: list[bool | None]) -> dict[str, float | int]:
    """How often the judge's Yes / No equals the verifier's correct / wrong (parsed verdicts with
    a gold label), with the judge's Yes rate and the unparseable count."""
    both = [(v, g) for v, g in zip(verdicts, gold) if v is not None and g is not None]
    parsed = [v for v in verdicts if v is not None]
    return {"n": len(both), "agreement": sum(v == g for v, g in both) / len(both) if both else float("nan"),
            "yes_rate": sum(parsed) / len(parsed) if parsed else float("nan"),
            "unparseable": sum(v is None for v in verdicts)}


# --------------------------------------------------------------------------- the loop


@dataclass
class CAIResult:
    summary: dict
    final_dir: Path | None
    eval_metrics: dict = field(default_factory=dict)


class _Role:
    """A chat model answering conversations (the reviser): replies, None where one does not fit."""

    def __init__(self, model, tokenizer, *, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def reply(self, conversations: list[list[dict]], *, max_new_tokens: int, temperature: float, seed: int):
        return chat_replies(self.model, self.tokenizer, conversations, max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed, batch_size=self.batch_size)


def _user_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def _load_role(name: str, cfg: CAIConfig, policy, policy_tok, accelerator, key: str):
    if name == POLICY:
        return policy, policy_tok
    model = load_causal_lm(name, dtype=cfg.model.dtype, device=str(accelerator.device),
                           attn_implementation=cfg.model.attn_implementation, key=key)
    model.eval()
    return model, load_tokenizer(name, key=key)


def run_cai(cfg: CAIConfig, *, model=None, tokenizer=None, log=print, reviser=None, judge=None) -> CAIResult:
    """Run the Constitutional AI loop as configured (see the module docstring).

    ``reviser`` (an object with ``reply(conversations, *, max_new_tokens, temperature, seed)``
    returning rollouts or None) and ``judge`` (a :class:`posttrain.rewards.judge.Judge`-like object
    with ``score``, ``compare`` and ``too_long``) replace the models ``revise.model`` /
    ``judge.model`` name (tests use oracles)."""
    cfg = validated(cfg, CAIConfig)
    log = log or (lambda line: None)
    out = Path(cfg.train.output_dir).expanduser()
    check_output_dir(str(out), resume=None, overwrite=cfg.train.overwrite_output_dir,
                     protect=read_paths(cfg.model, **{"revise.model": None if cfg.revise.model == POLICY else cfg.revise.model,
                                                      "judge.model": None if cfg.judge.model == POLICY else cfg.judge.model}))
    constitution = load_constitution(cfg.constitution)
    names = [p.name for p in constitution]
    score_name = cfg.judge.score_principle or names[0]
    if score_name not in names:
        raise ConfigError(f"judge.score_principle={score_name!r} is not a principle of {cfg.constitution} "
                          f"(it has {names}).", fix="name one of those, or null for the first.")
    score_principle = constitution[names.index(score_name)]
    torch.manual_seed(cfg.train.seed)
    accelerator = accelerator_for(cfg.model)
    tokenizer = tokenizer or tokenizer_for(cfg.model)
    if model is None:
        model = load_policy(cfg.model, accelerator)
    s, rv = cfg.sampling, cfg.revise
    check_model_fits(model, tokenizer, cfg.model, max_length=cfg.data.max_prompt_length + s.max_new_tokens,
                     parts={"data.max_prompt_length": cfg.data.max_prompt_length, "sampling.max_new_tokens": s.max_new_tokens})
    if tokenizer.pad_token_id is None:
        raise ConfigError("The tokenizer has no pad token.", fix="set model.pad_token (e.g. to its EOS token).")
    prompts, eval_prompts, source = load_prompt_sets(cfg.data, tokenizer, seed=cfg.train.seed, log=log)
    verifier = []
    if cfg.verifier:
        verifier, _ = build_rewards(RewardConfig(functions=list(cfg.verifier)), tokenizer, accelerator.device,
                                    max_new_tokens=s.max_new_tokens)
        check_reward_fields(verifier, set(prompts[0].fields), source)
    if reviser is None:
        reviser = _Role(*_load_role(rv.model, cfg, model, tokenizer, accelerator, "revise.model"),
                        batch_size=rv.batch_size)
    if judge is None:
        jc = cfg.judge
        compare_t, score_t = jc.compare_template, jc.score_template
        if jc.reasoning:   # the reasoning wording unless the user wrote their own templates
            compare_t = REASONING_COMPARE_TEMPLATE if compare_t == DEFAULT_COMPARE_TEMPLATE else compare_t
            score_t = REASONING_SCORE_TEMPLATE if score_t == DEFAULT_SCORE_TEMPLATE else score_t
        judge = Judge(*_load_role(jc.model, cfg, model, tokenizer, accelerator, "judge.model"),
                      max_new_tokens=jc.max_new_tokens, batch_size=jc.batch_size, compare_template=compare_t,
                      score_template=score_t, reasoning=jc.reasoning)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"output_dir": str(out), "prompts_source": source, "constitution": cfg.constitution, "principles": names,
                     "revise_model": rv.model, "judge_model": cfg.judge.model}

    def evaluate(m) -> dict:
        if not (eval_prompts and verifier):
            return {}
        return evaluate_prompts(m, tokenizer, eval_prompts, verifier, max_new_tokens=s.eval_max_new_tokens)

    def gold(items, texts: list[str | None], finished: list[bool]) -> list[bool | None]:
        if not verifier:
            return [None] * len(texts)
        rolls = [Rollout(i, [], [], [], t or "", f) for i, (t, f) in enumerate(zip(texts, finished))]
        res = score_rollouts(verifier, items, rolls, max_new_tokens=s.max_new_tokens)
        return [bool(v >= cfg.verifier_threshold) if ok else None for v, ok in zip(res.total.tolist(), res.valid.tolist())]

    t0 = time.time()
    model.eval()
    before = evaluate(model)
    summary.update({f"before/{k}": v for k, v in before.items()})
    idx = epoch_order_indices(len(prompts), 0, min(s.prompts, len(prompts)),
                              lambda e: f"cai-prompts-{cfg.train.seed}-{e}")
    items = [prompts[i] for i in idx]
    n = len(items)
    log(f"cai: {n} prompts, {rv.rounds} revision round(s) under {len(constitution)} principle(s) "
        f"({', '.join(names)}); reviser {rv.model}, judge {cfg.judge.model}")
    rolls = HFSampler(model, tokenizer, batch_size=s.batch_size).generate(
        requests([p.ids for p in items]),
        SamplingParams(s.max_new_tokens, s.temperature, s.top_p,
                       seed=random.Random(f"cai-sample-{cfg.train.seed}").getrandbits(62)))
    responses = [r.text for r in rolls]
    gold_response = gold(items, responses, [r.finished for r in rolls])
    log(f"responses: {n} sampled in {time.time() - t0:.0f}s"
        + (f"; verifier accuracy {_rate(gold_response)}" if verifier else ""))

    # critique -> revision rounds
    current = list(responses)
    history: list[list[dict]] = [[] for _ in range(n)]
    revised = [False] * n
    counts = {"too_long": 0, "critique_cut": 0, "revision_cut": 0, "revision_empty": 0}
    principles: list[Principle] = []
    for r in range(1, rv.rounds + 1):
        t1 = time.time()
        principles = sample_principles(n, constitution, seed=cfg.train.seed, round_=r)
        convs = [_user_messages(p.prompt if p.prompt is not None else p.text)
                 + [{"role": "assistant", "content": current[i]}, {"role": "user", "content": principles[i].critique_request}]
                 for i, p in enumerate(items)]
        seed = random.Random(f"cai-revise-{cfg.train.seed}-{r}").getrandbits(62)
        crits = reviser.reply(convs, max_new_tokens=rv.critique_max_new_tokens, temperature=rv.temperature, seed=seed)
        live = [i for i in range(n) if crits[i] is not None]
        counts["too_long"] += n - len(live)
        counts["critique_cut"] += sum(1 for i in live if not crits[i].finished)
        convs2 = [convs[i] + [{"role": "assistant", "content": crits[i].text},
                              {"role": "user", "content": principles[i].revision_request}] for i in live]
        revs = reviser.reply(convs2, max_new_tokens=rv.revision_max_new_tokens, temperature=rv.temperature, seed=seed + 1)
        for i, rev in zip(live, revs):
            step = {"round": r, "principle": principles[i].name, "critique": crits[i].text}
            if rev is None:
                counts["too_long"] += 1
                step["revision"] = None
            elif not rev.finished:
                counts["revision_cut"] += 1
                step.update(revision=rev.text, invalid="cut at revise.revision_max_new_tokens")
            elif not rev.text.strip():
                counts["revision_empty"] += 1
                step.update(revision="", invalid="empty")
            else:
                step["revision"] = rev.text
                current[i] = rev.text
                revised[i] = True
            history[i].append(step)
        for i in set(range(n)) - set(live):
            history[i].append({"round": r, "principle": principles[i].name, "critique": None, "revision": None,
                               "invalid": "conversation longer than the reviser's context"})
        log(f"revision round {r}: {sum(1 for i in range(n) if history[i][-1].get('revision') and 'invalid' not in history[i][-1])}"
            f" valid revisions of {n} in {time.time() - t1:.0f}s")
    finals = [current[i] if revised[i] else None for i in range(n)]
    summary.update({f"revise/{k}": v for k, v in counts.items()})
    summary["revise/revised"] = sum(revised)
    summary["revise/changed"] = sum(1 for i in range(n) if revised[i] and finals[i].strip() != responses[i].strip())

    # gold measurement of the revisions
    gold_final = gold(items, [f if f is not None else "" for f in finals], [True] * n)
    gold_final = [g if revised[i] else None for i, g in enumerate(gold_final)]
    for key, flags in (("response", gold_response), ("final", gold_final)):
        got = [f for f in flags if f is not None]
        summary[f"gold/{key}s"] = len(got)
        summary[f"gold/{key}_accuracy"] = sum(got) / len(got) if got else float("nan")
    rs = revision_stats(gold_response, gold_final)
    summary.update({f"revise/{k}": v for k, v in rs.items()})

    # the judge: score responses and final revisions; compare the changed pairs
    t2 = time.time()
    texts = [p.text for p in items]
    v_resp, _ = judge.score(texts, responses, principle=score_principle.statement)
    rev_idx = [i for i in range(n) if revised[i]]
    v_rev_part, _ = judge.score([texts[i] for i in rev_idx], [finals[i] for i in rev_idx],
                                principle=score_principle.statement) if rev_idx else ([], 0)
    v_rev: list[bool | None] = [None] * n
    for i, v in zip(rev_idx, v_rev_part):
        v_rev[i] = v
    summary["judge/too_long"] = judge.too_long
    for k, v in verdict_agreement(v_resp, gold_response).items():
        summary[f"judge/responses_{k}"] = v
    for k, v in verdict_agreement([v_rev[i] for i in rev_idx], [gold_final[i] for i in rev_idx]).items():
        summary[f"judge/revisions_{k}"] = v
    if cfg.judge.pairs == "compare":
        pr = ai_pairs(judge.compare, texts, responses, finals, principles)
    else:
        pr = score_pairs(responses, finals, v_resp, v_rev)
    gold_pairs = [(gold_final[i], gold_response[i]) if pr.pairs[i][0] == finals[i] else (gold_response[i], gold_final[i])
                  for i in range(n) if pr.pairs[i] is not None]
    decided = [(c, r) for c, r in gold_pairs if c is not None and r is not None and c != r]
    summary.update({"pairs/made": sum(p is not None for p in pr.pairs), "pairs/unchanged": pr.unchanged,
                    "pairs/mode": cfg.judge.pairs, "pairs/tied": pr.tied,
                    "pairs/unparseable_answers": pr.unparseable, "pairs/inconsistent": pr.inconsistent,
                    "pairs/agreement_rate": pr.agreement_rate,
                    "pairs/revision_chosen": sum(1 for i in range(n) if pr.pairs[i] and pr.pairs[i][0] == finals[i]),
                    "pairs/gold_decided": len(decided),
                    "pairs/gold_agreement": sum(c for c, _ in decided) / len(decided) if decided else float("nan")})
    log(f"judge: {time.time() - t2:.0f}s; responses: agreement with the verifier "
        f"{_fmt(summary['judge/responses_agreement'])}, unparseable {summary['judge/responses_unparseable']}; "
        f"pairs {summary['pairs/made']} (both orders agree {_fmt(pr.agreement_rate)}, unchanged {pr.unchanged})")

    asked = n + len(rev_idx) + (2 * (n - pr.unchanged - sum(f is None for f in finals))
                                if cfg.judge.pairs == "compare" else 0)
    unparsed = (sum(v is None for v in v_resp) + sum(v_rev[i] is None for i in rev_idx)
                + (pr.unparseable if cfg.judge.pairs == "compare" else 0))
    summary.update({"judge/answers": asked, "judge/unparseable_answers": unparsed})
    judge_failed = asked > 0 and unparsed == asked
    if unparsed and not judge_failed and unparsed >= asked / 2:
        log(f"warning: {unparsed} of the judge's {asked} answers did not parse ({cfg.judge.model}); only the rest "
            "label pairs. See the judge's answers in samples.jsonl; " + _JUDGE_FIX)

    # artefacts
    sft_records, pair_records = [], []
    for i, p in enumerate(items):
        prompt = _user_messages(p.prompt if p.prompt is not None else p.text)
        if finals[i] is not None and (cfg.select.sft == "all" or v_rev[i] is True):
            sft_records.append({"prompt": prompt, "completion": [{"role": "assistant", "content": finals[i]}]})
        if pr.pairs[i] is not None:
            pair_records.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": pr.pairs[i][0]}],
                                 "rejected": [{"role": "assistant", "content": pr.pairs[i][1]}]})
    write_on_main(_write_jsonl, out / "samples.jsonl", [
        {"prompt": p.text, "response": responses[i], "response_finished": rolls[i].finished, "rounds": history[i],
         "final": finals[i], "judge_response": v_resp[i], "judge_final": v_rev[i],
         "pair": None if pr.pairs[i] is None else ("revision" if pr.pairs[i][0] == finals[i] else "response"),
         "gold_response": gold_response[i], "gold_final": gold_final[i]} for i, p in enumerate(items)])
    write_on_main(_write_jsonl, out / "sft.jsonl", sft_records)
    write_on_main(_write_jsonl, out / "pairs.jsonl", pair_records)
    summary.update({"sft/records": len(sft_records), "pairs/records": len(pair_records)})
    log(f"wrote {out / 'samples.jsonl'}, {len(sft_records)} SFT records to {out / 'sft.jsonl'}, "
        f"{len(pair_records)} pairs to {out / 'pairs.jsonl'}")

    if judge_failed:
        write_on_main(_write_summary, out, summary)
        raise TrainingError(
            f"cai: none of the judge's {asked} answers parsed (judge.model={cfg.judge.model}; an answer must be "
            f"{'Yes or No for a score, A or B for a comparison' if cfg.judge.pairs == 'compare' else 'Yes or No'}), "
            f"so there are no AI labels: 0 pairs"
            f"{' and no judge_yes revisions' if cfg.select.sft == 'judge_yes' else ''}. The loop's artefacts are in "
            f"{out}.", fix=_JUDGE_FIX)

    final_dir = None
    after: dict = {}
    if cfg.select.train == "sft":
        if not sft_records:
            write_on_main(_write_summary, out, summary)
            raise TrainingError(
                f"cai: no final revision to fine-tune on ({counts}; select.sft={cfg.select.sft}). The loop's artefacts "
                f"are in {out}.", fix="check samples.jsonl: a reviser that answers nothing usable needs another "
                "revise.model (or more revise.revision_max_new_tokens); with select.sft=judge_yes, the judge "
                "accepted none; select.train=none writes the artefacts only.")
        del reviser, judge
        ds = load_records(sft_records, "prompt_completion")
        row_length = cfg.data.max_prompt_length + rv.revision_max_new_tokens
        examples, report = encode_dataset(ds, tokenizer, max_length=row_length, overlong="drop")
        log(f"SFT data: {report.summary()}")
        if not examples:
            raise DataError("cai: every SFT record was dropped when encoded.", fix="see the report above.")
        model = apply_peft(model, cfg.model.peft, log=log)
        plan = SFTPlan(examples, micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                       epochs=cfg.train.epochs, max_steps=cfg.train.max_steps, packing=True, row_length=row_length,
                       pad_token_id=tokenizer.pad_token_id, seed=cfg.train.seed)
        train_cfg = dataclasses.replace(cfg.train, overwrite_output_dir=True)
        log(f"SFT on {len(examples)} revisions, {plan.num_steps()} optimizer steps")
        res = fit(model, SFTAlgorithm(), plan, train_cfg, tokenizer=tokenizer, accelerator=accelerator,
                  run_config=dataclasses.asdict(cfg), log=log)
        summary.update({"sft/steps": res.steps, "sft/loss": res.history[-1].get("loss") if res.history else None})
        final_dir = out / "final" if (out / "final").is_dir() else None
        model.eval()
        after = evaluate(model)
        summary.update({f"after/{k}": v for k, v in after.items()})
    summary["seconds"] = time.time() - t0
    write_on_main(_write_summary, out, summary)
    table = summary_table(summary)
    log("\n" + table)
    return CAIResult(summary=summary, final_dir=final_dir, eval_metrics=after or before)


_JUDGE_FIX = ("use an instruct judge that answers in one word (judge.model; in the tiny world one trained with "
              "posttrain sft data.train=builtin:world-judge), give it room (judge.max_new_tokens; with "
              "judge.reasoning=true only the last line is parsed), or make judge.score_template / "
              "judge.compare_template ask for exactly that word.")


def _rate(flags: list[bool | None]) -> str:
    got = [f for f in flags if f is not None]
    return _fmt(sum(got) / len(got)) if got else "n/a"


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def summary_table(s: dict) -> str:
    """The loop's measurements as a markdown table (cai.md)."""
    def pct(k):
        v = s.get(k)
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"

    metric = next((k for k in s if k.startswith("before/eval_reward/")), None)
    rows = [
        ("responses the verifier accepts", pct("gold/response_accuracy"), f"n={s.get('gold/responses')}"),
        ("final revisions the verifier accepts", pct("gold/final_accuracy"), f"n={s.get('gold/finals')}"),
        ("judge agrees with the verifier (responses)", pct("judge/responses_agreement"),
         f"n={s.get('judge/responses_n')}, unparseable {s.get('judge/responses_unparseable')}"),
        ("judge agrees with the verifier (revisions)", pct("judge/revisions_agreement"),
         f"n={s.get('judge/revisions_n')}, unparseable {s.get('judge/revisions_unparseable')}"),
        ("revision success (wrong -> right)", pct("revise/success_rate"),
         f"{s.get('revise/fixed')} of {s.get('revise/wrong')}"),
        ("revision breakage (right -> wrong)", pct("revise/breakage_rate"),
         f"{s.get('revise/broken')} of {s.get('revise/right')}"),
        ("revisions that changed the response", str(s.get("revise/changed")),
         f"valid {s.get('revise/revised')}; cut {s.get('revise/revision_cut')}, empty {s.get('revise/revision_empty')},"
         f" too long {s.get('revise/too_long')}"),
        ("AI-labelled pairs (both orders agree)", str(s.get("pairs/made")),
         f"agreement {pct('pairs/agreement_rate')}, unchanged {s.get('pairs/unchanged')}, unparseable answers "
         f"{s.get('pairs/unparseable_answers')}") if s.get("pairs/mode", "compare") == "compare" else
        ("AI-labelled pairs (verdicts differ)", str(s.get("pairs/made")),
         f"same verdict {s.get('pairs/tied')}, unchanged {s.get('pairs/unchanged')}, without a verdict "
         f"{s.get('pairs/unparseable_answers')}"),
        ("pairs whose chosen side the verifier prefers", pct("pairs/gold_agreement"),
         f"of {s.get('pairs/gold_decided')} the verifier separates"),
        ("SFT records", str(s.get("sft/records")), ""),
    ]
    if metric:
        after = "after/" + metric[len("before/"):]
        rows.append(("held-out " + metric.split("/")[-1] + " before -> after SFT",
                     f"{pct(metric)} -> {pct(after)}" if after in s else pct(metric), ""))
    lines = ["| measure | value | detail |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _write_summary(out: Path, summary: dict) -> None:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    tmp = out / "cai.json.tmp"
    tmp.write_text(json.dumps(clean, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / "cai.json")
    (out / "cai.md").write_text(summary_table(summary) + "\n", encoding="utf-8")


__all__ = ["CAIConfig", "CAIResult", "PairResult", "ai_pairs", "revision_stats", "run_cai", "sample_principles",
           "score_pairs",
           "summary_table", "verdict_agreement"]
