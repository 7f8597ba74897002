"""posttrain eval: the one evaluator (issue 21).

* pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k), against hand-computed values;
* greedy evaluation of the tiny world's base model equals the world's evaluator and the training
  loops' held-out evaluation (online.evaluate_prompts) on the same problems, completion for completion;
* a sampled evaluation is reproducible (also across batch sizes), its pass@1 is the mean
  correctness of its samples and its pass@n the share of prompts with a correct sample;
* a user's prompt/answer JSONL (and a GSM8K-layout file through data.fields=gsm8k) is scored by hand
  on canned completions, per difficulty;
* bad input is refused naming the file / line / field or the key; the CLI writes eval.json.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import torch

import posttrain.algorithms.online.evaluate as one_evaluator
from posttrain.algorithms.evaluate import EvalConfig, run_eval
from posttrain.algorithms.online import (
    RewardConfig,
    RLDataConfig,
    build_rewards,
    encode_prompts,
    evaluate_prompts,
    load_prompt_source,
)
from posttrain.cli import main
from posttrain.config import load_config
from posttrain.models.loading import load_causal_lm, load_tokenizer
from posttrain.ops import pass_at_k
from posttrain.rollout import Rollout
from posttrain.world.evaluate import evaluate_problems
from posttrain.world.tasks import generate_problems

from .tiny import tiny_model, world_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def has_digit(prompts, completions, **_):
    """A correctness a random model's samples differ in: 1 when the completion holds a digit."""
    return [float(any(ch.isdigit() for ch in t)) for t in completions]


def _cfg(*overrides: str) -> EvalConfig:
    return load_config(EvalConfig, None, ["eval.progress=false", *overrides])


@pytest.fixture(scope="module")
def base():
    return load_causal_lm("builtin:tiny-world-base", device="cpu"), load_tokenizer("builtin:tiny-world-base")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_model("llama", seed=1).save_pretrained(d)
    world_tokenizer().save_pretrained(d)
    return d


# --------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 2, 1 / 2),          # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 2, 7 / 10),         # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 5, 11 / 12),       # 1 - C(7,5)/C(10,5) = 1 - 21/252
    (4, 0, 4, 0.0), (4, 1, 4, 1.0), (4, 3, 2, 1.0),   # none correct; k = n; n - c < k
    (8, 3, 1, 3 / 8),          # pass@1 = c / n
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert float(pass_at_k(torch.tensor([c]), n, k)[0]) == pytest.approx(expected, abs=1e-15)


def test_pass_at_k_matches_the_binomials_and_refuses_k_above_n():
    cases = [(n, c, k) for n, k in product(range(1, 9), range(1, 9)) if k <= n for c in range(n + 1)]
    got = pass_at_k(torch.tensor([c for _, c, _ in cases]), torch.tensor([n for n, _, _ in cases]), 1)
    assert got.tolist() == pytest.approx([c / n for n, c, _ in cases], abs=1e-15)
    for n, c, k in cases:
        ref = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert float(pass_at_k(torch.tensor([c]), n, k)[0]) == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError, match="at least 3 samples"):
        pass_at_k(torch.tensor([1]), 2, 3)


# --------------------------------------------------------------------------- one evaluator


def test_greedy_eval_equals_the_world_evaluator_and_the_training_evaluation(base):
    """The same 8 held-out problems through three entry points: posttrain eval's run_eval (records
    from builtin:world-problems-heldout), the world's evaluate_problems (the quickstart's table) and
    online.evaluate_prompts (held-out evaluation during training)."""
    model, tok = base
    res = run_eval(_cfg("data.world_examples=8", "eval.max_new_tokens=32"), log=None, model=model, tokenizer=tok)
    world = evaluate_problems(model, tok, generate_problems(8, seed=0, split="heldout"), max_new_tokens=32)
    assert [s["completion"] for s in res.samples] == [s["response"] for s in world.samples]
    assert [s["correct"] for s in res.samples] == [s["correct"] for s in world.samples]
    assert res.metrics["accuracy"] == world.accuracy == 1 / 8    # the base model gets one of them right
    assert res.metrics["response_tokens"] == world.mean_response_tokens
    assert {int(k): v["accuracy"] for k, v in res.by_group.items()} == world.per_level

    data = RLDataConfig(world_eval_examples=8)
    prompts, _ = encode_prompts(load_prompt_source("builtin:world-problems-heldout", data, 0), tok,
                                max_prompt_length=256)
    functions, _ = build_rewards(RewardConfig(), tok, "cpu", max_new_tokens=32)
    during_training = evaluate_prompts(model, tok, prompts, functions, max_new_tokens=32)
    assert during_training["eval_reward/world_correct"] == res.metrics["accuracy"]
    assert during_training["eval_response_length"] == res.metrics["response_tokens"]


