"""The rollout sampler: exact inverse-CDF draws, per-sample seeds (a rollout does not depend on
its batch), rollout log-probs equal a full forward pass, and the first token's frequencies
follow the model's distribution."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.rollout.sampler import draw_tokens, row_uniforms, sample_groups

from .tiny import tiny_model, world_tokenizer


def test_inverse_cdf_draws_follow_the_probabilities_and_skip_zero_mass():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]])
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = draw_tokens(probs.expand(n, -1), u)
    freq = torch.bincount(tokens, minlength=5).double() / n
    # binomial standard error at n = 40k is <= 0.0025: 4 sigma
    assert freq.tolist() == pytest.approx([0.5, 0.0, 0.3, 0.2, 0.0], abs=0.01)
    assert freq[1] == 0 and freq[4] == 0
    # by hand: the first token whose cumulative mass exceeds u (rows need not sum to 1)
    rows = torch.tensor([[1.0, 0.0, 3.0, 0.0]] * 4)
    assert draw_tokens(rows, torch.tensor([0.0, 0.2499, 0.25, 1.0 - 1e-16])).tolist() == [0, 0, 2, 2]


def test_row_uniforms_depend_only_on_seed_group_and_sample():
    a = row_uniforms(7, 3, 1, 5)
    assert torch.equal(a, row_uniforms(7, 3, 1, 5))
    assert torch.equal(a[:3], row_uniforms(7, 3, 1, 3))
    for other in (row_uniforms(8, 3, 1, 5), row_uniforms(7, 4, 1, 5), row_uniforms(7, 3, 0, 5)):
        assert not torch.equal(a, other)
    assert ((a >= 0) & (a < 1)).all()


@pytest.fixture(scope="module")
def setup():
    tok = world_tokenizer()
    model = tiny_model("llama", seed=3, hidden=32)
    prompts = [tok.encode(t) for t in ["Ann has 3 apples.", "How many?", "Tom buys 12 more pens.", "7 * 8 ="]]
    return model, tok, prompts


def _key(rolls):
    return [(r.prompt_index, r.completion_ids, r.finished) for r in rolls]


def test_a_rollout_does_not_depend_on_its_batch(setup):
    """The same samples whatever batch_size, and a share of the groups sampled with its global
    group ids gives exactly those groups of the whole call (what data-parallel processes do)."""
    model, tok, prompts = setup
    kw = dict(group_size=3, max_new_tokens=10, temperature=1.0, seed=11)
    full = sample_groups(model, tok, prompts, batch_size=64, **kw)
    assert _key(sample_groups(model, tok, prompts, batch_size=3, **kw)) == _key(full)
    share = sample_groups(model, tok, [prompts[1], prompts[3]], group_ids=[1, 3], batch_size=64, **kw)
    want = full[3:6] + full[9:12]
    assert [(r.completion_ids, r.finished) for r in share] == [(r.completion_ids, r.finished) for r in want]
    for a, b in zip(share, want):
        assert a.log_probs == pytest.approx(b.log_probs, abs=1e-5)
    # another seed draws other samples
    assert _key(sample_groups(model, tok, prompts, batch_size=64, **{**kw, "seed": 12})) != _key(full)


def test_rollout_log_probs_equal_a_full_forward_pass(setup):
    model, tok, prompts = setup
    temperature = 0.7
    rolls = sample_groups(model, tok, prompts, group_size=2, max_new_tokens=8, temperature=temperature, seed=0)
    with torch.no_grad():
        for r in rolls:
            ids = torch.tensor([r.prompt_ids + r.completion_ids])
            logits = model(input_ids=ids).logits[0, len(r.prompt_ids) - 1:-1].float() / temperature
            want = logits.log_softmax(-1).gather(1, torch.tensor(r.completion_ids)[:, None]).squeeze(1)
            assert r.log_probs == pytest.approx(want.tolist(), abs=1e-4)


def test_first_tokens_follow_the_model_distribution(setup):
    """Many one-token samples of one prompt: the frequencies match softmax(logits / T)."""
    model, tok, prompts = setup
    temperature = 2.0  # flatten so several tokens carry mass
    n = 4000
    rolls = sample_groups(model, tok, [prompts[0]], group_size=n, max_new_tokens=1, temperature=temperature, seed=5,
                          batch_size=n)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompts[0]])).logits[0, -1].float()
    p = (logits / temperature).softmax(-1)
    counts = torch.bincount(torch.tensor([r.completion_ids[0] for r in rolls]), minlength=p.numel()).double()
    top = torch.argsort(p, descending=True)[:5]
    for t in top.tolist():
        se = math.sqrt(float(p[t]) * (1 - float(p[t])) / n)
        assert float(counts[t]) / n == pytest.approx(float(p[t]), abs=4 * se + 1e-3), t


def test_greedy_needs_no_seed_and_is_the_argmax_path(setup):
    model, tok, prompts = setup
    a = sample_groups(model, tok, prompts, group_size=1, max_new_tokens=6, temperature=0.0, seed=1)
    b = sample_groups(model, tok, prompts, group_size=1, max_new_tokens=6, temperature=0.0, seed=2)
    assert _key(a) == _key(b)
    with torch.no_grad():
        for r in a:
            ids = list(r.prompt_ids)
            for t in r.completion_ids:
                assert int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()) == t
                ids.append(t)


def test_group_ids_must_match_the_prompts(setup):
    model, tok, prompts = setup
    with pytest.raises(ValueError, match="group_ids has 1 entries for 4 prompts"):
        sample_groups(model, tok, prompts, group_size=1, max_new_tokens=2, group_ids=[0])
