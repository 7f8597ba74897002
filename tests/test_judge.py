"""The AI-feedback building blocks: strict judge parsing, both-order comparison, constitutions."""

from __future__ import annotations

import math

import pytest

from posttrain.errors import ConfigError, DataError
from posttrain.rewards.judge import (
    Judge,
    check_template,
    compare_both_orders,
    load_constitution,
    parse_choice,
    parse_verdict,
)

from .tiny import tiny_model, world_tokenizer


@pytest.mark.parametrize("text,want", [("A", "A"), (" b ", "B"), ("(A)", "A"), ("Answer: B.", "B"), ("a.", "A"),
                                       ("A or B", None), ("The answer is A", None), ("", None), ("AB", None),
                                       ("C", None), ("A\nB", None)])
def test_parse_choice_is_strict(text, want):
    assert parse_choice(text) == want


@pytest.mark.parametrize("text,want", [("Yes", True), ("no.", False), ("Answer: YES", True), (" No ", False),
                                       ("Yes, it does", None), ("maybe", None), ("", None), ("yesno", None)])
def test_parse_verdict_is_strict(text, want):
    assert parse_verdict(text) == want


def test_both_orders_cancel_position_bias_and_count_what_does_not_parse():
    prompts, xs, ys = ["q1", "q2", "q3", "q4"], ["x1", "x2", "x3", "x4"], ["y1", "y2", "y3", "y4"]

    def fair(questions):  # prefers the response whose text ends in "1" or that is y for the rest
        out = []
        for q in questions:
            a = q.split("Response A:\n")[1].split("\n")[0]
            b = q.split("Response B:\n")[1].split("\n")[0]
            good = {"x1", "y2", "y3", "x4"}
            out.append("A" if a in good else "B" if b in good else "?")
        return out

    c = compare_both_orders(fair, prompts, xs, ys, principle="be right")
    assert c.preferred == [0, 1, 1, 0] and c.agreed == 4 and c.inconsistent == 0 and c.agreement_rate == 1.0
    # a judge that always says A (pure position bias) agrees with itself on nothing
    c = compare_both_orders(lambda qs: ["A"] * len(qs), prompts, xs, ys, principle="p")
    assert c.preferred == [None] * 4 and c.inconsistent == 4 and c.agreement_rate == 0.0
    # unparseable answers are counted, never guessed
    c = compare_both_orders(lambda qs: ["A", "I think A", "B", "A", "B", "B", "A", "???"], prompts, xs, ys,
                            principle="p")
    # forward answers A / ? / B / A, swapped answers B / B / A / ?: pair 0 picks x in both orders, pair 2 y
    assert c.unparseable == 2 and c.preferred == [0, None, 1, None]
    assert c.agreed == 2 and c.inconsistent == 0 and c.agreement_rate == 1.0
    assert math.isnan(compare_both_orders(lambda qs: ["?"] * len(qs), ["q"], ["x"], ["y"], principle="p")
                      .agreement_rate)


def test_templates_must_use_exactly_their_fields():
    check_template("{principle} {prompt} {response}", {"principle", "prompt", "response"}, "judge.score_template")
    with pytest.raises(ConfigError, match=r"names the field\(s\) \['answer'\]"):
        check_template("{principle} {prompt} {response} {answer}", {"principle", "prompt", "response"}, "k")
    with pytest.raises(ConfigError, match=r"does not use \['response'\]"):
        check_template("{principle} {prompt}", {"principle", "prompt", "response"}, "k")


def test_a_judge_model_answers_through_the_chat_template():
    """Plumbing with a tiny random model: every question gets an answer; a random model's answers
    do not parse, and are counted as such."""
    judge = Judge(tiny_model("llama", hidden=32), world_tokenizer(), max_new_tokens=4)
    c = judge.compare(["2 + 2?"], ["4"], ["5"], principle="the arithmetic is right")
    assert len(c.answers) == 1 and c.unparseable + 2 * (c.agreed + c.inconsistent) == 2
    verdicts, bad = judge.score(["2 + 2?", "3 + 3?"], ["4", "7"], principle="the arithmetic is right")
    assert len(verdicts) == 2 and bad == sum(v is None for v in verdicts)


def test_constitution_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- name: arithmetic\n  critique_request: Which step's arithmetic is wrong?\n"
                 "  revision_request: Rewrite the solution with every step right.\n"
                 "- name: format\n  critique_request: Does it end with '#### N'?\n"
                 "  revision_request: End the solution with '#### N'.\n")
    cons = load_constitution(p)
    assert [c.name for c in cons] == ["arithmetic", "format"]
    p.write_text("principles:\n- name: a\n  critique_request: c\n")
    with pytest.raises(DataError, match=r"principle 0, field 'revision_request': missing"):
        load_constitution(p)
    p.write_text("- name: a\n  critique_request: c\n  revision_request: r\n  weight: 2\n")
    with pytest.raises(DataError, match=r"unknown field\(s\) \['weight'\]"):
        load_constitution(p)
    p.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(DataError, match="not valid YAML"):
        load_constitution(p)
    p.write_text("[]\n")
    with pytest.raises(DataError, match="non-empty list"):
        load_constitution(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_constitution(tmp_path / "missing.yaml")


def test_a_reasoning_judge_is_parsed_on_its_last_line_only():
    from posttrain.rewards.judge import final_line

    assert final_line("41 * 9 = 369\n#### 369\n\nYes\n") == "Yes"
    assert final_line("") == "" and final_line("  \n") == ""

    class Scripted(Judge):
        """The real ask() with the model's decoding replaced by scripted answers."""

        def __init__(self, answers, reasoning):
            super().__init__(tiny_model("llama", hidden=32), world_tokenizer(), max_new_tokens=4, reasoning=reasoning)
            self.scripted = answers

        def ask(self, questions):
            from posttrain.rollout import HFSampler, Rollout

            real = HFSampler.generate
            HFSampler.generate = lambda backend, reqs, sampling: [Rollout(i, [], [], [], a, True)
                                                                  for i, a in enumerate(self.scripted[:len(reqs)])]
            try:
                return super().ask(questions)
            finally:
                HFSampler.generate = real

    answers = ["7 + 5 = 12\n#### 12\nYes", "working\nmaybe", "No"]
    verdicts, bad = Scripted(answers, reasoning=True).score(["q"] * 3, ["r"] * 3, principle="p")
    assert verdicts == [True, None, False] and bad == 1
    # without reasoning the whole answer must be the word: working before it is unparseable
    verdicts, bad = Scripted(answers, reasoning=False).score(["q"] * 3, ["r"] * 3, principle="p")
    assert verdicts == [None, None, False] and bad == 2
    j = Scripted(["x\nA", "y\nB"], reasoning=True)
    c = j.compare(["q"], ["one"], ["two"], principle="p")
    assert c.preferred == [0] and j.last_answers == ["x\nA", "y\nB"]
