"""The pure parts of the CAI loop: principles, AI-labelled pairs, the loop's measurements and its
report files."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path


from ...rewards.judge import Comparison, Principle

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



def rate(flags: list[bool | None]) -> str:
    got = [f for f in flags if f is not None]
    return fmt(sum(got) / len(got)) if got else "n/a"


def fmt(x) -> str:
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


def write_summary(out: Path, summary: dict) -> None:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    tmp = out / "cai.json.tmp"
    tmp.write_text(json.dumps(clean, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / "cai.json")
    (out / "cai.md").write_text(summary_table(summary) + "\n", encoding="utf-8")


