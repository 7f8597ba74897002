"""Simulated users of the tiny world (posttrain.envs.users) and their data (posttrain.world.pieces):
exact messages, per-turn rewards and done flags of hand-driven episodes, the turn counts of the
training and held-out users, retry costs and the attempts limit, and the pieces / SFT records."""

from __future__ import annotations

import re

import pytest

from posttrain.envs import load_environment
from posttrain.envs.base import AssistantTurn, check_messages, check_step
from posttrain.envs.users import HeldoutPiecesEnv, PiecesEnv, RetryEnv, USER_ENVIRONMENTS
from posttrain.errors import ConfigError
from posttrain.rewards.answers import world_correct_reward
from posttrain.world.pieces import (piece_replies, pieces_record, pieces_records, pieces_sft_record,
                                    pieces_sft_records, split_pieces)
from posttrain.world.sources import builtin_records
from posttrain.world.tasks import Problem, Step, apply_op, generate_problems, split_of

Q4 = ("Iris has 57 candles. She sells 29 candles. She puts them into 4 equal groups and keeps one group. "
      "She loses 3 of them. How many candles are left with Iris?")
P4 = Problem(Q4, (Step(57, "-", 29, 28), Step(28, "/", 4, 7), Step(7, "-", 3, 4)), 4)
REC4 = {"prompt": [{"role": "user", "content": "Iris has 57 candles."}], "answer": "4", "level": 4,
        "pieces": ["She sells 29 candles.", "She puts them into 4 equal groups and keeps one group.",
                   "She loses 3 of them.", "How many candles are left with Iris?"]}


def turn(text, i):
    return AssistantTurn(text=text, tool_calls=[], malformed=[], finished=True, index=i)


def drive(env, record, replies):
    """A hand-driven episode: the transcript (opening, then each reply and the env's messages), the
    per-turn rewards and done flags; fails if the env asks for more or fewer replies than given."""
    env = env.fresh()
    transcript = list(check_messages(env.reset(record), "reset"))
    rewards, dones = [], []
    for i, text in enumerate(replies):
        assert not dones or not dones[-1], f"the episode ended before reply {i}"
        transcript.append({"role": "assistant", "content": text})
        result = check_step(env.step(turn(text, i)))
        transcript += result.messages
        rewards.append(result.reward)
        dones.append(result.done)
    assert dones and dones[-1], "the episode did not end after the last reply"
    return transcript, rewards, dones


def user(text):
    return {"role": "user", "content": text}


def asst(text):
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- the pieces data

def test_pieces_record_and_good_replies_of_a_hand_written_problem():
    assert split_pieces(Q4) == [REC4["prompt"][0]["content"]] + REC4["pieces"]
    assert pieces_record(P4) == REC4
    assert piece_replies(P4) == ["57", "57 - 29 = 28", "28 / 4 = 7", "7 - 3 = 4", "#### 4"]
    assert pieces_sft_record(P4) == {"messages": [
        user("Iris has 57 candles."), asst("57"),
        user("She sells 29 candles."), asst("57 - 29 = 28"),
        user("She puts them into 4 equal groups and keeps one group."), asst("28 / 4 = 7"),
        user("She loses 3 of them."), asst("7 - 3 = 4"),
        user("How many candles are left with Iris?"), asst("#### 4")]}


@pytest.mark.parametrize("question, steps, replies", [
    # an opening that is itself the first step: no start-value reply
    ("Hugo has 2 jars with 5 cookies in each. He buys 72 more. How many cookies does Hugo have at the end?",
     (Step(2, "*", 5, 10), Step(10, "+", 72, 82)), ["2 * 5 = 10", "10 + 72 = 82", "#### 82"]),
    # a two-sentence level-2 story: the first sentence only states the start value
    ("There are 4 jars. Each holds 10 cookies. How many cookies are there in all?",
     (Step(4, "*", 10, 40),), ["4", "4 * 10 = 40", "#### 40"]),
    # a one-sentence story: the question is the only later piece
    ("Nora puts 24 tickets into 6 equal groups. How many tickets are in each group?",
     (Step(24, "/", 6, 4),), ["24 / 6 = 4", "#### 4"]),
])
def test_good_replies_line_up_sentences_with_steps(question, steps, replies):
    assert piece_replies(Problem(question, steps, 2)) == replies


