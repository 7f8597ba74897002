"""Constitutional AI: the world's judge/reviser data by hand, the loop's bookkeeping against oracle
roles (every number recomputed independently), a stored short curve, the command line on tiny
random Llama and Qwen2 with the instruct templates, bad input."""

from __future__ import annotations

import json
import math
import re

import pytest

from posttrain.algorithms.cai import (
    CAIConfig,
    ai_pairs,
    revision_stats,
    run_cai,
    sample_principles,
    verdict_agreement,
)
from posttrain.cli import main
from posttrain.config import load_config
from posttrain.errors import ConfigError, DataError, TrainingError
from posttrain.rewards.judge import Comparison, Judge, Principle
from posttrain.world.feedback import load_constitution
from posttrain.rollout.sampler import Rollout
from posttrain.world import feedback as fb
from posttrain.world.grader import is_correct
from posttrain.world.tasks import Problem, Step, generate_problems

from .tiny import tiny_model, world_tokenizer

P2 = Problem(question="Ann has 7 pens. She buys 5 more. Then she gives away 3. How many pens does she have?",
             steps=(Step(7, "+", 5, 12), Step(12, "-", 3, 9)), level=2)


# --------------------------------------------------------------------------- the world's feedback data


def test_world_critiques_and_revisions_by_hand():
    slipped = "7 + 5 = 13\n13 - 3 = 10\n#### 10"
    assert fb.first_wrong_step(P2, slipped) == 0
    assert fb.critique("arithmetic", P2, slipped) == "Step 1 is wrong."
    assert fb.revision("arithmetic", P2, slipped) == P2.solution
    assert not fb.follows("arithmetic", P2, slipped) and fb.follows("answer-line", P2, slipped)
    second = "7 + 5 = 12\n12 - 3 = 8\n#### 8"
    assert fb.critique("arithmetic", P2, second) == "Step 2 is wrong."
    # no answer line: arithmetic keeps it absent; answer-line adds the last step's result
    bare = "7 + 5 = 12\n12 - 3 = 8"
    assert fb.revision("arithmetic", P2, bare) == "7 + 5 = 12\n12 - 3 = 9"
    assert fb.critique("answer-line", P2, bare) == "The answer line is missing."
    assert fb.revision("answer-line", P2, bare) == "7 + 5 = 12\n12 - 3 = 8\n#### 8"
    assert fb.critique("answer-line", P2, P2.solution) == "The answer line is there."
    assert fb.revision("answer-line", P2, P2.solution) == P2.solution
    assert fb.critique("arithmetic", P2, P2.solution) == "Every step is right."
    # a missing step is wrong at the first missing position
    assert fb.first_wrong_step(P2, "7 + 5 = 12\n#### 12") == 1


def test_judge_records_answer_by_the_gold_principle():
    recs = fb.judge_records(300, seed=3)
    probs = {p.question: p for p in generate_problems(300, seed=3 + 6000, split="train")}
    statements = {p.principle: p.name for p in fb.WORLD_CONSTITUTION}
    score = re.compile(r"Principle: (.*)\n\nQuestion:\n(.*)\n\nResponse:\n(.*)\n\nDoes", re.S)
    compare = re.compile(r"Principle: (.*)\n\nQuestion:\n(.*)\n\nResponse A:\n(.*)\n\nResponse B:\n(.*)\n\nWhich", re.S)
    kinds = {"Yes": 0, "No": 0, "A": 0, "B": 0}
    for r in recs:
        q, ans = r["prompt"][0]["content"], r["completion"][0]["content"]
        kinds[ans] += 1
        if ans in ("Yes", "No"):
            pr, question, resp = score.match(q).groups()
            assert fb.follows(statements[pr], probs[question], resp) == (ans == "Yes")
        else:
            pr, question, a, b = compare.match(q).groups()
            good, bad = (a, b) if ans == "A" else (b, a)
            assert fb.follows(statements[pr], probs[question], good)
            assert not fb.follows(statements[pr], probs[question], bad)
    assert all(v > 40 for v in kinds.values()), kinds   # both tasks, both answers, both positions


