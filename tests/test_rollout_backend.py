"""The rollout-backend interface: the own sampler behind it draws exactly what the sampler does,
per-request seeds and group ids decide the draws (not the batch), stop token ids and stop
strings end a row at the right token, a token sequence is continued as given, and no module
outside ``rollout/`` reaches the sampler around the interface."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from posttrain.rollout import HFSampler, RolloutRequest, SamplingParams, generate_shared, make_backend, requests
from posttrain.rollout.sampler import sample_groups

from .test_sampler import setup  # noqa: F401 (the sampler tests' tiny model, tokenizer and prompts)

SRC = Path(__file__).resolve().parents[1] / "src" / "posttrain"


def _key(rolls):
    return [(r.prompt_ids, r.completion_ids, r.log_probs, r.finished) for r in rolls]


def _draws(rolls):
    return [(r.prompt_ids, r.completion_ids, r.finished) for r in rolls]


def _same_draws(a, b):
    """The same tokens; log-probs equal up to fp32 rounding of other batch shapes (a log-softmax
    over ~400 logits of size ~6: a few ulps of 6, far below 1e-5)."""
    assert _draws(a) == _draws(b)
    for x, y in zip(a, b):
        assert x.log_probs == pytest.approx(y.log_probs, rel=0, abs=1e-5)


def test_the_own_sampler_behind_the_interface_draws_what_the_sampler_draws(setup):
    model, tok, prompts = setup
    sampling = SamplingParams(10, temperature=1.0, top_p=0.9, top_k=20, n=3, seed=11)
    got = HFSampler(model, tok).generate(requests(prompts), sampling)
    want = sample_groups(model, tok, prompts, group_size=3, max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=20,
                         seed=11)
    assert _key(got) == _key(want)
    # another batch size: the same tokens (the log-probs of other batch shapes round differently)
    small = HFSampler(model, tok, batch_size=5).generate(requests(prompts), sampling)
    assert [r.completion_ids for r in small] == [r.completion_ids for r in want]
    assert [r.prompt_index for r in got] == [i for i in range(4) for _ in range(3)]
    # in one process the shared form is the plain call; make_backend names the same backend
    assert _key(generate_shared(make_backend("hf", model, tok), requests(prompts), sampling)) == _key(want)
    with pytest.raises(ValueError, match="unknown rollout backend 'sglang'"):
        make_backend("sglang", model, tok)


def test_group_ids_and_per_request_seeds_decide_the_draws(setup):
    model, tok, prompts = setup
    backend = HFSampler(model, tok)
    sampling = SamplingParams(8, temperature=1.0, n=2, seed=5)
    full = backend.generate(requests(prompts), sampling)
    # request 2 alone, with its group id, is what it was in the whole batch
    _same_draws(backend.generate([RolloutRequest(prompts[2], group_id=2)], sampling), full[4:6])
    # a request's own seed replaces the sampling seed for it alone
    mixed = backend.generate([RolloutRequest(prompts[0], 0), RolloutRequest(prompts[1], 1, seed=99)], sampling)
    _same_draws(mixed[:2], full[:2])
    own = backend.generate([RolloutRequest(prompts[1], 1)], SamplingParams(8, temperature=1.0, n=2, seed=99))
    _same_draws(mixed[2:], own)
    assert _draws(own) != _draws(full[2:4])


def test_a_stop_token_id_ends_the_row_at_its_first_occurrence(setup):
    model, tok, prompts = setup
    backend = HFSampler(model, tok)
    free = backend.generate(requests(prompts), SamplingParams(12, temperature=0.0))
    row = next(r for r in free if len(r.completion_ids) >= 4)
    stop = row.completion_ids[2]
    cut = row.completion_ids.index(stop) + 1
    got = backend.generate([RolloutRequest(row.prompt_ids)], SamplingParams(12, temperature=0.0,
                                                                             stop_token_ids=(stop,)))[0]
    assert got.completion_ids == row.completion_ids[:cut]
    assert got.log_probs == pytest.approx(row.log_probs[:cut], abs=1e-6)
    assert got.finished and got.finish_reason == "stop"
    assert not row.finished and row.finish_reason == "length"   # a random model never says EOS in 12 tokens


def test_a_stop_string_ends_the_row_at_the_token_that_completes_it(setup):
    model, tok, prompts = setup
    backend = HFSampler(model, tok)
    free = backend.generate(requests(prompts), SamplingParams(16, temperature=0.0))
    row = max(free, key=lambda r: len(r.text))
    text = tok.decode(row.completion_ids, skip_special_tokens=False)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text
    # by hand: the shortest prefix of the free completion whose decoded text holds the string
    cut = next(k for k in range(1, len(row.completion_ids) + 1)
               if stop in tok.decode(row.completion_ids[:k], skip_special_tokens=False))
    got = backend.generate([RolloutRequest(row.prompt_ids)], SamplingParams(16, temperature=0.0, stop=(stop,)))[0]
    assert got.completion_ids == row.completion_ids[:cut] and got.finished


def test_a_token_sequence_is_continued_as_given(setup):
    """Token-in: a prompt followed by the first k greedy tokens continues with the rest of the same
    greedy completion (what a multi-turn rollout does with a conversation so far)."""
    model, tok, prompts = setup
    backend = HFSampler(model, tok)
    free = backend.generate(requests(prompts), SamplingParams(10, temperature=0.0))
    for r in free:
        k = 4
        more = backend.generate([RolloutRequest(r.prompt_ids + r.completion_ids[:k])],
                                SamplingParams(10 - k, temperature=0.0))[0]
        assert more.prompt_ids == r.prompt_ids + r.completion_ids[:k]
        assert more.completion_ids == r.completion_ids[k:]


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=0), "max_new_tokens and n must be at least 1"),
    (dict(max_new_tokens=4, n=0), "max_new_tokens and n must be at least 1"),
    (dict(max_new_tokens=4, top_p=0.0), "0 < top_p <= 1"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature >= 0"),
])
def test_sampling_params_refuse_what_no_backend_can_do(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def _imports(path: Path) -> set[str]:
    """The modules ``path`` imports, as absolute dotted names (relative imports resolved)."""
    pkg = ["posttrain", *path.relative_to(SRC).with_suffix("").parts][:-1]   # the package it lies in
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_no_module_outside_rollout_reaches_the_sampler_around_the_interface():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).parts[0] == "rollout":
            continue
        bad = {m for m in _imports(path) if m.startswith("posttrain.rollout.sampler") or m.endswith(".sample_groups")}
        if bad:
            offenders.append(f"{path.relative_to(SRC)}: {sorted(bad)}")
    assert not offenders, offenders
