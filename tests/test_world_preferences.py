"""The tiny world's preference data: plausible one-slip wrong answers, labels and scored K-sets."""

import random

from posttrain.data import load_records
from posttrain.world.grader import extract_answer, is_correct, is_format_compliant
from posttrain.world.preferences import (
    SLIP_KINDS,
    preference_records,
    ranked_records,
    score_solution,
    slipped_solution,
    unpaired_records,
)
from posttrain.world.tasks import Step, generate_problems, split_of


def _question(r):
    return r["prompt"][0]["content"]


def test_pairs_are_correct_vs_one_slip_and_respect_the_split():
    recs = preference_records(200, seed=0)
    assert load_records(recs).format == "preference"
    for r in recs:
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert chosen != rejected
        assert is_format_compliant(chosen) and is_format_compliant(rejected)  # the slip is plausible: same format
        assert extract_answer(chosen) != extract_answer(rejected)
        assert split_of(_question(r)) == "train"
        # exactly one line differs at the first slip; lines before it agree
        c, w = chosen.splitlines(), rejected.splitlines()
        assert len(c) == len(w)
    held = preference_records(50, seed=0, split="heldout")
    assert all(split_of(_question(r)) == "heldout" for r in held)


def test_slip_kinds_by_hand():
    p = next(q for q in generate_problems(50, seed=3, levels=(3,)) if q.steps[0].op == "+")
    rng = random.Random(0)
    for kind in SLIP_KINDS:
        text = slipped_solution(p, rng, kind)
        if text is None:
            continue
        lines = text.splitlines()
        steps = [ln for ln in lines if not ln.startswith("####")]
        # every step line is internally consistent arithmetic except (for 'arith') the slipped one,
        # and later steps continue from the (wrong) running value
        for a, b in zip(steps, steps[1:]):
            assert b.split(" ")[0] == a.split(" = ")[1]
        assert lines[-1] == f"#### {steps[-1].split(' = ')[1]}"
        assert not is_correct(text, p.answer)


def test_score_solution_partial_credit():
    p = next(q for q in generate_problems(50, seed=1, levels=(4,)))
    assert score_solution(p, p.solution) == 1.0
    lines = p.solution.splitlines()
    first = p.steps[0]
    wrong_first = Step(first.a, first.op, first.b, first.result + 1).text()
    # a wrong final answer with no correct leading step scores 0
    assert score_solution(p, "\n".join([wrong_first] + lines[1:-1] + ["#### 999"])) == 0.0
    # the grade is on the final answer: a slip that does not change it still counts as correct
    assert score_solution(p, "\n".join([wrong_first] + lines[1:])) == 1.0
    wrong_last = lines[:2] + ["1 + 1 = 3", "#### 3"]
    assert score_solution(p, "\n".join(wrong_last)) == 0.5 * 2 / 3


def test_unpaired_labels_match_correctness():
    recs = unpaired_records(100, seed=0)
    assert load_records(recs).format == "unpaired"
    problems = {p.question: p for p in generate_problems(100, seed=2000, split="train")}
    for r in recs:
        p = problems[_question(r)]
        assert r["label"] == is_correct(r["completion"][0]["content"], p.answer)
    assert 0.3 < sum(r["label"] for r in recs) / len(recs) < 0.7


def test_ranked_sets_are_scored_and_contain_the_solution():
    recs = ranked_records(60, k=4, seed=0)
    assert load_records(recs).format == "ranked"
    problems = {p.question: p for p in generate_problems(60, seed=3000, split="train")}
    for r in recs:
        p = problems[_question(r)]
        texts = [x[0]["content"] for x in r["responses"]]
        assert len(texts) == 4 and p.solution in texts
        assert r["rewards"] == [score_solution(p, t) for t in texts]
        assert r["rewards"].count(1.0) == 1
