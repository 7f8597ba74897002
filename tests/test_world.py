"""The tiny world: generators, the split rule, and the grader."""

from fractions import Fraction

import pytest

from posttrain.world.grader import extract_answer, is_correct, is_format_compliant, parse_number
from posttrain.world.tasks import LEVELS, apply_op, generate_problems, split_of


def test_generation_is_deterministic_and_split_disjoint():
    a = generate_problems(300, seed=3, split="train")
    b = generate_problems(300, seed=3, split="train")
    assert [p.question for p in a] == [p.question for p in b]
    held = generate_problems(300, seed=3, split="heldout")
    assert not {p.question for p in a} & {p.question for p in held}
    assert all(split_of(p.question) == "heldout" for p in held)
    assert all(split_of(p.question) == "train" for p in a)


def test_heldout_fraction_is_about_ten_percent():
    import random

    from posttrain.world.tasks import make_problem

    rng = random.Random(0)
    qs = [make_problem(rng, level).question for level in LEVELS for _ in range(500)]
    frac = sum(split_of(q) == "heldout" for q in qs) / len(qs)
    assert 0.07 < frac < 0.13


@pytest.mark.parametrize("level", LEVELS)
def test_solutions_are_correct_chains(level):
    for p in generate_problems(100, seed=1, split="train", levels=(level,)):
        assert p.level == level
        n_steps = {1: 1, 2: 1, 3: 2, 4: 3}[level]
        assert len(p.steps) == n_steps
        for i, s in enumerate(p.steps):
            assert apply_op(s.a, s.op, s.b) == s.result
            assert 0 <= s.result <= 999
            if i > 0:  # every later step continues from the previous result
                assert s.a == p.steps[i - 1].result
        assert p.answer == p.steps[-1].result
        assert p.solution.splitlines()[-1] == f"#### {p.answer}"
        assert is_format_compliant(p.solution) and is_correct(p.solution, p.answer)
        assert str(p.steps[0].a) in p.question


def test_level_one_and_two_operators():
    ops1 = {p.steps[0].op for p in generate_problems(200, seed=0, levels=(1,))}
    ops2 = {p.steps[0].op for p in generate_problems(200, seed=0, levels=(2,))}
    assert ops1 == {"+", "-"} and ops2 == {"*", "/"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3 + 4 = 7\n#### 7", 7),
        ("so #### 1,234 done", 1234),
        ("first #### 5 then #### 6", 6),
        ("The result is \\boxed{42}.", 42),
        ("\\boxed{-3}", -3),
        ("The answer is 18.", 18),
        ("answer: 2.50", Fraction(5, 2)),
        ("I think 12 apples, maybe 13", 13),
        ("It is 42.0", 42),
        ("#### 12 but \\boxed{99}", 12),  # #### wins over boxed
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_parse_number_and_is_correct():
    assert parse_number("1,000") == 1000 and parse_number("-7") == -7 and parse_number("x") is None
    assert is_correct("#### 18", 18) and is_correct("#### 18", "18") and not is_correct("#### 17", 18)
    assert not is_correct("nothing", 3)


def test_format_compliance_is_strict():
    assert is_format_compliant("12 + 7 = 19\n#### 19", finished=True)
    assert not is_format_compliant("12 + 7 = 19\n#### 19", finished=False)  # ran out of tokens
    assert not is_format_compliant("#### 19")  # no working
    assert not is_format_compliant("12 + 7 = 19\nThe answer is 19")
    assert not is_format_compliant("so 12 + 7 = 19\n#### 19")


def test_the_shipped_student_is_a_1m_model_with_the_base_models_tokenizer():
    import json

    from posttrain.models.loading import BUILTIN_MODELS, load_causal_lm, load_tokenizer

    student = load_causal_lm("builtin:tiny-world-student", device="cpu")
    base_tok, student_tok = load_tokenizer("builtin:tiny-world-base"), load_tokenizer("builtin:tiny-world-student")
    assert 0.9e6 < sum(p.numel() for p in student.parameters()) < 1.1e6
    assert student_tok.get_vocab() == base_tok.get_vocab() and student_tok.chat_template == base_tok.chat_template
    assert student.config.vocab_size == load_causal_lm("builtin:tiny-world-base", device="cpu").config.vocab_size
    report = json.loads((BUILTIN_MODELS["tiny-world-student"] / "world_build.json").read_text())
    assert report["size"] == "student" and report["tokenizer"] == "builtin:tiny-world-base"
    total = sum(f.stat().st_size for d in BUILTIN_MODELS.values() for f in d.iterdir())
    assert total < 25 * 2**20   # the shipped assets stay within 25 MB