def test_sampled_eval_is_reproducible_and_pass_at_1_is_the_mean_correctness(tiny_dir):
    common = (f"model.name_or_path={tiny_dir}", "data.world_examples=4", "eval.n=4", "eval.temperature=1.0",
              "eval.seed=3", "eval.max_new_tokens=10", "reward.functions=[tests.test_eval_command:has_digit]",
              "eval.correct=tests.test_eval_command:has_digit", "eval.threshold=0.5")
    one = run_eval(_cfg(*common), log=None)
    again = run_eval(_cfg(*common, "eval.batch_size=3"), log=None)   # other batches, same draws
    assert [s["completion"] for s in one.samples] == [s["completion"] for s in again.samples]
    assert one.metrics == again.metrics and one.by_group == again.by_group
    assert len(one.samples) == 16 and [s["sample"] for s in one.samples[:4]] == [0, 1, 2, 3]
    correct = [[float(s["correct"]) for s in one.samples if s["index"] == i] for i in range(4)]
    counts = [sum(c) for c in correct]
    assert 0 < sum(counts) < 16, counts   # the check below is not vacuous
    assert one.metrics["pass@1"] == pytest.approx(sum(counts) / 16, abs=1e-12)
    assert one.metrics["pass@4"] == pytest.approx(sum(c > 0 for c in counts) / 4, abs=1e-12)
    assert one.metrics["reward/tests.test_eval_command:has_digit"] == pytest.approx(sum(counts) / 16)
    other_seed = run_eval(_cfg(*common, "eval.seed=4"), log=None)
    assert [s["completion"] for s in other_seed.samples] != [s["completion"] for s in one.samples]


def _canned(texts: dict[str, str]):
    """A stand-in for the generation: each prompt's completion by the prompt text (finished)."""
    def generate(model, tokenizer, prompts, sampling, **kwargs):
        out = []
        for i, ids in enumerate(prompts):
            prompt = tokenizer.decode(ids)
            text = next(t for q, t in texts.items() if q in prompt)
            out += [Rollout(i, list(ids), tokenizer(text)["input_ids"], [0.0], text, True)] * sampling.n
        return out
    return generate


@pytest.mark.parametrize("layout", ["prompt_answer", "gsm8k"])
def test_a_users_prompt_answer_file_by_hand(tiny_dir, tmp_path, monkeypatch, layout):
    rows = [("What is 2 + 2?", "4", "easy", "2 + 2 = 4\n#### 4"),           # correct
            ("What is 3 * 5?", "15", "easy", "3 * 5 = 16\n#### 16"),        # wrong
            ("What is 10 - 7?", "3", "hard", "The answer is 3."),           # correct (no #### line)
            ("Name a colour.", "blue", "hard", "red")]                      # no number in the answer: invalid
    if layout == "gsm8k":
        records = [{"question": q, "answer": f"some reasoning\n#### {a}", "difficulty": d} for q, a, d, _ in rows]
    else:
        records = [{"prompt": q, "answer": a, "difficulty": d} for q, a, d, _ in rows]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(one_evaluator, "generate_rollouts", _canned({q: t for q, _, _, t in rows}))
    res = run_eval(_cfg(f"model.name_or_path={tiny_dir}", f"data.eval={path}", "reward.functions=[math_answer]",
                        "reward.gold=[format]", f"output_dir={tmp_path / 'out'}",
                        *(["data.fields=gsm8k"] if layout == "gsm8k" else [])), log=None)
    m = res.metrics
    assert res.correct == "math_answer" and res.group_by == "difficulty"
    assert m["accuracy"] == pytest.approx(2 / 3)          # the invalid one is excluded and counted
    assert m["invalid/math_answer"] == 1
    assert m["reward/format"] == 0.5                      # two of four end in a '#### n' line
    assert res.by_group["easy"]["accuracy"] == 0.5 and res.by_group["hard"]["accuracy"] == 1.0
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["metrics"]["accuracy"] == pytest.approx(2 / 3) and saved["by_group"]["hard"]["prompts"] == 2
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [s["correct"] for s in samples] == [True, False, True, None]
    assert samples[1]["rewards"] == {"math_answer": 0.0, "format": 1.0}
    assert [s["difficulty"] for s in samples] == ["easy", "easy", "hard", "hard"]
    assert samples[0]["prompt"] == "What is 2 + 2?"
    assert samples[0]["gold"] == "4"


