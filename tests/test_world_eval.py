"""Generation backend, held-out evaluation metrics, and the reproducible base-model build."""

import hashlib

import pytest
import torch

from posttrain.rollout.hf import Generation, generate
from posttrain.world import evaluate as world_eval
from posttrain.world.tasks import generate_problems

from .tiny import tiny_model, world_tokenizer


def test_greedy_generate_matches_manual_argmax_and_reports_stops():
    tok = world_tokenizer()
    model = tiny_model("llama", seed=3)
    model.eval()
    prompts = [tok("Mia has 3 apples.")["input_ids"], tok("12 + 7 =")["input_ids"], tok("#")["input_ids"]]
    gens = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    for p, g in zip(prompts, gens):
        ids = list(p)
        expected = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            expected.append(nxt)
            ids.append(nxt)
            if nxt == tok.eos_token_id:
                break
        assert g.completion_ids == expected
        assert g.finished == (expected[-1] == tok.eos_token_id)
        assert g.prompt_ids == list(p)


def test_evaluation_metrics_by_hand(monkeypatch):
    import posttrain.algorithms.online.evaluate as one_evaluator
    from posttrain.rollout import Rollout

    problems = generate_problems(4, seed=0, split="heldout")
    answers = [p.answer for p in problems]
    canned = [  # (completion ids, text, finished)
        ([1, 2, 3], f"1 + 1 = 2\n#### {answers[0]}", True),        # correct, compliant
        ([1, 2], f"I think {answers[1]}", True),                   # correct, not compliant
        ([1] * 5, f"1 + 1 = 2\n#### {answers[2]}", False),         # correct, ran out of tokens
        ([1], f"1 + 1 = 2\n#### {answers[3] + 1}", True),          # wrong, compliant
    ]
    # the world's evaluation is the one evaluator's: canned completions in place of its generation
    monkeypatch.setattr(one_evaluator, "generate_rollouts", lambda model, tok, prompts, sampling, **k: [
        Rollout(i, list(p), ids, [0.0] * len(ids), text, fin)
        for i, (p, (ids, text, fin)) in enumerate(zip(prompts, canned))])
    res = world_eval.evaluate_problems(None, world_tokenizer(), problems)
    assert res.accuracy == 0.75
    assert res.format_compliance == 0.5
    assert res.mean_response_tokens == (3 + 2 + 5 + 1) / 4
    assert [p.level for p in problems] == [1, 2, 3, 4]
    assert res.per_level == {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0}
    assert [s["correct"] for s in res.samples] == [True, True, True, False]
    assert [s["format_ok"] for s in res.samples] == [True, False, False, True]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_world_build_is_reproducible(tmp_path):
    from posttrain.world.build import main

    for name in ("a", "b"):
        main(["--out", str(tmp_path / name), "--docs", "300", "--probe-problems", "4", "--batch-size", "8",
              "--seq-len", "128"])
    assert _sha(tmp_path / "a" / "model.safetensors") == _sha(tmp_path / "b" / "model.safetensors")
    assert _sha(tmp_path / "a" / "tokenizer.json") == _sha(tmp_path / "b" / "tokenizer.json")