def test_reasoning_judge_records_write_the_worked_solution_before_the_answer():
    probs = {p.question: p for p in generate_problems(60, seed=2 + 6000, split="train")}
    plain = fb.judge_records(60, seed=2)
    reasoning = fb.judge_records(60, seed=2, reasoning=True)
    assert len(plain) == len(reasoning)
    for a, b in zip(plain, reasoning):
        answer = a["completion"][0]["content"]
        question = re.search(r"Question:\n(.*?)\n\nRespons", b["prompt"][0]["content"], re.S).group(1)
        assert b["completion"][0]["content"] == probs[question].solution + "\n" + answer
        assert "on the last line" in b["prompt"][0]["content"] and "on the last line" not in a["prompt"][0]["content"]


def test_revise_records_train_only_the_revisers_turns():
    recs = fb.revise_records(50, seed=1)
    assert len(recs) == 100
    for crit, rev in zip(recs[::2], recs[1::2]):
        assert [m["role"] for m in crit["prompt"]] == ["user", "assistant", "user"]
        assert rev["prompt"][:3] == crit["prompt"] and rev["prompt"][3] == crit["completion"][0]
        principle = next(p for p in fb.WORLD_CONSTITUTION if p.critique_request == crit["prompt"][2]["content"])
        assert rev["prompt"][4]["content"] == principle.revision_request


def test_world_constitution_loads_and_yaml_principles_may_carry_a_statement(tmp_path):
    world = load_constitution("builtin:world")
    assert [p.name for p in world] == ["arithmetic", "answer-line"]
    assert world[0].statement == "Every step of the solution is right."
    f = tmp_path / "c.yaml"
    f.write_text("- name: a\n  critique_request: What is wrong?\n  revision_request: Fix it.\n"
                 "- {name: b, critique_request: c2, revision_request: r2, principle: be kind}\n")
    a, b = load_constitution(f)
    assert a.statement == "What is wrong?" and b.statement == "be kind"
    f.write_text("- {name: a, critique_request: c, revision_request: r}\n- {name: a, critique_request: c, revision_request: r}\n")
    with pytest.raises(DataError, match=r"\['a'\] appear more than once"):
        load_constitution(f)
    f.write_text("- {name: a, critique_request: c, revision_request: r, principle: ''}\n")
    with pytest.raises(DataError, match="principle 0, field 'principle': missing or empty"):
        load_constitution(f)
    with pytest.raises(ConfigError, match="Unknown built-in constitution"):
        load_constitution("builtin:nope")


# --------------------------------------------------------------------------- pure parts by hand


def test_ai_pairs_skip_unchanged_and_count_disagreement():
    P = [Principle("x", "c", "r"), Principle("y", "c", "r", principle="be y")]
    calls = []

    def compare(prompts, xs, ys, *, principle):
        calls.append((principle, list(xs)))
        # per pair: prefer y, prefer x, inconsistent, unparseable
        preferred = [{"o1": 1, "o2": 0}.get(x) for x in xs]
        return Comparison(preferred=preferred, agreed=sum(p is not None for p in preferred),
                          inconsistent=sum(x == "o3" for x in xs), unparseable=2 * sum(x == "o4" for x in xs))

    res = ai_pairs(compare, ["q"] * 6, ["o1", "o2", "o3", "o4", "same", "o6"], ["r1", "r2", "r3", "r4", "same ", None],
                   [P[0], P[1], P[0], P[1], P[0], P[0]])
    assert res.pairs == [("r1", "o1"), ("o2", "r2"), None, None, None, None]
    assert (res.unchanged, res.agreed, res.inconsistent, res.unparseable) == (1, 2, 1, 2)
    assert res.agreement_rate == pytest.approx(2 / 3)
    # one call per principle, with the principle's statement
    assert sorted(calls) == [("be y", ["o2", "o4"]), ("c", ["o1", "o3"])]


def test_score_pairs_label_a_pair_only_when_the_verdicts_differ():
    from posttrain.algorithms.cai import score_pairs

    res = score_pairs(["o1", "o2", "o3", "o4", "same", "o6"], ["r1", "r2", "r3", "r4", "same", None],
                      [False, True, True, None, False, False], [True, False, True, True, True, True])
    assert res.pairs == [("r1", "o1"), ("o2", "r2"), None, None, None, None]
    assert (res.agreed, res.tied, res.unparseable, res.unchanged) == (2, 1, 1, 1)


