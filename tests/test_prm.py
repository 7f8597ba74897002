"""Process reward models: MC labels against a stub sampler of known success probability, the step
loss and the aggregations by hand, step-end positions, the world's gold step labels, training
and scoring end to end (transformers loads the saved PRM and gives the same scores), the
command line on tiny Llama and Qwen2, bad input."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from posttrain.algorithms.prm import (
    PRMConfig,
    StepScorer,
    encode_steps,
    mc_success_counts,
    run_prm,
    split_steps,
    step_metrics,
)
from posttrain.cli import main
from posttrain.config import load_config
from posttrain.errors import ConfigError, DataError
from posttrain.ops import aggregate_step_scores, mc_step_labels, prm_step_loss
from posttrain.world.preferences import first_wrong_line, step_records
from posttrain.world.tasks import generate_problems

from .tiny import tiny_model, world_tokenizer

# --------------------------------------------------------------------------- pure parts


def test_mc_labels_soft_and_hard():
    c = torch.tensor([0, 1, 4, 8])
    assert mc_step_labels(c, 8).tolist() == [0.0, 0.125, 0.5, 1.0]
    assert mc_step_labels(c, 8, hard=True).tolist() == [0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        mc_step_labels(torch.tensor([9]), 8)
    with pytest.raises(ValueError):
        mc_step_labels(c, 0)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_mc_estimate_is_unbiased_with_variance_p_q_over_k(k):
    """A stub sampler whose completions succeed with probability p (per prefix): the soft label's
    mean is p and its variance p(1-p)/k; the hard label's mean is 1-(1-p)^k."""
    rng = random.Random(k)
    ps = [0.1, 0.5, 0.8]
    n = 4000  # prefixes per p

    def sample(prefixes, kk):
        return ["ok" if rng.random() < ps[p[0]] else "no" for p in prefixes for _ in range(kk)]

    for i, p in enumerate(ps):
        prefixes = [[i]] * n
        counts = mc_success_counts(prefixes, k=k, sample=sample, grade=lambda j, outs: [o == "ok" for o in outs])
        soft = mc_step_labels(torch.tensor(counts), k).double()
        hard = mc_step_labels(torch.tensor(counts), k, hard=True).double()
        var = p * (1 - p) / k
        # the sample mean is within 4 standard errors of p; the sample variance within 10% of p(1-p)/k
        assert abs(float(soft.mean()) - p) < 4 * math.sqrt(var / n)
        assert float(soft.var()) == pytest.approx(var, rel=0.1)
        assert float(hard.mean()) == pytest.approx(1 - (1 - p) ** k, abs=4 * math.sqrt(0.25 / n))


def test_mc_counts_need_k_and_one_completion_per_rollout():
    with pytest.raises(ConfigError, match="labels.k=0"):
        mc_success_counts([[1]], k=0, sample=lambda p, k: [], grade=lambda i, o: [])
    with pytest.raises(ValueError, match="returned 1 completions"):
        mc_success_counts([[1]], k=2, sample=lambda p, k: ["x"], grade=lambda i, o: [True])


def test_step_loss_by_hand():
    z = torch.tensor([0.0, 2.0, -1.0])
    y = torch.tensor([1.0, 0.25, 0.0])
    loss, m = prm_step_loss(z, y)
    sig = torch.sigmoid(z)
    want = -(y * sig.log() + (1 - y) * (1 - sig).log())
    torch.testing.assert_close(loss, want)
    assert loss[0].item() == pytest.approx(math.log(2))
    # z = 0 predicts 0.5, which is not > 0.5: wrong for label 1; 2.0 vs 0.25: wrong; -1 vs 0: right
    assert m["step_correct"].tolist() == [0.0, 0.0, 1.0]


