"""On-policy distillation as RL: the ``teacher_logprob`` reward (posttrain.rewards.teacher) in the
online loop. Per token u_t = log p_T(y_t | .) - log p_S(y_t | .) under the sampler's tempered
distributions; sequence-level estimators train on sum_t u_t, reinforce_pp and gae place u_t at
each token.

Tolerances: the loop scores in float32 on right-padded batches, the references here in float64
on one unpadded sequence at a time. A log-prob of this 400-token vocabulary is about -6, so
float32 rounding puts each within ~1e-6 of float64 (measured: at most 5e-7 per token); a sum of
at most 12 tokens of two models is then within 2.4e-5 in the worst case and 1e-5 in practice
(measured 1.7e-6)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.algorithms.rl import RLConfig, run_rl
from posttrain.config import load_config
from posttrain.data.chat import render_prompt
from posttrain.errors import ConfigError
from posttrain.rewards import compute_rewards, resolve_reward_functions
from posttrain.rollout.sampler import sample_groups
from posttrain.world.tasks import generate_problems

from .tiny import tiny_model, world_tokenizer

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A student (seed 0) and a different teacher (seed 1), saved with the world tokenizer."""
    out = {}
    for name, seed in (("student", 0), ("teacher", 1)):
        d = tmp_path_factory.mktemp(name)
        tiny_model("llama", seed=seed, hidden=32).save_pretrained(d)
        world_tokenizer().save_pretrained(d)
        out[name] = str(d)
    return out


def _rollouts(policy, n_prompts=3, group=3, max_new=12):
    tok = world_tokenizer()
    prompts = [render_prompt(tok, [{"role": "user", "content": p.question}])
               for p in generate_problems(n_prompts, seed=5)]
    return sample_groups(policy, tok, prompts, group_size=group, max_new_tokens=max_new, temperature=TEMPERATURE,
                         seed=3)


def _teacher_fn(path, policy, **options):
    options = {"teacher_model": path, "teacher_temperature": TEMPERATURE, "policy": policy, **options}
    return resolve_reward_functions(["teacher_logprob"], None, options=options, tokenizer=world_tokenizer(),
                                    device="cpu", log=None)


def _score(functions, rolls):
    return compute_rewards(functions, ["q"] * len(rolls), [r.text for r in rolls],
                           completion_ids=[r.completion_ids for r in rolls], prompt_ids=[r.prompt_ids for r in rolls],
                           finished=[r.finished for r in rolls], max_new_tokens=12)