def test_revision_and_verdict_statistics_by_hand():
    s = revision_stats([False, False, True, True, True, None, False], [True, False, True, False, True, True, None])
    assert (s["wrong"], s["fixed"], s["right"], s["broken"]) == (2, 1, 3, 1)
    assert s["success_rate"] == 0.5 and s["breakage_rate"] == pytest.approx(1 / 3)
    v = verdict_agreement([True, False, None, True], [True, True, False, None])
    assert v == {"n": 2, "agreement": 0.5, "yes_rate": pytest.approx(2 / 3), "unparseable": 1}
    assert math.isnan(revision_stats([], [])["success_rate"])


def test_principles_are_sampled_per_round_reproducibly():
    c = list(fb.WORLD_CONSTITUTION)
    a = sample_principles(400, c, seed=0, round_=1)
    assert a == sample_principles(400, c, seed=0, round_=1) != sample_principles(400, c, seed=0, round_=2)
    assert 150 < sum(p.name == "arithmetic" for p in a) < 250


# --------------------------------------------------------------------------- the loop with oracle roles


class OracleReviser:
    """The world's gold critique / revision (from the conversation's question and response)."""

    def __init__(self, problems):
        self.problems = {p.question: p for p in problems}
        self.calls = 0

    def reply(self, conversations, *, max_new_tokens, temperature, seed):
        out = []
        for i, c in enumerate(conversations):
            p = self.problems[c[0]["content"]]
            pr = next(x for x in fb.WORLD_CONSTITUTION if x.critique_request == c[2]["content"])
            text = fb.critique(pr.name, p, c[1]["content"]) if len(c) == 3 else fb.revision(pr.name, p, c[1]["content"])
            out.append(Rollout(i, [], [], [], text, True))
        self.calls += 1
        return out


class OracleJudge(Judge):
    """The real Judge (templates, strict parsing, both orders) over an oracle that answers by the
    world's gold principle; ``bias`` answers every comparison 'A' (position bias)."""

    def __init__(self, problems, bias=False):
        super().__init__(model=None, tokenizer=None)
        self.problems = {p.question: p for p in problems}
        self.names = {p.principle: p.name for p in fb.WORLD_CONSTITUTION}
        self.bias = bias

    def ask(self, questions):
        answers = []
        for q in questions:
            m = re.match(r"Principle: (.*)\n\nQuestion:\n(.*)\n\nResponse A:\n(.*)\n\nResponse B:\n(.*)\n\nWhich", q, re.S)
            if m:
                name, p = self.names[m.group(1)], self.problems[m.group(2)]
                a_ok, b_ok = fb.follows(name, p, m.group(3)), fb.follows(name, p, m.group(4))
                answers.append("A" if self.bias or (a_ok and not b_ok) else "B" if b_ok and not a_ok else "maybe")
                continue
            m = re.match(r"Principle: (.*)\n\nQuestion:\n(.*)\n\nResponse:\n(.*)\n\nDoes", q, re.S)
            answers.append("Yes." if fb.follows(self.names[m.group(1)], self.problems[m.group(2)], m.group(3)) else "no")
        return answers


def _cfg(out, **overrides) -> CAIConfig:
    base = {"train.output_dir": str(out), "train.progress": False, "train.lr": 1e-3, "train.micro_batch_size": 4,
            "data.world_examples": 40, "data.world_eval_examples": 6, "sampling.prompts": 24,
            "sampling.max_new_tokens": 16, "sampling.eval_max_new_tokens": 8, "revise.rounds": 2}
    base.update(overrides)
    return load_config(CAIConfig, None, [f"{k}={v}" for k, v in base.items()])


def _oracle_run(out, arch="llama", bias=False, **overrides):
    problems = generate_problems(40, seed=0, split="train")
    return run_cai(_cfg(out, **overrides), model=tiny_model(arch, seed=0, hidden=32), tokenizer=world_tokenizer(),
                   log=lambda s: None, reviser=OracleReviser(problems), judge=OracleJudge(problems, bias=bias))