def test_aggregations_by_hand():
    probs = torch.tensor([[0.9, 0.2, 0.8], [0.5, 0.6, 0.0], [0.3, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    mn = aggregate_step_scores(probs, mask, "min")
    pr = aggregate_step_scores(probs, mask, "product")
    last = aggregate_step_scores(probs, mask, "last")
    assert mn[:2].tolist() == pytest.approx([0.2, 0.5])
    assert pr[:2].tolist() == pytest.approx([0.9 * 0.2 * 0.8, 0.5 * 0.6])
    assert last[:2].tolist() == pytest.approx([0.8, 0.6])
    assert all(math.isnan(float(x[2])) for x in (mn, pr, last))  # no steps: no score
    with pytest.raises(ValueError, match="unknown step aggregation"):
        aggregate_step_scores(probs, mask, "mean")


def test_step_ends_are_each_steps_last_token():
    tok = world_tokenizer()
    steps = ["12 + 18 = 30", "30 * 2 = 60", "#### 60"]
    e = encode_steps(tok, "How many?", steps, delimiter="\n")
    text = tok.decode(e.input_ids[e.step_ends[0] + 1:], skip_special_tokens=True)
    assert text.startswith("\n30 * 2")  # the token after step 0's end starts the delimiter
    for i, end in enumerate(e.step_ends):
        upto = tok.decode(e.input_ids[: end + 1], skip_special_tokens=True)
        assert upto.endswith(steps[i]), (i, upto)
    assert split_steps("a\n\nb\n", "\n") == ["a", "b"]


def test_world_gold_step_labels_by_construction():
    recs = step_records(200, seed=3)
    probs = {str(p.question): p for p in generate_problems(200, seed=3 + 4000, split="train")}
    slipped = 0
    for r in recs:
        p = probs[r["prompt"][0]["content"]]
        fe = r["first_error"]
        if fe is None:
            assert all(r["labels"]) and "\n".join(r["completions"]) == p.solution
        else:
            slipped += 1
            assert r["labels"] == [i < fe for i in range(len(r["completions"]))]
            assert r["completions"][-1] != f"#### {p.answer}"  # the slip reaches the answer
            assert first_wrong_line(p, "\n".join(r["completions"])) == fe
    assert 60 < slipped < 140  # about half


def test_localization_metrics_by_hand():
    class E:
        def __init__(self, labels):
            self.labels = labels

    scores = [[0.9, 0.1, 0.2], [0.8, 0.7, 0.3], [0.9, 0.9]]
    ex = [E([1, 0, 0]), E([1, 1, 0]), E([1, 1])]
    m = step_metrics(scores, ex, [1, 1, None])
    assert m["step_accuracy"] == 1.0
    assert m["localization_min"] == 0.5          # solution 0 (argmin 1 == 1); solution 1 argmin is 2
    assert m["localization_first_below_half"] == 0.5  # solution 1's first step below 0.5 is 2
    assert m["localization_chance"] == pytest.approx((1 / 3 + 1 / 3) / 2)


# --------------------------------------------------------------------------- runs


def _cfg(out, **overrides) -> PRMConfig:
    base = {"train.output_dir": str(out), "train.progress": "false", "data.world_examples": 24,
            "data.world_eval_examples": 12, "train.micro_batch_size": 4, "train.lr": 1e-3}
    base.update(overrides)
    return load_config(PRMConfig, None, [f"{k}={v}" for k, v in base.items()])


def _model(arch="llama"):
    from transformers import LlamaConfig, LlamaForTokenClassification, Qwen2Config, Qwen2ForTokenClassification

    lm = tiny_model(arch, hidden=32)
    keys = {k: v for k, v in lm.config.to_dict().items() if k not in ("id2label", "label2id")}
    cfg = (LlamaConfig if arch == "llama" else Qwen2Config)(**keys, num_labels=1)
    model = (LlamaForTokenClassification if arch == "llama" else Qwen2ForTokenClassification)(cfg)
    model.model.load_state_dict(lm.model.state_dict())
    torch.nn.init.zeros_(model.score.weight)  # as run_prm starts a new head: every step at 0.5
    model.config._attn_implementation = "sdpa"
    return model


# step loss of the first 3 optimizer steps on a tiny random Llama with the world's gold labels (step 1: every
# score is 0.5 from the zero head, so the loss is ln 2)
STORED = [0.693147, 0.691842, 0.687962]


def test_prm_trains_and_transformers_reloads_the_same_scores(tmp_path):
    from transformers import AutoModelForTokenClassification

    res = run_prm(_cfg(tmp_path / "r", **{"train.max_steps": 3, "train.epochs": 0}), model=_model(),
                  tokenizer=world_tokenizer(), log=lambda s: None)
    got = [h["loss"] for h in res.fit.history]
    assert got == pytest.approx(STORED, rel=1e-4)
    assert "eval_step_accuracy" in res.eval_metrics and "eval_localization_min" in res.eval_metrics
    # transformers' own forward of the saved model (eval mode) gives the scorer's step scores
    final = res.final_dir
    hf = AutoModelForTokenClassification.from_pretrained(final).eval()
    scorer = StepScorer(str(final), tokenizer=world_tokenizer(), device="cpu")
    steps = ["12 + 18 = 30", "#### 30"]
    e = encode_steps(world_tokenizer(), "Sam has 12. He finds 18. How many?", steps, delimiter="\n")
    with torch.no_grad():
        logits = hf(torch.tensor([e.input_ids])).logits[0, :, 0]
    want = torch.sigmoid(logits[e.step_ends]).tolist()
    got = scorer.step_scores(["Sam has 12. He finds 18. How many?"], ["12 + 18 = 30\n#### 30"])[0]
    assert got == pytest.approx(want, abs=1e-6)
    assert scorer.solution_scores(["Sam has 12. He finds 18. How many?"], ["12 + 18 = 30\n#### 30"],
                                  "min")[0] == pytest.approx(min(want), abs=1e-6)


def test_monte_carlo_labels_end_to_end(tmp_path):
    """labels.source=mc with a tiny random policy and a reward that is 1 for every completion: every
    MC label is 1 (k successes); the final step is graded without sampling; the labels are saved."""
    res = run_prm(_cfg(tmp_path / "r", **{"labels.source": "mc", "labels.policy": "unused", "labels.k": 3,
                                          "labels.functions": "[tests.test_prm:always_right]",
                                          "labels.max_new_tokens": 4, "train.max_steps": 1, "train.epochs": 0,
                                          "data.eval": "null"}),
                  model=_model(), tokenizer=world_tokenizer(), policy=tiny_model("llama", hidden=32),
                  log=lambda s: None)
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "step_labels.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    assert all(r["labels"] == [1.0] * len(r["completions"]) and r["mc_successes"] == [3] * len(r["completions"])
               for r in rows)
    assert "gold_labels" in rows[0] and res.label_stats["mean_label"] == 1.0
    # gold agreement = the share of gold-true steps
    gold = [g for r in rows for g in r["gold_labels"]]
    assert res.label_stats["hard_agreement_with_gold"] == pytest.approx(sum(gold) / len(gold))


def always_right(prompts, completions, **_):
    return [1.0] * len(completions)


def test_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="labels.policy is not set"):
        load_config(PRMConfig, None, ["labels.source=mc"])
    # records without labels under labels.source=given
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"prompt": "q", "completions": ["a", "b"]}) + "\n")
    with pytest.raises(DataError, match=r"s.jsonl, line 1.*no step labels"):
        run_prm(_cfg(tmp_path / "r", **{"data.train": str(p), "data.eval": "null"}), model=_model(),
                tokenizer=world_tokenizer(), log=lambda s: None)
    # a delimiter that never occurs
    p.write_text(json.dumps({"prompt": "q", "completions": "step one. step two.", "labels": [1]}) + "\n")
    with pytest.raises(DataError, match=r"data.delimiter='\\n' occurs in none"):
        run_prm(_cfg(tmp_path / "r2", **{"data.train": str(p), "data.eval": "null"}), model=_model(),
                tokenizer=world_tokenizer(), log=lambda s: None)
    p.write_text(json.dumps({"prompt": "q", "completions": "step one\nstep two", "labels": [1]}) + "\n")
    with pytest.raises(DataError, match=r"1 labels for the 2 steps"):
        run_prm(_cfg(tmp_path / "r5", **{"data.train": str(p), "data.eval": "null"}), model=_model(),
                tokenizer=world_tokenizer(), log=lambda s: None)
    # label count and range
    p.write_text(json.dumps({"prompt": "q", "completions": ["a", "b"], "labels": [1]}) + "\n")
    with pytest.raises(DataError, match="one label per step"):
        run_prm(_cfg(tmp_path / "r3", **{"data.train": str(p), "data.eval": "null"}), model=_model(),
                tokenizer=world_tokenizer(), log=lambda s: None)
    p.write_text(json.dumps({"prompt": "q", "completions": ["a"], "labels": [1.5]}) + "\n")
    with pytest.raises(DataError, match=r"labels\[0\].*\[0, 1\]"):
        run_prm(_cfg(tmp_path / "r4", **{"data.train": str(p), "data.eval": "null"}), model=_model(),
                tokenizer=world_tokenizer(), log=lambda s: None)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prm_runs_from_the_command_line(capsys, tmp_path, arch):
    from transformers import AutoModelForTokenClassification

    d = tmp_path / "base"
    tiny_model(arch, hidden=32).save_pretrained(d)
    world_tokenizer().save_pretrained(d)
    out = tmp_path / "run"
    code = main(["prm", f"model.name_or_path={d}", f"train.output_dir={out}", "train.progress=false",
                 "data.world_examples=8", "data.world_eval_examples=4", "train.micro_batch_size=4"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "done: 2 steps" in printed.out and "eval_step_accuracy" in printed.out
    m = AutoModelForTokenClassification.from_pretrained(out / "final")
    assert m.config.model_type == arch and m.config.num_labels == 1


# --------------------------------------------------------------------------- process rewards in the online loop


class _FixedScorer:
    """A StepScorer whose step scores are given: encoding is the real one (world tokenizer, '\\n')."""

    def __init__(self, scores):
        from posttrain.rewards.process import StepScorer

        self.tokenizer, self.delimiter, self._scores = world_tokenizer(), "\n", scores
        self.encode = StepScorer.encode.__get__(self)

    def score(self, examples):
        return [list(s) if e is not None else [] for e, s in zip(examples, self._scores)]


def test_process_token_rewards_by_hand():
    from posttrain.rewards.process import process_token_rewards

    tok = world_tokenizer()
    text = "12 + 18 = 30\n#### 30"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    e = encode_steps(tok, "How many?", ["12 + 18 = 30", "#### 30"], delimiter="\n")
    n_prompt = len(e.input_ids) - len(ids) + 1
    ends = [x - n_prompt for x in e.step_ends]
    got, bad = process_token_rewards(_FixedScorer([[0.9, 0.6]]), ["How many?"], [ids], mode="delta")
    want = [0.0] * len(ids)
    want[ends[0]], want[ends[1]] = 0.9 - 0.5, 0.6 - 0.9
    assert bad == 0 and got[0] == pytest.approx(want)
    assert sum(got[0]) == pytest.approx(0.6 - 0.5)  # delta telescopes to s_last - 0.5
    got, _ = process_token_rewards(_FixedScorer([[0.9, 0.6]]), ["How many?"], [ids], mode="step")
    want[ends[0]], want[ends[1]] = 0.9, 0.6
    assert got[0] == pytest.approx(want)
    # ids that decode to the same text but are not its encoding: the step rewards go to the last token
    pieces = [t for ch in "12 + 18 = 30\n#### 30" for t in tok(ch, add_special_tokens=False)["input_ids"]]
    assert pieces != ids[:-1] and tok.decode(pieces) == text
    got, bad = process_token_rewards(_FixedScorer([[0.9, 0.6]]), ["How many?"], [pieces], mode="delta")
    assert bad == 1 and got[0][-1] == pytest.approx(0.1) and not any(got[0][:-1])
    # a completion with no text has no steps and no process reward
    got, _ = process_token_rewards(_FixedScorer([[]]), ["How many?"], [[tok.eos_token_id]], mode="delta")
    assert got == [[0.0]]


def test_ppo_with_process_rewards_adds_them_to_the_returns(tmp_path):
    """ppo (gamma = lambda = 1, no KL, no whitening; the critic's zero head gives V = 0 in iteration 1):
    every token's return is the sequence reward plus the process rewards from that token on, and
    the process rewards of a completion sum to its last step score - 0.5 (delta mode)."""
    from posttrain.algorithms.rl import RLConfig, run_rl
    from posttrain.rewards.process import StepScorer

    prm_dir = tmp_path / "prm"
    m = _model()
    torch.nn.init.normal_(m.score.weight, std=0.5)  # scores that differ from 0.5
    m.save_pretrained(prm_dir)
    world_tokenizer().save_pretrained(prm_dir)
    cfg = load_config(RLConfig, None, [
        "algorithm=ppo", f"train.output_dir={tmp_path / 'rl'}", "train.max_steps=1", "train.progress=false",
        "data.world_examples=8", "data.eval=null", "rollout.prompts_per_step=2", "rollout.group_size=2",
        "rollout.max_new_tokens=12", "reward.functions=[tests.test_rl:digit_reward]", "rollout.samples_every=1",
        f"reward.process_reward_model={prm_dir}", "reward.process_weight=0.5", "loss.kl_beta=0", "loss.lam=1",
        "loss.whiten_advantages=false"])
    res = run_rl(cfg, model=tiny_model("llama", hidden=32), tokenizer=world_tokenizer(), log=lambda s: None)
    assert "process/reward_sum" in res.fit.history[0]
    rows = [json.loads(x) for x in (tmp_path / "rl" / "samples.jsonl").read_text().splitlines()]
    scorer = StepScorer(str(prm_dir), device="cpu")
    for r in rows:
        proc = r["process_rewards"]
        want = [r["reward"] + 0.5 * sum(proc[t:]) for t in range(len(proc))]
        assert r["returns"] == pytest.approx(want, abs=1e-5)
        steps = scorer.step_scores([r["prompt"]], [r["completion"]])[0]
        assert sum(proc) == pytest.approx(steps[-1] - 0.5 if steps else 0.0, abs=1e-5)
    assert any(any(r["process_rewards"]) for r in rows)


def test_process_reward_config_errors():
    from posttrain.algorithms.rl import RLConfig

    with pytest.raises(ConfigError, match="gives one advantage per sequence"):
        load_config(RLConfig, None, ["algorithm=grpo", "reward.process_weight=1", "reward.process_reward_model=x"])
    with pytest.raises(ConfigError, match="reward.process_reward_model is not set"):
        load_config(RLConfig, None, ["algorithm=ppo", "reward.process_weight=1"])


def test_prm_reward_function_scores_whole_solutions(tmp_path):
    from posttrain.rewards import resolve_reward_functions
    from posttrain.rewards.process import StepScorer

    d = tmp_path / "prm"
    m = _model()
    torch.nn.init.normal_(m.score.weight, std=0.5)
    m.save_pretrained(d)
    world_tokenizer().save_pretrained(d)
    [fn] = resolve_reward_functions(["prm"], None, options={"process_reward_model": str(d),
                                                            "process_aggregation": "product"})
    prompts, comps = ["How many?", "How many?"], ["12 + 18 = 30\n#### 30", ""]
    got = fn.fn(prompts, comps)
    steps = StepScorer(str(d), device="cpu").step_scores(prompts[:1], comps[:1])[0]
    assert got[0] == pytest.approx(math.prod(steps), rel=1e-5) and len(steps) == 2
    assert got[1] is None  # no steps: no score (counted as invalid by the loop)
    with pytest.raises(ConfigError, match="process_reward_model is not set"):
        resolve_reward_functions(["prm"], None, options={})