@pytest.mark.parametrize("question, steps", [
    ("Mia has 14 shells. She finds 9 more. How many shells does Mia have now?", (Step(14, "+", 8, 22),)),
    ("Mia has 14 shells. She finds 9 more. How many shells does Mia have now?", (Step(41, "+", 9, 50),)),
    ("Mia has 14 shells. How many shells does Mia have now?", (Step(14, "+", 9, 23), Step(23, "-", 5, 18))),
])
def test_sentences_that_do_not_name_their_step_are_refused(question, steps):
    with pytest.raises(ValueError):
        piece_replies(Problem(question, steps, 3))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_generated_pieces_records_rebuild_the_question_and_keep_the_answer(split):
    problems = generate_problems(60, seed=3, split=split)
    records = pieces_records(60, seed=3, split=split)
    assert len(records) == 60
    for p, r in zip(problems, records, strict=True):
        assert set(r) == {"prompt", "answer", "level", "pieces"}
        assert len(r["prompt"]) == 1 and r["prompt"][0]["role"] == "user"
        joined = " ".join([r["prompt"][0]["content"], *r["pieces"]])
        assert joined == p.question and split_of(joined) == split
        assert r["answer"] == str(p.answer) and r["level"] == p.level
        assert r["pieces"][-1].endswith("?") and not any(x.endswith("?") for x in r["pieces"][:-1])
        assert len(r["pieces"]) in (len(p.steps), len(p.steps) + 1)
    assert pieces_records(60, seed=3, split=split) == records