def _jsonl(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


# the SFT stage's losses on the oracle's revisions (regenerate with _oracle_run(tmp / "r"))
STORED_LOSS = 5.945505


def test_loop_bookkeeping_equals_an_independent_recount(tmp_path):
    res = _oracle_run(tmp_path / "r")
    s = res.summary
    problems = {p.question: p for p in generate_problems(40, seed=0, split="train")}
    samples = _jsonl(tmp_path / "r" / "samples.jsonl")
    assert len(samples) == 24 == s["revise/revised"]
    p1 = sample_principles(24, list(fb.WORLD_CONSTITUTION), seed=0, round_=1)
    p2 = sample_principles(24, list(fb.WORLD_CONSTITUTION), seed=0, round_=2)
    fixed = wrong = broken = right = yes_ok = ties = 0
    for rec, a, b in zip(samples, p1, p2):
        p = problems[rec["prompt"]]
        r1 = fb.revision(a.name, p, rec["response"])
        r2 = fb.revision(b.name, p, r1)
        assert [x["principle"] for x in rec["rounds"]] == [a.name, b.name]
        assert rec["rounds"][0]["critique"] == fb.critique(a.name, p, rec["response"])
        assert rec["rounds"][1]["revision"] == r2 == rec["final"]
        before, after = is_correct(rec["response"], p.answer), is_correct(r2, p.answer)
        assert (rec["gold_response"], rec["gold_final"]) == (before, after)
        wrong += not before
        fixed += (not before) and after
        right += before
        broken += before and not after
        verdict = fb.follows("arithmetic", p, rec["response"])
        assert rec["judge_response"] is verdict
        yes_ok += verdict == before
        # the pair: the side following round 2's principle is chosen; ties are unlabelled
        same = rec["response"].strip() == r2.strip()
        ok_r, ok_f = fb.follows(b.name, p, rec["response"]), fb.follows(b.name, p, r2)
        expected = None if same or ok_r == ok_f else ("revision" if ok_f else "response")
        ties += not same and ok_r == ok_f   # the oracle answers "maybe" in both orders: unparseable
        assert rec["pair"] == expected
    assert (s["revise/wrong"], s["revise/fixed"], s["revise/right"], s["revise/broken"]) == (wrong, fixed, right, broken)
    assert s["judge/responses_agreement"] == pytest.approx(yes_ok / 24)
    assert s["judge/responses_unparseable"] == 0 and s["pairs/unparseable_answers"] == 2 * ties
    # a random model's responses are wrong: the oracle reviser fixes those sampled under arithmetic
    assert wrong >= 20 and fixed > 0
    pairs = _jsonl(tmp_path / "r" / "pairs.jsonl")
    assert len(pairs) == s["pairs/made"] == sum(r["pair"] is not None for r in samples)
    assert s["pairs/agreement_rate"] == 1.0 and s["pairs/gold_agreement"] == 1.0
    sft = _jsonl(tmp_path / "r" / "sft.jsonl")
    assert [r["completion"][0]["content"] for r in sft] == [r["final"] for r in samples]
    assert sft[0]["prompt"][0]["role"] == "user"
    # the SFT stage ran on those revisions, and its loss matches the stored value
    assert s["sft/loss"] == pytest.approx(STORED_LOSS, rel=1e-4)
    assert res.final_dir == tmp_path / "r" / "final" and "after/eval_reward/world_correct" in s
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(res.final_dir).config.model_type == "llama"
    saved = json.loads((tmp_path / "r" / "cai.json").read_text())
    assert saved["revise/fixed"] == fixed and "| revision success (wrong -> right) |" in (tmp_path / "r" / "cai.md").read_text()


def test_a_position_biased_judge_labels_no_pair_and_judge_yes_filters_sft(tmp_path):
    res = _oracle_run(tmp_path / "r", bias=True, **{"select.sft": "judge_yes", "select.train": "none"})
    s = res.summary
    assert s["pairs/made"] == 0 and s["pairs/inconsistent"] > 0 and s["pairs/agreement_rate"] == 0.0
    samples = _jsonl(tmp_path / "r" / "samples.jsonl")
    sft = _jsonl(tmp_path / "r" / "sft.jsonl")
    assert [r["completion"][0]["content"] for r in sft] == [r["final"] for r in samples if r["judge_final"]]
    assert res.final_dir is None and not (tmp_path / "r" / "final").exists()


def test_score_mode_pairs_follow_the_judges_verdicts(tmp_path):
    res = _oracle_run(tmp_path / "r", **{"judge.pairs": "score", "select.train": "none"})
    problems = {p.question: p for p in generate_problems(40, seed=0, split="train")}
    made = 0
    for rec in _jsonl(tmp_path / "r" / "samples.jsonl"):
        p = problems[rec["prompt"]]
        ok_r, ok_f = fb.follows("arithmetic", p, rec["response"]), fb.follows("arithmetic", p, rec["final"])
        changed = rec["response"].strip() != rec["final"].strip()
        expected = None if not changed or ok_r == ok_f else ("revision" if ok_f else "response")
        assert (rec["judge_response"], rec["judge_final"]) == (ok_r, ok_f) and rec["pair"] == expected
        made += expected is not None
    assert res.summary["pairs/made"] == made > 0 and res.summary["pairs/mode"] == "score"
    assert "| AI-labelled pairs (verdicts differ) |" in (tmp_path / "r" / "cai.md").read_text()


def test_no_usable_revision_stops_with_a_clear_error_after_writing_the_artefacts(tmp_path):
    class Mute:
        def reply(self, conversations, **_):
            return [Rollout(i, [], [], [], "", True) for i in range(len(conversations))]

    problems = generate_problems(40, seed=0, split="train")
    with pytest.raises(TrainingError, match="no final revision to fine-tune on"):
        run_cai(_cfg(tmp_path / "r"), model=tiny_model("llama", seed=0, hidden=32), tokenizer=world_tokenizer(),
                log=lambda s: None, reviser=Mute(), judge=OracleJudge(problems))
    s = json.loads((tmp_path / "r" / "cai.json").read_text())
    assert s["revise/revision_empty"] == 48 and s["sft/records"] == 0
    assert (tmp_path / "r" / "sft.jsonl").read_text() == "" and not (tmp_path / "r" / "final").exists()


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="revise.rounds"):
        load_config(CAIConfig, None, ["revise.rounds=4"])
    with pytest.raises(ConfigError, match="cai does not resume"):
        load_config(CAIConfig, None, ["train.resume=auto"])
    with pytest.raises(ConfigError, match="select.sft"):
        load_config(CAIConfig, None, ["select.sft=best"])
    with pytest.raises(ConfigError, match="a reasoning judge needs room"):
        load_config(CAIConfig, None, ["judge.reasoning=true"])
    with pytest.raises(ConfigError, match=r"judge.score_template names the field\(s\) \['answer'\]"):
        run_cai(_cfg(tmp_path / "r", **{"judge.score_template": "'{principle} {prompt} {response} {answer}'"}),
                model=tiny_model("llama", seed=0, hidden=32), tokenizer=world_tokenizer(), log=lambda s: None)
    with pytest.raises(ConfigError, match="judge.score_principle='kindness' is not a principle"):
        run_cai(_cfg(tmp_path / "r2", **{"judge.score_principle": "kindness"}),
                model=tiny_model("llama", seed=0, hidden=32), tokenizer=world_tokenizer(), log=lambda s: None)


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cai_runs_from_the_command_line_with_the_instruct_templates(capsys, model_dirs, tmp_path, arch):
    """A tiny random model as policy, reviser and judge with the default (instruct-model)
    templates and a YAML constitution: plumbing only. Its judge answers never parse: they are
    counted, the artefacts are written, and the run stops with the reason (no AI labels at all)."""
    const = tmp_path / "constitution.yaml"
    const.write_text("- name: harmless\n  critique_request: Identify anything harmful in your last response.\n"
                     "  revision_request: Rewrite the response to remove anything harmful.\n"
                     "  principle: The response is harmless.\n")
    out = tmp_path / "run"
    code = main(["cai", f"model.name_or_path={model_dirs[arch]}", f"revise.model={model_dirs[arch]}",
                 f"judge.model={model_dirs[arch]}", f"constitution={const}", f"train.output_dir={out}",
                 "train.progress=false", "data.world_examples=20", "data.world_eval_examples=4", "sampling.prompts=4",
                 "sampling.max_new_tokens=6", "revise.critique_max_new_tokens=4", "revise.revision_max_new_tokens=6",
                 "revise.temperature=1.0", "judge.max_new_tokens=2", "select.train=none"])
    printed = capsys.readouterr()
    assert code == 2, printed.err
    s = json.loads((out / "cai.json").read_text())
    assert f"none of the judge's {s['judge/answers']} answers parsed" in printed.err and "judge.model" in printed.err
    assert s["judge/unparseable_answers"] == s["judge/answers"] >= 4 and s["pairs/made"] == 0
    samples = _jsonl(out / "samples.jsonl")
    assert len(samples) == 4 and all(len(r["rounds"]) == 1 for r in samples)
    assert s["judge/responses_unparseable"] + s["judge/responses_n"] == 4
    cut = s["revise/revision_cut"]
    assert cut + s["revise/revision_empty"] + s["revise/revised"] == 4
    assert len(_jsonl(out / "sft.jsonl")) == s["revise/revised"]


