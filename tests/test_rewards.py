"""posttrain.rewards: hand-checked values of every built-in, the combination rules (weights,
None / NaN / inf excluded and counted), the errors that name the function, name resolution, and
the reward model scoring exactly what the saved model scores for the training encoding."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from posttrain.errors import CheckpointError, ConfigError, DataError, TokenizerError
from posttrain.rewards import (
    REWARD_REGISTRY,
    RewardError,
    RewardFunction,
    check_reward_fields,
    compute_rewards,
    extract_final_answer,
    overlong_penalty,
    resolve_reward_functions,
)
from posttrain.world.grader import is_correct, is_format_compliant
from posttrain.world.tasks import generate_problems

from .tiny import tiny_model, world_tokenizer


# --------------------------------------------------------------------------- user functions resolved by path

def my_reward(prompts, completions, **kwargs):
    """A user reward function, resolved as ``tests.test_rewards:my_reward``."""
    return [float(len(c)) for c in completions]


my_reward.needs_fields = ("answer",)


def no_kwargs_reward(prompts, completions):
    return [0.0] * len(prompts)


def _call(name: str, completions, *, options=None, prompts=None, **fields):
    [f] = resolve_reward_functions([name], None, options=options or {})
    prompts = prompts or ["q"] * len(completions)
    fields.setdefault("completion_ids", [[1]] * len(completions))
    fields.setdefault("finished", [True] * len(completions))
    fields.setdefault("max_new_tokens", 64)
    return f.fn(prompts, completions, **fields)


def _const(name: str, values, weight: float = 1.0) -> RewardFunction:
    return RewardFunction(name, lambda prompts, completions, **kw: list(values), weight=weight)


def _batch(n: int) -> dict:
    return {"completion_ids": [[1, 2]] * n, "finished": [True] * n, "max_new_tokens": 8}


# --------------------------------------------------------------------------- math_answer

GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("completion, answer, expected", [
    ("48 / 2 = 24\n24 + 48 = 72\n#### 72", GSM8K_SOLUTION, 1.0),      # the answer field is a GSM8K solution
    ("So she sold 72 clips.", GSM8K_SOLUTION, 1.0),                    # last number
    ("#### 71", GSM8K_SOLUTION, 0.0),
    ("#### 1,000", "1000", 1.0),                                       # thousands commas, completion side
    ("The total is 1000.", "1,000", 1.0),                              # ... and answer side, trailing period
    ("It costs $1,234,567 in all.\n#### $1,234,567", 1234567, 1.0),    # dollar sign, int answer
    ("First 3 steps, then \\boxed{42} and 7 more", "42", 1.0),         # boxed beats the last number
    ("\\boxed{\\$18}", 18, 1.0),
    ("#### 18\nWait, maybe 19.", 18, 1.0),                             # #### beats everything after it
    ("The answer is 12, not 13.", 12, 1.0),                            # the phrase beats the last number
    ("answer: -5", "-5", 1.0),                                         # negative numbers
    ("x = 3 - 8 = -5", -5, 1.0),
    ("10-5", -5, 0.0),                                                 # a minus after a digit is not a sign
    ("#### 42.0", 42, 1.0),                                            # 42.0 == 42
    ("#### 2.50", "2.5", 1.0),                                         # decimals
    ("#### 0.75", "3/4", 1.0),                                         # simple fractions vs decimals
    ("\\boxed{\\frac{3}{4}}", 0.75, 1.0),
    ("The answer is 3/4.", "0.75", 1.0),
    ("#### 0.33", "1/3", 0.0),
    ("−7 apples", -7, 1.0),                                            # unicode minus
    ("no number here", 5, 0.0),
    ("#### 5", 0.1, 0.0),
    ("it is 0.1", 0.1, 1.0),                                           # float answers compare as written
])
def test_math_answer_values(completion, answer, expected):
    assert _call("math_answer", [completion], answer=[answer]) == [expected]


def test_math_answer_reference_without_a_number_is_excluded_not_zero():
    assert _call("math_answer", ["#### 3", "#### 3"], answer=["three", None]) == [None, None]


def test_extract_final_answer_order():
    assert extract_final_answer("#### 3\n\\boxed{4}") == 3
    assert extract_final_answer("\\boxed{4} the answer is 5") == 4
    assert extract_final_answer("the answer is 5, then 6") == 5
    assert extract_final_answer("1, 2 and 3") == 3
    assert extract_final_answer("#### none\n7") == 7  # an empty #### line falls through
    assert extract_final_answer("") is None


# --------------------------------------------------------------------------- world_correct / format

def test_world_correct_is_the_world_grader():
    problems = generate_problems(8, seed=3)
    texts = [p.solution for p in problems]
    wrong = [p.solution.rsplit("####", 1)[0] + f"#### {p.answer + 1}" for p in problems]
    answers = [str(p.answer) for p in problems]
    assert _call("world_correct", texts, answer=answers) == [1.0] * 8
    assert _call("world_correct", wrong, answer=[p.answer for p in problems]) == [0.0] * 8
    cases = ["14 + 9 = 23\n23 - 5 = 18", "blah \\boxed{18}", "the answer is 18!", "#### 1,8"]
    got = _call("world_correct", cases, answer=[18] * 4)
    assert got == [float(is_correct(t, 18)) for t in cases] == [1.0, 1.0, 1.0, 1.0]
    # a reference the grader cannot read is excluded (None), not scored 0
    assert _call("world_correct", ["#### 3", "#### 3"], answer=["n/a", None]) == [None, None]


@pytest.mark.parametrize("completion, finished, expected", [
    ("14 + 9 = 23\n23 - 5 = 18\n#### 18", True, 1.0),    # the world's SFT target
    ("14 + 9 = 23\n23 - 5 = 18\n#### 18", False, 0.0),   # truncated: no reward for the format
    ("Some prose first.\n#### 1,000\n", True, 1.0),      # GSM8K-style, trailing newline
    ("#### -3", True, 1.0),
    ("####  2.5  ", True, 1.0),
    ("#### 18.", True, 0.0),                             # nothing but the number on the line
    ("#### $18", True, 0.0),
    ("#### 18\nDone.", True, 0.0),                       # the final line must be the answer line
    ("The answer is 18", True, 0.0),
    ("\\boxed{18}", True, 0.0),
    ("", True, 0.0),
])
def test_format_values(completion, finished, expected):
    assert _call("format", [completion], finished=[finished]) == [expected]


def test_format_strict_is_the_world_format():
    texts = ["14 + 9 = 23\n23 - 5 = 18\n#### 18", "First add.\n#### 18", "14 + 9 = 23\n#### 23"]
    got = _call("format", texts, options={"format_strict": True}, finished=[True, True, False])
    assert got == [float(is_format_compliant(t, f)) for t, f in zip(texts, [True, True, False])] == [1.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="reward.format_strict"):
        resolve_reward_functions(["format"], None, options={"format_strict": "yes"})


# --------------------------------------------------------------------------- overlong (DAPO)

def test_overlong_closed_form():
    # L_max = 20, L_cache = 5: 0 up to 15, then linear to -1 at 20, -1 beyond
    assert [overlong_penalty(L, 20, 5) for L in (0, 14, 15, 16, 18, 20, 21, 100)] == \
        [0.0, 0.0, 0.0, -0.2, -0.6, -1.0, -1.0, -1.0]


def test_overlong_reward_uses_token_length_and_max_new_tokens():
    lengths = [15, 16, 18, 20]
    ids = [[7] * n for n in lengths]
    got = _call("overlong", ["x"] * 4, options={"overlong_buffer": 5}, completion_ids=ids, max_new_tokens=20)
    assert got == pytest.approx([0.0, -0.2, -0.6, -1.0], abs=1e-12)
    # an explicit L_max below the generation length makes the -1 region reachable
    ids = [[7] * n for n in (15, 17, 20, 21, 30)]
    got = _call("overlong", ["x"] * 5, options={"overlong_buffer": 5, "overlong_max_length": 20},
                completion_ids=ids, max_new_tokens=30)
    assert got == pytest.approx([0.0, -0.4, -1.0, -1.0, -1.0], abs=1e-12)


@pytest.mark.parametrize("options", [{}, {"overlong_buffer": 0}, {"overlong_buffer": -2}, {"overlong_buffer": 2.5},
                                     {"overlong_buffer": 20, "overlong_max_length": 20}])
def test_overlong_buffer_is_checked_up_front(options):
    with pytest.raises(ConfigError, match="reward.overlong_buffer"):
        resolve_reward_functions(["overlong"], None, options=options)


def test_overlong_buffer_at_least_max_new_tokens_is_refused_at_the_first_call():
    fns = resolve_reward_functions(["overlong"], None, options={"overlong_buffer": 64})
    with pytest.raises(ConfigError, match="reward.overlong_buffer") as e:
        compute_rewards(fns, ["q"], ["a"], completion_ids=[[1]], finished=[True], max_new_tokens=64)
    assert "'overlong'" in str(e.value) and "max_new_tokens=64" in str(e.value)


# --------------------------------------------------------------------------- combining

def test_weighted_sum_and_per_function_values():
    fns = [_const("a", [1.0, 0.0, 0.5]), _const("b", [2, -1, 0.25], weight=0.5), _const("c", [True, False, 1], 0.0)]
    res = compute_rewards(fns, ["p"] * 3, ["c"] * 3, **_batch(3))
    assert res.total.dtype == torch.float32 and res.valid.dtype == torch.bool
    torch.testing.assert_close(res.total, torch.tensor([2.0, -0.5, 0.625]))
    torch.testing.assert_close(res.per_function["b"], torch.tensor([2.0, -1.0, 0.25]))
    torch.testing.assert_close(res.per_function["c"], torch.tensor([1.0, 0.0, 1.0]))
    assert res.valid.all() and res.invalid_counts == {"a": 0, "b": 0, "c": 0}


def test_none_nan_and_inf_are_excluded_and_counted():
    fns = [_const("a", [1.0, None, math.nan, math.inf, -math.inf, 0.5]), _const("b", [1.0, 1.0, 1.0, 1.0, 1.0, None])]
    res = compute_rewards(fns, ["p"] * 6, ["c"] * 6, **_batch(6))
    assert res.valid.tolist() == [True, False, False, False, False, False]
    assert res.invalid_counts == {"a": 4, "b": 1}
    assert res.total[0].item() == 2.0 and torch.isnan(res.total[1:]).all()
    a = res.per_function["a"]
    assert a[0].item() == 1.0 and a[5].item() == 0.5 and torch.isnan(a[1:5]).all()
    assert res.per_function["b"][:5].tolist() == [1.0] * 5 and torch.isnan(res.per_function["b"][5])
    # a value finite in float64 but not in float32 is invalid too
    res = compute_rewards([_const("big", [1e300])], ["p"], ["c"], **_batch(1))
    assert not res.valid[0] and res.invalid_counts == {"big": 1}


def test_empty_batch():
    res = compute_rewards([_const("a", [])], [], [], **_batch(0))
    assert res.total.shape == (0,) and res.valid.shape == (0,) and res.invalid_counts == {"a": 0}


def test_every_function_sees_the_fields():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(prompts)

    compute_rewards([RewardFunction("spy", spy)], ["p"], ["c"], completion_ids=[[3]], finished=[False],
                    max_new_tokens=9, answer=["4"], level=[2])
    assert seen == {"completion_ids": [[3]], "finished": [False], "max_new_tokens": 9, "answer": ["4"], "level": [2]}


def test_a_function_that_raises_is_named():
    def broken(prompts, completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(RewardError) as e:
        compute_rewards([_const("ok", [1.0]), RewardFunction("broken", broken)], ["p"], ["c"], **_batch(1))
    msg = str(e.value)
    assert "'broken'" in msg and "KeyError" in msg and "answer" in msg and "test_rewards.py" in msg and "Fix:" in msg
    assert isinstance(e.value.__cause__, KeyError)


@pytest.mark.parametrize("out, expected", [
    ([1.0, 2.0], "returned 2 value(s) for a batch of 3"),
    ("1.0", "returned str"),
    (None, "returned NoneType"),
    (7.0, "returned float"),
    ([1.0, "0.5", 1.0], "returned str '0.5' at position 1"),
    ([1.0, [0.5], 1.0], "returned list [0.5] at position 1"),
    ([1.0, torch.tensor(0.5), 1.0], ".item()"),
    (torch.ones(3), "tolist"),
    ([1.0, 2j, 1.0], "returned complex"),
])
def test_a_bad_return_value_is_named(out, expected):
    with pytest.raises(RewardError) as e:
        compute_rewards([RewardFunction("mine", lambda p, c, **kw: out)], ["p"] * 3, ["c"] * 3, **_batch(3))
    msg = str(e.value)
    assert "'mine'" in msg and expected in msg and "Fix:" in msg
    if expected.startswith("returned 2"):
        assert "expected 3 values" in msg


# --------------------------------------------------------------------------- resolution

def test_registry_and_default_weights():
    assert set(REWARD_REGISTRY) == {"world_correct", "format", "math_answer", "overlong", "reward_model", "prm",
                                    "teacher_logprob"}
    fns = resolve_reward_functions(["world_correct", "format", "math_answer"], None, options={"unrelated": 1})
    assert [(f.name, f.weight, f.needs_fields) for f in fns] == [
        ("world_correct", 1.0, ("answer",)), ("format", 1.0, ()), ("math_answer", 1.0, ("answer",))]
    fns = resolve_reward_functions(["world_correct", "format"], [1.0, 0.25], options={})
    assert [f.weight for f in fns] == [1.0, 0.25]


def test_module_function_path():
    [f] = resolve_reward_functions(["tests.test_rewards:my_reward"], [2.0], options={})
    assert f.fn is my_reward and f.name == "tests.test_rewards:my_reward" and f.needs_fields == ("answer",)
    res = compute_rewards([f], ["p", "q"], ["ab", "abcd"], **_batch(2))
    torch.testing.assert_close(res.total, torch.tensor([4.0, 8.0]))


def test_module_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_rewards_mod.py").write_text("def short(prompts, completions, **kw):\n"
                                                 "    return [1.0 if len(c) < 3 else 0.0 for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_rewards_mod", raising=False)
    try:
        [f] = resolve_reward_functions(["cwd_rewards_mod:short"], None, options={})
        assert f.fn(["p", "p"], ["ab", "abc"]) == [1.0, 0.0]
    finally:
        sys.modules.pop("cwd_rewards_mod", None)


@pytest.mark.parametrize("names, weights, key, words", [
    (["nope"], None, "reward.functions", ["'nope'", "world_correct", "math_answer", "package.module:function"]),
    (["tests.test_rewards:my_rewad"], None, "reward.functions", ["my_rewad", "did you mean my_reward"]),
    (["no_such_module_xyz:fn"], None, "reward.functions", ["no_such_module_xyz", "PYTHONPATH"]),
    (["tests.test_rewards:no_kwargs_reward"], None, "reward.functions", ["**kwargs"]),
    (["tests.test_rewards:GSM8K_SOLUTION"], None, "reward.functions", ["not a function"]),
    (["tests.test_rewards:"], None, "reward.functions", ["package.module:function"]),
    (["format", "format"], None, "reward.functions", ["twice"]),
    ([], None, "reward.functions", ["empty"]),
    (["format", "world_correct"], [1.0], "reward.weights", ["1 value(s)", "2 reward function(s)"]),
    (["format"], [float("nan")], "reward.weights", ["finite"]),
    (["format"], ["1"], "reward.weights", ["finite"]),
])
def test_bad_names_and_weights(names, weights, key, words):
    with pytest.raises(ConfigError) as e:
        resolve_reward_functions(names, weights, options={})
    msg = str(e.value)
    assert key in msg and "Fix:" in msg
    for w in words:
        assert w in msg


def test_a_module_that_fails_to_import(tmp_path, monkeypatch):
    (tmp_path / "raising_rewards_mod.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "dep_rewards_mod.py").write_text("import not_installed_pkg_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="boom at import") as e:
        resolve_reward_functions(["raising_rewards_mod:f"], None, options={})
    assert "reward.functions" in str(e.value)
    with pytest.raises(ConfigError, match="not_installed_pkg_xyz") as e:
        resolve_reward_functions(["dep_rewards_mod:f"], None, options={})
    assert "install" in str(e.value)


def test_missing_record_field_names_file_function_and_field():
    fns = resolve_reward_functions(["format", "math_answer"], None, options={})
    check_reward_fields(fns, {"prompt", "answer"}, "data/rl.jsonl")
    with pytest.raises(DataError) as e:
        check_reward_fields(fns, {"prompt", "level"}, "data/rl.jsonl")
    msg = str(e.value)
    assert "data/rl.jsonl" in msg and "'math_answer'" in msg and "'answer'" in msg and "Fix:" in msg
    # the loop's own fields always count as available
    check_reward_fields([RewardFunction("x", my_reward, needs_fields=("finished", "completion_ids"))], {"prompt"},
                        "f.jsonl")


# --------------------------------------------------------------------------- reward model

PAIRS = [
    ("Mia has 14 shells. She finds 9 more. How many shells does Mia have now?", "14 + 9 = 23\n#### 23"),
    ("Tom has 3 boxes with 4 cards in each. How many cards does Tom have?", "3 * 4 = 12\n#### 12"),
    ("Ava has 30 coins. She loses 7 of them. How many coins are left with Ava?", "I think it is 20"),
    ("Leo has 8 pears.", ""),  # an empty completion is scored too
    ("Zoe has 60 nuts and shares them equally among 5 friends. How many nuts does each friend get?",
     "60 / 5 = 12\n12 + 0 = 12\n#### 12"),
]


def _seq_cls(seed: int = 0, max_positions: int = 512):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = world_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      num_labels=1, pad_token_id=tok.pad_token_id)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)  # a head that spreads the scores
    return model.eval()


def _save_rm(path, model, tokenizer=None):
    model.save_pretrained(path, safe_serialization=True)
    (tokenizer or world_tokenizer()).save_pretrained(path)
    return str(path)


def _training_ids(prompt: str, completion: str, fmt: str = "chat") -> list[int]:
    """How posttrain rm encodes a (prompt, response) record for training."""
    from posttrain.data import encode_sft_example

    if fmt == "chat":
        record = {"prompt": [{"role": "user", "content": prompt}],
                  "completion": [{"role": "assistant", "content": completion}]}
    else:
        record = {"prompt": prompt, "completion": completion}
    return encode_sft_example(record, world_tokenizer(), format="prompt_completion", max_length=10**6).input_ids


def _rm(path, batch_size: int, **options):
    [f] = resolve_reward_functions(["reward_model"], None, options={"reward_model": path,
                                                                    "reward_model_batch_size": batch_size, **options},
                                   tokenizer=world_tokenizer(), device="cpu", log=None)
    return f


def test_reward_model_scores_what_the_saved_model_scores(tmp_path):
    from posttrain.algorithms.rm import sequence_rewards
    from posttrain.data import EncodedExample, collate_sequences

    model = _seq_cls()
    path = _save_rm(tmp_path / "rm", model)
    prompts, completions = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    tok = world_tokenizer()
    nonempty = [i for i, c in enumerate(completions) if c]
    with torch.no_grad():
        # transformers' forward of the saved model, one sequence at a time, on the training encoding
        expected = torch.tensor([model(input_ids=torch.tensor([_training_ids(prompts[i], completions[i])])).logits[0, 0]
                                 for i in nonempty])
        # and rm.py's own pooling over a packed batch of the same sequences
        seqs = [EncodedExample(_training_ids(prompts[i], completions[i]), _training_ids(prompts[i], completions[i]))
                for i in nonempty]
        trained = sequence_rewards(model, collate_sequences(seqs, tok.pad_token_id, packing=True, row_length=256),
                                   pooling="last", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-5)
    results = {}
    for bs in (1, 2, 3, 16):
        f = _rm(path, bs)
        assert f.needs_fields == () and not f.fn.model.training
        assert all(not p.requires_grad for p in f.fn.model.parameters())
        for i in nonempty:  # the scorer's encoding is the training encoding
            assert f.fn.encode(prompts[i], completions[i]) == _training_ids(prompts[i], completions[i])
        res = compute_rewards([f], prompts, completions, **_batch(len(prompts)))
        assert res.valid.all()
        results[bs] = res.per_function["reward_model"]
        torch.testing.assert_close(results[bs][nonempty], expected, rtol=1e-5, atol=1e-5)
    for bs in (2, 3, 16):
        torch.testing.assert_close(results[bs], results[1], rtol=1e-5, atol=1e-5)
    assert results[1].std() > 0.1  # the scores are not trivially equal
    # the empty completion: the chat rendering of an empty assistant turn, forwarded by transformers
    empty = [i for i, c in enumerate(completions) if not c][0]
    ids = tok.apply_chat_template([{"role": "user", "content": prompts[empty]}, {"role": "assistant", "content": ""}],
                                  tokenize=True, return_dict=False)
    with torch.no_grad():
        direct = model(input_ids=torch.tensor([list(ids)])).logits[0, 0]
    torch.testing.assert_close(results[1][empty], direct, rtol=1e-5, atol=1e-5)


def test_reward_model_message_prompts_and_text_format(tmp_path):
    model = _seq_cls(seed=1)
    path = _save_rm(tmp_path / "rm", model)
    f = _rm(path, 2)
    msgs = [[{"role": "user", "content": p}] for p, _ in PAIRS[:2]]
    a = f.fn(msgs, [c for _, c in PAIRS[:2]])
    b = f.fn([p for p, _ in PAIRS[:2]], [c for _, c in PAIRS[:2]])
    assert a == pytest.approx(b, abs=1e-6)
    # an RM trained on plain-string records: prompt tokens, completion tokens, EOS
    t = _rm(path, 2, reward_model_format="text")
    got = t.fn([p for p, _ in PAIRS[:3]], [c for _, c in PAIRS[:3]])
    with torch.no_grad():
        want = [model(input_ids=torch.tensor([_training_ids(p, c, "text")])).logits[0, 0].item() for p, c in PAIRS[:3]]
    assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(ConfigError, match="reward.reward_model_format"):
        _rm(path, 2, reward_model_format="jinja")


def test_reward_model_too_long_sequence_is_excluded(tmp_path):
    path = _save_rm(tmp_path / "rm", _seq_cls(max_positions=64))
    f = _rm(path, 4)
    res = compute_rewards([f], ["Mia has 3 pears.", "Mia has 3 pears."], ["#### 3", " ".join(["14 + 9 = 23"] * 30)],
                          **_batch(2))
    assert res.valid.tolist() == [True, False] and res.invalid_counts == {"reward_model": 1}


def test_reward_model_notes_a_different_policy_tokenizer(tmp_path, data_chatml_tokenizer):
    path = _save_rm(tmp_path / "rm", _seq_cls())
    notes = []
    resolve_reward_functions(["reward_model"], None, options={"reward_model": path}, tokenizer=world_tokenizer(),
                             device="cpu", log=notes.append)
    assert notes == []
    resolve_reward_functions(["reward_model"], None, options={"reward_model": path}, tokenizer=data_chatml_tokenizer,
                             device="cpu", log=notes.append)
    assert len(notes) == 1 and "own tokenizer" in notes[0] and "vocabulary" in notes[0]
    assert "\n" not in notes[0]


def test_reward_model_refusals(tmp_path):
    import copy

    # no chat template in the RM's directory
    tok = copy.deepcopy(world_tokenizer())
    tok.chat_template = None
    path = _save_rm(tmp_path / "notemplate", _seq_cls(), tok)
    with pytest.raises(TokenizerError, match="no chat template") as e:
        _rm(path, 2)
    assert "reward.reward_model" in str(e.value) and "reward_model_format=text" in str(e.value)
    # a causal LM is not a reward model (it would get a random head)
    lm = tmp_path / "lm"
    tiny_model("llama").save_pretrained(lm)
    world_tokenizer().save_pretrained(lm)
    with pytest.raises(CheckpointError, match="no reward head") as e:
        _rm(str(lm), 2)
    assert "reward.reward_model" in str(e.value) and "posttrain rm" in str(e.value)
    # settings
    with pytest.raises(ConfigError, match="reward.reward_model"):
        resolve_reward_functions(["reward_model"], None, options={})
    good = _save_rm(tmp_path / "rm", _seq_cls())
    with pytest.raises(ConfigError, match="reward.reward_model_batch_size"):
        _rm(good, 0)
    with pytest.raises(ConfigError, match="reward.reward_model_dtype"):
        _rm(good, 2, reward_model_dtype="int8")
    with pytest.raises(ConfigError, match="reward.reward_model"):
        _rm(str(tmp_path / "does-not-exist"), 2)