@torch.no_grad()
def plain_u(teacher, student, prompt_ids, completion_ids, temperature=TEMPERATURE) -> list[float]:
    """log p_T - log p_S of each completion token: one unpadded float64 forward of each model."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    n = len(prompt_ids)
    lt = torch.log_softmax(teacher(input_ids=ids).logits[0].double() / temperature, -1)
    ls = torch.log_softmax(student(input_ids=ids).logits[0].double() / temperature, -1)
    return [float(lt[n - 1 + j, t] - ls[n - 1 + j, t]) for j, t in enumerate(completion_ids)]


def test_a_teacher_equal_to_the_student_scores_exactly_zero(dirs):
    """The teacher is the student's saved weights, loaded separately: every u_t is exactly 0 (both
    come from identical forward passes), so every sequence reward is 0."""
    policy = tiny_model("llama", seed=0, hidden=32)
    rolls = _rollouts(policy)
    res = _score(_teacher_fn(dirs["student"], policy, teacher_batch_size=4), rolls)
    u = res.per_token["teacher_logprob"]
    assert [len(x) for x in u] == [len(r.completion_ids) for r in rolls]
    assert all(v == 0.0 for x in u for v in x)
    assert torch.equal(res.total, torch.zeros(len(rolls))) and bool(res.valid.all())


def test_the_sequence_reward_is_the_log_ratio_of_a_plain_forward_pass(dirs):
    """A different teacher: each completion's reward equals sum_t (log p_T - log p_S) from one plain
    float64 forward pass of each model over prompt + completion (at temperature 0.7 for both), and
    the per-token values match token by token. batch_size 4 splits the 9 sequences unevenly."""
    from posttrain.models.loading import load_causal_lm

    policy = tiny_model("llama", seed=0, hidden=32)
    rolls = _rollouts(policy)
    res = _score(_teacher_fn(dirs["teacher"], policy, teacher_batch_size=4), rolls)
    teacher = load_causal_lm(dirs["teacher"], device="cpu")
    for i, r in enumerate(rolls):
        ref = plain_u(teacher, policy, r.prompt_ids, r.completion_ids)
        assert res.per_token["teacher_logprob"][i] == pytest.approx(ref, abs=2e-6)
        assert float(res.total[i]) == pytest.approx(math.fsum(ref), abs=1e-5)
    assert float(res.total.abs().max()) > 0.1  # a real difference between the two models


def _cfg(out, teacher, **overrides) -> RLConfig:
    base = {"train.output_dir": str(out), "train.max_steps": 1, "train.progress": "false", "train.lr": 1e-3,
            "data.world_examples": 20, "data.eval": "null", "rollout.prompts_per_step": 2, "rollout.group_size": 3,
            "rollout.max_new_tokens": 10, "rollout.temperature": TEMPERATURE, "rollout.samples_every": 1,
            "reward.functions": "[teacher_logprob]", "teacher.name_or_path": teacher, "loss.kl_beta": 0}
    base.update(overrides)
    return load_config(RLConfig, None, [f"{k}={v}" for k, v in base.items()])


def _whiten(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-6)


@pytest.mark.parametrize("algorithm", ["reinforce_pp", "ppo", "grpo"])
def test_the_loop_places_u_per_token_or_sums_it(dirs, tmp_path, monkeypatch, algorithm):
    """One iteration from the student; u recomputed independently from the sampled ids. reinforce_pp:
    the advantages are the whitened return-to-go of u (gamma 1; nothing at the last token but u);
    ppo: the first iteration's critic is 0 everywhere, so GAE's returns are sum_l lambda^l u_{t+l};
    grpo: one advantage per completion, the group-normalized sum of u."""
    from posttrain.models.loading import load_causal_lm

    from posttrain.rollout import HFSampler

    seen = []
    real = HFSampler.generate

    def recording(*a, **kw):
        out = real(*a, **kw)
        seen.extend(out)
        return out

    monkeypatch.setattr(HFSampler, "generate", recording)
    out = tmp_path / algorithm
    res = run_rl(_cfg(out, dirs["teacher"], algorithm=algorithm), model=tiny_model("llama", seed=0, hidden=32),
                 tokenizer=world_tokenizer(), log=lambda s: None)
    teacher, start = load_causal_lm(dirs["teacher"], device="cpu"), tiny_model("llama", seed=0, hidden=32)
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == len(seen) == 6
    u = [plain_u(teacher, start, r.prompt_ids, r.completion_ids) for r in seen]
    for rec, ref in zip(records, u):
        assert rec["reward"] == pytest.approx(math.fsum(ref), abs=1e-5)
    assert res.fit.history[0]["reward/teacher_logprob"] == pytest.approx(
        sum(math.fsum(x) for x in u) / len(u), abs=1e-5)
    if algorithm == "grpo":
        assert all("token_rewards" not in rec for rec in records)
        sums = torch.tensor([math.fsum(x) for x in u]).view(2, 3)
        want = (sums - sums.mean(1, keepdim=True)) / (sums.std(1, keepdim=True) + 1e-6)
        assert [rec["advantage"] for rec in records] == pytest.approx(want.flatten().tolist(), abs=1e-4)
        return
    for rec, ref in zip(records, u):
        assert rec["token_rewards"] == pytest.approx(ref, abs=2e-6)
    logged = [torch.tensor(rec["token_rewards"], dtype=torch.float64) for rec in records]
    if algorithm == "reinforce_pp":
        to_go = torch.cat([x.flip(0).cumsum(0).flip(0) for x in logged])
        got = torch.tensor([a for rec in records for a in rec["token_advantages"]], dtype=torch.float64)
        assert got.tolist() == pytest.approx(_whiten(to_go).tolist(), abs=1e-4)
    else:  # gae, lambda 0.95, V = 0
        for rec, x in zip(records, logged):
            want = [sum(0.95 ** (k - t) * float(x[k]) for k in range(t, len(x))) for t in range(len(x))]
            assert rec["values"] == [0.0] * len(x)
            assert rec["returns"] == pytest.approx(want, abs=1e-5)


def test_teacher_config_errors_name_the_key(dirs, tmp_path):
    """teacher_logprob without a teacher, a teacher nothing reads, a teacher of another vocabulary
    or tokenizer, and teacher_logprob outside the online loop: each one ConfigError naming the key."""
    from posttrain.world.tokenizer import train_tokenizer

    with pytest.raises(ConfigError, match="teacher.name_or_path is not set"):
        _cfg(tmp_path / "a", "null")
    with pytest.raises(ConfigError, match="no reward function reads a teacher") as e:
        _cfg(tmp_path / "b", dirs["teacher"], **{"reward.functions": "[world_correct]"})
    assert "teacher_logprob" in e.value.fix
    policy = tiny_model("llama", seed=0, hidden=32)
    wider = tmp_path / "wider"
    tiny_model("llama", seed=1, hidden=32, vocab_size=len(world_tokenizer()) + 8).save_pretrained(wider)
    with pytest.raises(ConfigError, match="teacher.name_or_path.*vocabulary"):
        _teacher_fn(str(wider), policy)
    other = tmp_path / "other"
    tiny_model("llama", seed=1, hidden=32).save_pretrained(other)
    train_tokenizer(["a few words of another corpus"] * 50, vocab_size=400).save_pretrained(other)
    with pytest.raises(ConfigError, match="tokenizer of teacher.name_or_path"):
        _teacher_fn(str(other), policy)
    with pytest.raises(ConfigError, match="only the online RL loop"):  # rft / online-dpo build rewards without one
        resolve_reward_functions(["teacher_logprob"], None, options={"teacher_model": dirs["teacher"]},
                                 tokenizer=world_tokenizer(), log=None)
