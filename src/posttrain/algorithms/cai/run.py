"""The CAI loop: sample, critique and revise, label pairs, measure, optionally fine-tune."""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path


from ...config import validated
from ...data.formats import load_records, write_jsonl
from ...data.tokenize import encode_dataset
from ...errors import ConfigError, DataError, TrainingError
from ...models.loading import load_causal_lm, load_tokenizer, read_paths
from ...models.peft import apply_peft
from ...rewards import check_reward_fields
from ...rewards.judge import (
    DEFAULT_COMPARE_TEMPLATE,
    DEFAULT_SCORE_TEMPLATE,
    REASONING_COMPARE_TEMPLATE,
    REASONING_SCORE_TEMPLATE,
    Judge,
    Principle,
    chat_replies,
)
from ...rollout import Rollout, SamplingParams, backend_for, requests
from ...train.engine import fit
from ...train.plan import write_on_main
from ...train.rundir import check_output_dir
from ...world.feedback import load_constitution
from ..online import RewardConfig, build_rewards, epoch_order_indices, evaluate_prompts, load_prompt_sets, score_rollouts
from ..sft import SFTAlgorithm, SFTPlan
from ..online.setup import sampling_policy
from .config import POLICY, CAIConfig
from .measures import (
    ai_pairs,
    fmt,
    rate,
    revision_stats,
    sample_principles,
    score_pairs,
    summary_table,
    verdict_agreement,
    write_summary,
)
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
    s, rv = cfg.sampling, cfg.revise
    accelerator, tokenizer, model = sampling_policy(cfg, model=model, tokenizer=tokenizer,
                                                   max_new_tokens=s.max_new_tokens, new_tokens_key="sampling.max_new_tokens")
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
    backend = backend_for(s, model, tokenizer, key="sampling.backend", batch_size=s.batch_size,
                          max_model_len=max((len(p.ids) for p in items), default=1) + s.max_new_tokens)
    rolls = backend.generate(
        requests([p.ids for p in items]),
        SamplingParams(s.max_new_tokens, s.temperature, s.top_p,
                       seed=random.Random(f"cai-sample-{cfg.train.seed}").getrandbits(62)))
    responses = [r.text for r in rolls]
    gold_response = gold(items, responses, [r.finished for r in rolls])
    log(f"responses: {n} sampled in {time.time() - t0:.0f}s"
        + (f"; verifier accuracy {rate(gold_response)}" if verifier else ""))

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
        f"{fmt(summary['judge/responses_agreement'])}, unparseable {summary['judge/responses_unparseable']}; "
        f"pairs {summary['pairs/made']} (both orders agree {fmt(pr.agreement_rate)}, unchanged {pr.unchanged})")

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
    write_on_main(write_jsonl, out / "samples.jsonl", [
        {"prompt": p.text, "response": responses[i], "response_finished": rolls[i].finished, "rounds": history[i],
         "final": finals[i], "judge_response": v_resp[i], "judge_final": v_rev[i],
         "pair": None if pr.pairs[i] is None else ("revision" if pr.pairs[i][0] == finals[i] else "response"),
         "gold_response": gold_response[i], "gold_final": gold_final[i]} for i, p in enumerate(items)])
    write_on_main(write_jsonl, out / "sft.jsonl", sft_records)
    write_on_main(write_jsonl, out / "pairs.jsonl", pair_records)
    summary.update({"sft/records": len(sft_records), "pairs/records": len(pair_records)})
    log(f"wrote {out / 'samples.jsonl'}, {len(sft_records)} SFT records to {out / 'sft.jsonl'}, "
        f"{len(pair_records)} pairs to {out / 'pairs.jsonl'}")

    if judge_failed:
        write_on_main(write_summary, out, summary)
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
            write_on_main(write_summary, out, summary)
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
    write_on_main(write_summary, out, summary)
    table = summary_table(summary)
    log("\n" + table)
    return CAIResult(summary=summary, final_dir=final_dir, eval_metrics=after or before)



_JUDGE_FIX = ("use an instruct judge that answers in one word (judge.model; in the tiny world one trained with "
              "posttrain sft data.train=builtin:world-judge), give it room (judge.max_new_tokens; with "
              "judge.reasoning=true only the last line is parsed), or make judge.score_template / "
              "judge.compare_template ask for exactly that word.")