NUMBER_LINE = re.compile(r"^(\d+)$")
STEP_LINE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_sft_conversations_keep_a_correct_running_total(split):
    for p, rec in zip(generate_problems(80, seed=5, split=split), pieces_sft_records(80, seed=5, split=split)):
        msgs = rec["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        assert " ".join(m["content"] for m in msgs[::2]) == p.question
        replies = [m["content"] for m in msgs[1::2]]
        assert replies[-1] == f"#### {p.answer}"
        total, steps = None, []
        for reply in replies[:-1]:
            if m := NUMBER_LINE.match(reply):
                assert total is None     # only the opening states a bare start value
                total = int(m.group(1))
                continue
            a, op, b, c = STEP_LINE.match(reply).groups()
            a, b, c = int(a), int(b), int(c)
            assert total in (None, a) and c == apply_op(a, op, b)
            total = c
            steps.append(Step(a, op, b, c))
        assert tuple(steps) == p.steps and total == p.answer


def test_builtin_sources_load_as_rl_prompts_and_sft_conversations():
    kw = dict(n=4, n_heldout=3, seed=0, key="data.train", what="data")
    rl = builtin_records("builtin:world-pieces", kinds=("prompts",), **kw)
    assert rl.format == "prompt_answer" and rl.records == pieces_records(4, split="train", seed=0)
    held = builtin_records("builtin:world-pieces-heldout", kinds=("prompts",), **kw)
    assert held.records == pieces_records(3, split="heldout", seed=0)
    sft = builtin_records("builtin:world-pieces-sft", kinds=("sft",), **kw)
    assert sft.format == "conversational" and sft.records == pieces_sft_records(4, split="train", seed=0)
    with pytest.raises(ConfigError):
        builtin_records("builtin:world-pieces", kinds=("sft",), **kw)


# --------------------------------------------------------------------------- world-pieces

def test_training_user_gives_one_piece_per_turn_and_ends_after_the_answer():
    replies = ["57", "57 - 29 = 28", "28 / 4 = 7", "7 - 3 = 4", "#### 4"]
    transcript, rewards, dones = drive(load_environment("world-pieces"), REC4, replies)
    assert transcript == [
        user("Iris has 57 candles."), asst("57"),
        user("She sells 29 candles."), asst("57 - 29 = 28"),
        user("She puts them into 4 equal groups and keeps one group."), asst("28 / 4 = 7"),
        user("She loses 3 of them."), asst("7 - 3 = 4"),
        user("How many candles are left with Iris?"), asst("#### 4")]
    assert rewards == [None] * 5 and dones == [False, False, False, False, True]
    # the good conversation is the SFT record's, and its final reply is what world_correct scores
    assert transcript == pieces_sft_record(P4)["messages"]
    assert world_correct_reward()([REC4["prompt"]], [transcript[-1]["content"]], answer=[REC4["answer"]]) == [1.0]


def story(n):
    """A record whose story has ``n`` sentences after the opening (the operands are not checked here)."""
    return {"prompt": "Ava has 10 beads.", "answer": "1",
            "pieces": [f"She finds {k + 2} more beads." for k in range(n)] + ["How many beads does Ava have now?"]}


@pytest.mark.parametrize("n, train_turns, heldout_user_turns", [
    (0, 2, ["Now the question: How many beads does Ava have now?"]),
    (1, 3, ["Then: She finds 2 more beads.", "Now the question: How many beads does Ava have now?"]),
    (2, 4, ["Then: She finds 2 more beads. She finds 3 more beads.",
            "Now the question: How many beads does Ava have now?"]),
    (3, 5, ["Then: She finds 2 more beads. She finds 3 more beads.", "After that: She finds 4 more beads.",
            "Now the question: How many beads does Ava have now?"]),
    (4, 6, ["Then: She finds 2 more beads. She finds 3 more beads.",
            "After that: She finds 4 more beads. She finds 5 more beads.",
            "Now the question: How many beads does Ava have now?"]),
])
def test_turn_counts_and_wording_of_the_two_users(n, train_turns, heldout_user_turns):
    rec = story(n)
    transcript, rewards, dones = drive(PiecesEnv(), rec, ["x"] * train_turns)
    assert transcript[0] == user("Ava has 10 beads.")
    assert [m["content"] for m in transcript[2::2]] == rec["pieces"]
    heldout_turns = 1 + len(heldout_user_turns)
    for env in (HeldoutPiecesEnv(), PiecesEnv(strategy="heldout"), load_environment("world-pieces-heldout-user")):
        transcript, rewards, dones = drive(env, rec, ["x"] * heldout_turns)
        assert transcript[0] == user("Ava has 10 beads.")    # the opening is the record's prompt, unchanged
        assert [m["content"] for m in transcript[2::2]] == heldout_user_turns
        assert rewards == [None] * heldout_turns and dones == [False] * (heldout_turns - 1) + [True]


def test_heldout_user_on_the_hand_written_problem():
    replies = ["57", "57 - 29 = 28\n28 / 4 = 7", "7 - 3 = 4", "#### 4"]
    transcript, rewards, dones = drive(load_environment("world-pieces", {"strategy": "heldout"}), REC4, replies)
    assert transcript == [
        user("Iris has 57 candles."), asst("57"),
        user("Then: She sells 29 candles. She puts them into 4 equal groups and keeps one group."),
        asst("57 - 29 = 28\n28 / 4 = 7"),
        user("After that: She loses 3 of them."), asst("7 - 3 = 4"),
        user("Now the question: How many candles are left with Iris?"), asst("#### 4")]
    assert rewards == [None] * 4 and dones == [False, False, False, True]


def test_fresh_episodes_do_not_share_the_users_queue():
    env = PiecesEnv()
    a, b = env.fresh(), env.fresh()
    a.reset(REC4)
    b.reset(story(0))
    assert a.step(turn("57", 0)).messages == [user("She sells 29 candles.")]
    assert b.step(turn("10", 0)).messages == [user("How many beads does Ava have now?")]
    assert b.step(turn("#### 10", 1)).done
    assert a.step(turn("57 - 29 = 28", 1)).messages == [user("She puts them into 4 equal groups and keeps one group.")]


@pytest.mark.parametrize("record", [
    {"prompt": "Ava has 10 beads.", "answer": "1"},                       # no pieces
    {"prompt": "Ava has 10 beads.", "answer": "1", "pieces": []},
    {"prompt": "Ava has 10 beads.", "answer": "1", "pieces": "How many?"},
    {"prompt": "Ava has 10 beads.", "answer": "1", "pieces": ["ok", ""]},
    {"answer": "1", "pieces": ["How many?"]},                               # no prompt
])
def test_records_the_pieces_user_cannot_tell_are_errors(record):
    for env in (PiecesEnv(), HeldoutPiecesEnv()):
        with pytest.raises(ValueError):
            env.fresh().reset(record)


# --------------------------------------------------------------------------- world-retry

RETRY_REC = {"prompt": [user("Mia has 14 shells. She finds 9 more. How many shells does Mia have now?")],
             "answer": "23", "level": 1}
AGAIN = user("Incorrect, try again.")


def episode_return(rewards, final, answer="23"):
    """The per-turn rewards plus world_correct on the final reply (as the runner adds them)."""
    score = world_correct_reward()([RETRY_REC["prompt"]], [final], answer=[answer])[0]
    return sum(r for r in rewards if r is not None) + score


def test_retry_correct_first_try_ends_at_once():
    transcript, rewards, dones = drive(load_environment("world-retry"), RETRY_REC, ["14 + 9 = 23\n#### 23"])
    assert transcript == RETRY_REC["prompt"] + [asst("14 + 9 = 23\n#### 23")]
    assert rewards == [None] and dones == [True]
    assert episode_return(rewards, transcript[-1]["content"]) == 1.0


def test_retry_feedback_until_correct_costs_per_failed_attempt():
    replies = ["#### 22", "14 + 9 = 24\n#### 24", "#### 23"]
    transcript, rewards, dones = drive(RetryEnv(), RETRY_REC, replies)
    assert transcript == RETRY_REC["prompt"] + [asst("#### 22"), AGAIN, asst("14 + 9 = 24\n#### 24"), AGAIN,
                                                asst("#### 23")]
    assert rewards == [-0.1, -0.1, None] and dones == [False, False, True]
    assert episode_return(rewards, "#### 23") == pytest.approx(0.8)


def test_retry_stops_at_the_attempts_limit():
    transcript, rewards, dones = drive(RetryEnv(), RETRY_REC, ["#### 1", "#### 2", "no idea"])
    assert transcript == RETRY_REC["prompt"] + [asst("#### 1"), AGAIN, asst("#### 2"), AGAIN, asst("no idea")]
    assert rewards == [-0.1, -0.1, None] and dones == [False, False, True]
    assert episode_return(rewards, "no idea") == pytest.approx(-0.2)
    # one attempt: no retry and no cost; two attempts at cost 0.25
    assert drive(RetryEnv(attempts=1), RETRY_REC, ["#### 1"])[1:] == ([None], [True])
    env = load_environment("world-retry", {"attempts": 2, "attempt_cost": 0.25})
    transcript, rewards, dones = drive(env, RETRY_REC, ["#### 1", "#### 2"])
    assert transcript == RETRY_REC["prompt"] + [asst("#### 1"), AGAIN, asst("#### 2")]
    assert rewards == [-0.25, None] and dones == [False, True]
    assert episode_return(rewards, "#### 2") == pytest.approx(-0.25)
    transcript, rewards, dones = drive(env, RETRY_REC, ["#### 1", "#### 23"])
    assert rewards == [-0.25, None] and episode_return(rewards, "#### 23") == pytest.approx(0.75)


def test_retry_reports_the_attempt_and_grades_an_integer_answer():
    env = RetryEnv(attempts=5).fresh()
    env.reset({**RETRY_REC, "answer": 23, "prompt": "Mia has 14 shells. How many now?"})
    first = env.step(turn("23.0 shells", 0))   # the world grader: 23.0 equals 23
    assert first.done and first.reward is None and first.info == {"attempt": 1, "correct": True}


@pytest.mark.parametrize("answer", [None, "", "many", True])
def test_retry_needs_a_numeric_answer(answer):
    rec = {"prompt": "How many?"} if answer is None else {"prompt": "How many?", "answer": answer}
    with pytest.raises(ValueError, match="numeric 'answer'"):
        RetryEnv().fresh().reset(rec)


# --------------------------------------------------------------------------- options and registry

def test_registry_and_options():
    assert USER_ENVIRONMENTS == {"world-pieces": PiecesEnv, "world-pieces-heldout-user": HeldoutPiecesEnv,
                                 "world-retry": RetryEnv}
    from posttrain.envs import environment_names

    assert set(USER_ENVIRONMENTS) <= set(environment_names())
    env = load_environment("world-retry", {"attempts": 4, "attempt_cost": 0})
    assert (env.attempts, env.attempt_cost) == (4, 0.0)
    assert load_environment("world-pieces").strategy == "train"


@pytest.mark.parametrize("name, options, match", [
    ("world-pieces", {"turns": 2}, "turns"),
    ("world-pieces", {"strategy": "rude"}, "strategy"),
    ("world-pieces-heldout-user", {"strategy": "train"}, "strategy"),
    ("world-pieces-heldout-user", {"colour": 1}, "colour"),
    ("world-retry", {"tries": 2}, "tries"),
    ("world-retry", {"attempts": 0}, "attempts"),
    ("world-retry", {"attempts": 2.5}, "attempts"),
    ("world-retry", {"attempt_cost": -0.1}, "attempt_cost"),
    ("world-retry", {"attempt_cost": float("nan")}, "attempt_cost"),
    ("world-retry", {"attempt_cost": "0.1"}, "attempt_cost"),
])
def test_bad_options_are_config_errors(name, options, match):
    with pytest.raises(ConfigError, match=match):
        load_environment(name, options)