def test_cai_with_the_world_base_model_in_every_role_counts_what_it_cannot_use(tmp_path):
    """The shipped base model as policy, reviser and judge (the paper's setting, untrained): the
    loop runs end to end and every unusable answer is counted (its revisions run past the token
    limit, its judge answers do not parse), nothing is trained on, and the run stops saying the
    judge gave no label."""
    with pytest.raises(TrainingError, match="none of the judge's 8 answers parsed"):
        run_cai(_cfg(tmp_path / "r", **{"sampling.prompts": 8, "revise.rounds": 1, "select.train": "none",
                                        "revise.revision_max_new_tokens": 16}), log=lambda s: None)
    s = json.loads((tmp_path / "r" / "cai.json").read_text())
    assert s["judge/responses_unparseable"] + s["judge/responses_n"] == 8
    assert s["revise/revision_cut"] + s["revise/revision_empty"] + s["revise/revised"] + s["revise/too_long"] == 8
    assert len(_jsonl(tmp_path / "r" / "sft.jsonl")) == s["sft/records"] == s["revise/revised"]
    assert not (tmp_path / "r" / "final").exists()


class MostlyMuteJudge(OracleJudge):
    """The oracle's answer to every third question, an unparseable one to the others."""

    def ask(self, questions):
        real = super().ask(questions)
        return [a if i % 3 == 0 else "hmm" for i, a in enumerate(real)]