# --------------------------------------------------------------------------- errors and the CLI


def _err(capsys, argv) -> str:
    code = main(["eval", "eval.progress=false", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_bad_input_is_refused_naming_the_place(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 2 + 2?", "answer": "4"}\n{"prompt": 5, "answer": "6"}\n')
    err = _err(capsys, [f"model.name_or_path={tiny_dir}", f"data.eval={bad}"])
    assert str(bad) in err and "line 2" in err and "'prompt'" in err
    nolevel = tmp_path / "nolevel.jsonl"
    nolevel.write_text('{"prompt": "a", "answer": "1", "level": 1}\n{"prompt": "b", "answer": "2", "level": 2}\n'
                       '{"prompt": "c", "answer": "3"}\n')
    err = _err(capsys, [f"model.name_or_path={tiny_dir}", f"data.eval={nolevel}", "eval.group_by=level"])
    assert str(nolevel) in err and "line 3" in err and "'level'" in err
    noanswer = tmp_path / "noanswer.jsonl"
    noanswer.write_text('{"prompt": "a"}\n')
    err = _err(capsys, [f"model.name_or_path={tiny_dir}", f"data.eval={noanswer}"])
    assert "world_correct" in err and "'answer'" in err
    err = _err(capsys, [f"model.name_or_path={tmp_path / 'nope'}"])
    assert "model.name_or_path" in err and "no such directory" in err
    err = _err(capsys, ["reward.functions=[world_corect]"])
    assert "reward.functions" in err and "world_corect" in err and "world_correct" in err
    err = _err(capsys, ["eval.n=0"])
    assert "'eval.n'" in err and "out of range" in err
    err = _err(capsys, ["eval.n=4"])
    assert "eval.temperature" in err
    err = _err(capsys, ["eval.correct=format"])
    assert "eval.correct" in err
    err = _err(capsys, ["--model", str(tiny_dir)])
    assert "model.name_or_path" in err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "eval.json").write_text("{}")
    err = _err(capsys, [f"model.name_or_path={tiny_dir}", f"output_dir={tmp_path / 'used'}"])
    assert "eval.json" in err and "overwrite=true" in err


def test_the_cli_writes_eval_json(tiny_dir, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "What is 2 + 2?", "answer": "4"}\n{"prompt": "What is 3 + 4?", "answer": "7"}\n')
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "posttrain", "eval", f"model={tiny_dir}", f"data.eval={data}",
                        "reward.functions=[math_answer, format]", "eval.n=2", "eval.temperature=1.0",
                        "eval.max_new_tokens=6", "eval.progress=false", f"output_dir={out}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    saved = json.loads((out / "eval.json").read_text())
    assert saved["model"] == str(tiny_dir) and saved["mode"] == "sampled" and saved["prompts"] == 2
    assert {"pass@1", "pass@2", "reward/math_answer", "reward/format", "reward"} <= set(saved["metrics"])
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4
    assert "pass@2" in r.stdout and "reward (weighted sum)" in r.stdout


@pytest.mark.slow
def test_two_processes_give_the_single_process_result(tiny_dir, tmp_path):
    """Under torchrun each process generates every other prompt of a batch; rank 0 writes the
    whole result, equal to one process's."""
    from .test_distributed import _torchrun

    args = ["eval", f"model.name_or_path={tiny_dir}", "data.world_examples=6", "eval.n=3", "eval.temperature=1.0",
            "eval.max_new_tokens=8", "eval.progress=false", "reward.functions=[tests.test_eval_command:has_digit]"]
    _torchrun([*args, f"output_dir={tmp_path / 'two'}"], tmp_path)
    assert main([*args, f"output_dir={tmp_path / 'one'}"]) == 0
    for name in ("eval.json", "samples.jsonl"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