def test_a_judge_whose_answers_mostly_do_not_parse_warns_and_counts_them(tmp_path):
    problems = generate_problems(40, seed=0, split="train")
    lines = []
    res = run_cai(_cfg(tmp_path / "r", **{"select.train": "none"}), model=tiny_model("llama", seed=0, hidden=32),
                  tokenizer=world_tokenizer(), log=lines.append, reviser=OracleReviser(problems),
                  judge=MostlyMuteJudge(problems))
    s = res.summary
    # 24 responses and 24 revisions scored, each changed pair compared in both orders
    changed = 24 - s["pairs/unchanged"]
    assert s["judge/answers"] == 48 + 2 * changed
    assert s["judge/unparseable_answers"] == (s["judge/responses_unparseable"] + s["judge/revisions_unparseable"]
                                              + s["pairs/unparseable_answers"])
    assert s["judge/unparseable_answers"] >= s["judge/answers"] / 2
    warned = [ln for ln in lines if ln.startswith("warning:") and "answers did not parse" in ln]
    assert len(warned) == 1 and f"{s['judge/unparseable_answers']} of the judge's {s['judge/answers']}" in warned[0]
    # the oracle's own answers (no unparseable score) warn about nothing
    lines.clear()
    run_cai(_cfg(tmp_path / "r2", **{"select.train": "none", "judge.pairs": "score"}),
            model=tiny_model("llama", seed=0, hidden=32), tokenizer=world_tokenizer(), log=lines.append,
            reviser=OracleReviser(problems), judge=OracleJudge(problems))
    assert not [ln for ln in lines if "did not parse" in ln]
