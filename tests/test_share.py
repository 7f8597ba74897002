"""The data-parallel share of a step's micro-batches (``posttrain.train.plan.share_layout``): its
layouts by hand for 1, 2 and 3 processes; online DPO and on-policy distillation under a simulated
world of 2 (each rank's plan called in one process): the ranks' real micro-batches are the
single-process ones, split r::N, each rank doing its half, and the zero-weight copies that even
out a short share count nothing, so the step's totals, loss, metrics and gradient are the
single-process ones."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from posttrain.algorithms import online_dpo as od
from posttrain.algorithms.distill import DistillLossConfig, OnPolicyPlan, TokenKDAlgorithm
from posttrain.algorithms.sft import SFTPlan
from posttrain.rollout import HFSampler
from posttrain.train.plan import share_layout

from .test_online_dpo import _cfg, _run
from .tiny import sft_examples, tiny_model, world_tokenizer

# --------------------------------------------------------------------------- the layout by hand


def test_share_layout_by_hand():
    five = [[0, 1], [2, 3], [4]]
    # one process: everything, as it is
    assert share_layout(five, 0, 1) == five
    # 2 processes, 3 micro-batches: rank 1's share is one short, so it gets a zero-weight copy of item 0
    assert share_layout(five, 0, 2) == [[0, 1], [4]]
    assert share_layout(five, 1, 2) == [[2, 3], [~0]]
    # 3 processes, 3 micro-batches: one each, no copy
    assert [share_layout(five, r, 3) for r in range(3)] == [[[0, 1]], [[2, 3]], [[4]]]
    # 3 processes, 4 micro-batches: padded to 6 with copies of items 0 and 1 (ranks 1 and 2 are short)
    four = [[0], [1], [2], [3]]
    assert [share_layout(four, r, 3) for r in range(3)] == [[[0], [3]], [[1], [~0]], [[2], [~1]]]
    # 2 processes, 5 micro-batches: rank 1 gets 2 real ones and a copy
    assert [share_layout([[i] for i in range(5)], r, 2) for r in range(2)] == [[[0], [2], [4]], [[1], [3], [~0]]]
    # fewer micro-batches than processes: the 4 items re-split into 3 (split_even), no copy
    assert [share_layout([[0, 1, 2], [3]], r, 3) for r in range(3)] == [[[0, 1]], [[2]], [[3]]]
    # fewer items than processes: one item each, the process left over gets a copy of the first item
    assert [share_layout([[5, 7]], r, 3) for r in range(3)] == [[[5]], [[7]], [[~5]]]
    assert [share_layout([[5]], r, 3) for r in range(3)] == [[[5]], [[~5]], [[~5]]]
    for bad in ([], [[]], [[0, -1]]):
        with pytest.raises(ValueError):
            share_layout(bad, 0, 2)
    with pytest.raises(ValueError):
        share_layout(five, 2, 2)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("sizes", [[3], [2, 2, 1], [1, 1, 1, 1, 1], [4, 4, 4, 4, 4, 4, 1]])
def test_share_layout_covers_every_item_once_with_equal_shares(world, sizes):
    micro, n = [], 0
    for s in sizes:
        micro.append(list(range(n, n + s)))
        n += s
    shares = [share_layout(micro, r, world) for r in range(world)]
    assert [len(s) for s in shares] == [math.ceil(len(micro) / world)] * world  # the same passes everywhere
    real = sorted(i for s in shares for mb in s for i in mb if i >= 0)
    assert real == list(range(n))                                    # every item once
    for s in shares:
        for mb in s:                                                 # a copy is one item, never mixed
            assert all(i >= 0 for i in mb) or (len(mb) == 1 and 0 <= ~mb[0] < n)
    if len(micro) >= world:                                          # the micro-batches themselves, r::N
        assert [mb for r in range(world) for mb in shares[r] if mb[0] >= 0] == \
            [mb for r in range(world) for mb in micro[r::world]]


# --------------------------------------------------------------------------- one step, summed over ranks


def _step(algo, model, ranks: list[list[dict]]):
    """What the engine computes for one step whose processes hold ``ranks`` (micro-batch lists): the
    totals summed over every process, the summed loss and metrics, and the summed gradient."""
    totals: dict[str, float] = {}
    for b in (b for r in ranks for b in r):
        for k, v in algo.counts(b).items():
            totals[k] = totals.get(k, 0) + v
    totals_t = {k: torch.tensor(float(v)) for k, v in totals.items()}
    model.zero_grad(set_to_none=True)
    loss, metrics = 0.0, {}
    for b in (b for r in ranks for b in r):
        part, m = algo.loss(model, b, totals_t)
        part.backward()
        loss += float(part.detach())
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return totals, loss, metrics, grads


def _same_step(a, b):
    assert a[0] == b[0]                                             # counts: exact
    assert a[1] == pytest.approx(b[1], rel=1e-6, abs=1e-7)
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        assert a[2][k] == pytest.approx(b[2][k], rel=1e-6, abs=1e-7), k
    torch.testing.assert_close(a[3], b[3], rtol=1e-5, atol=1e-7)


def _equal_batches(x: dict, y: dict):
    assert x.keys() - {"zero_weight"} == y.keys() - {"zero_weight"}
    for k in y:
        if k == "zero_weight":
            continue
        if isinstance(y[k], torch.Tensor):
            assert torch.equal(x[k], y[k]), k
        else:
            assert x[k] == y[k], k


def _zero_copy_adds_nothing(algo, model, batch: dict, totals: dict):
    """A zero-weight copy: no counts; loss and metrics exactly 0; the gradient exactly 0."""
    assert batch.get("zero_weight") and set(algo.counts(batch).values()) == {0}
    model.zero_grad(set_to_none=True)
    loss, m = algo.loss(model, batch, {k: torch.tensor(float(v)) for k, v in totals.items()})
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(float(v) == 0.0 for v in m.values())
    assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------- online DPO


class _Captured(Exception):
    pass


def _online_dpo_plan(tmp_path, monkeypatch, **overrides):
    """The plan and algorithm run_online_dpo builds (it stops at the engine)."""
    def capture(model, algo, plan, *args, **kwargs):
        raise _Captured(model, algo, plan)

    monkeypatch.setattr(od, "fit", capture)
    model = tiny_model("llama", seed=0, hidden=32)
    with pytest.raises(_Captured) as e:
        _run(_cfg(tmp_path, **overrides), model)
    return e.value.args


@pytest.mark.parametrize("pairs,micro_batch_size,rank_pairs", [(4, 1, [2, 2]), (5, 2, [3, 2])])
def test_online_dpo_ranks_train_their_share_of_the_single_process_step(tmp_path, monkeypatch, pairs,
                                                                       micro_batch_size, rank_pairs):
    """4 pairs in micro-batches of 1: 2 each. 5 pairs in micro-batches of 2 ([2, 2, 1]): rank 0 trains
    the first and the last, rank 1 the second and a zero-weight copy of the step's first pair."""
    short = pairs % (2 * micro_batch_size) != 0
    model, algo, plan = _online_dpo_plan(tmp_path, monkeypatch, **{
        "rollout.prompts_per_step": pairs, "online.steps_per_rollout": 1, "train.micro_batch_size": micro_batch_size,
        "train.max_steps": 1})
    assert plan.world == 1
    single = plan.batches(0)  # samples and pairs the iteration (once: the ranks below reuse its pairs)
    assert len(plan.units) == pairs
    n_micro = math.ceil(pairs / micro_batch_size)
    assert len(single) == n_micro
    ranks = []
    for rank in (0, 1):
        plan.rank, plan.world = rank, 2
        ranks.append(plan.batches(0))
    # every rank runs the same number of passes, half the single process's (rounded up)
    assert [len(r) for r in ranks] == [math.ceil(n_micro / 2)] * 2
    # the real micro-batches are the single-process ones, r::2; a short share ends with a copy of pair 0
    assert [b.get("zero_weight", False) for r in ranks for b in r] == [False] * n_micro + [True] * short
    for rank, r in enumerate(ranks):
        for x, y in zip(r, single[rank::2]):
            _equal_batches(x, y)
    assert [sum(algo.counts(b)["units"] for b in r) for r in ranks] == rank_pairs
    if short:
        copy_ = ranks[1][-1]
        first = plan.collate_units([plan.units[plan.micro_batch_layout(0, 0)[0][0]]])
        _equal_batches(copy_, first)
        _zero_copy_adds_nothing(algo, model, copy_, {k: sum(algo.counts(b)[k] for b in single)
                                                      for k in algo.counts(single[0])})
    # the step: the same totals (exact), loss, metrics and gradient as the single process
    _same_step(_step(algo, model, ranks), _step(algo, model, [single]))


# --------------------------------------------------------------------------- on-policy distillation


def _on_policy(base, student):
    tok = world_tokenizer()
    return OnPolicyPlan(base, model=student, tokenizer=tok, fraction=1.0, max_new_tokens=8, temperature=1.0, seed=0,
                        packing=True, row_length=160, pad_token_id=tok.pad_token_id)


def _sft_plan(examples, grad_accum, rank=0, world=1):
    return SFTPlan(examples, micro_batch_size=1, grad_accum=grad_accum, epochs=0, max_steps=2, packing=True,
                   row_length=160, pad_token_id=world_tokenizer().pad_token_id, seed=0, rank=rank, world=world)


@pytest.mark.parametrize("uneven", [False, True])
def test_on_policy_distill_ranks_sample_and_train_their_share(monkeypatch, uneven):
    """Each rank samples only the examples of its micro-batches (seeded by their positions in the
    whole step): the same completions, micro-batches and step as one process. ``uneven``: 3
    micro-batches per step over 2 ranks (the SFT plan itself gives every step a multiple of N; here
    the steps are set by hand), so rank 1 ends with a zero-weight copy."""
    examples = sft_examples(24)
    student, teacher = tiny_model("llama", seed=0, hidden=32), tiny_model("llama", seed=1, hidden=32)
    algo = TokenKDAlgorithm(teacher, DistillLossConfig(mode="on_policy", divergence="reverse_kl"))
    n_micro = 3 if uneven else 4
    single_base = _sft_plan(examples, grad_accum=n_micro)
    if uneven:
        bases = []
        for rank in (0, 1):
            b = copy.copy(single_base)
            b.rank, b.world = rank, 2
            bases.append(b)
    else:  # the real 2-process configuration: accumulation 2 on each of 2 processes
        bases = [_sft_plan(examples, grad_accum=2, rank=rank, world=2) for rank in (0, 1)]
        assert [b.steps for b in bases] == [single_base.steps] * 2
    sampled = []
    original = HFSampler.generate

    def counting(self, reqs, sampling):
        sampled.append([r.group_id for r in reqs])
        return original(self, reqs, sampling)

    monkeypatch.setattr(HFSampler, "generate", counting)
    single = _on_policy(single_base, student).batches(0)
    ranks = [_on_policy(b, student).batches(0) for b in bases]
    # the examples of each micro-batch, as positions in the step: one process samples them all, rank r
    # those of micro-batches r, r+2, ... (rank 1, uneven: also those of micro-batch 0, for its copy)
    positions, n = [], 0
    for mb in single_base.steps[0]:
        k = sum(len(u) for u in mb)
        positions.append(list(range(n, n + k)))
        n += k
    assert sampled[0] == list(range(n))
    assert sampled[1] == sorted(p for ps in positions[0::2] for p in ps)
    assert sampled[2] == sorted(p for ps in positions[1::2] + positions[:1] * uneven for p in ps)
    assert len(single) == n_micro
    assert [len(r) for r in ranks] == [2, 2]
    assert [b.get("zero_weight", False) for r in ranks for b in r] == [False] * n_micro + [True] * uneven
    for rank, r in enumerate(ranks):
        for x, y in zip(r, single[rank::2]):
            _equal_batches(x, y)                               # the same samples, packed the same way
    if uneven:
        _equal_batches(ranks[1][-1], single[0])
        _zero_copy_adds_nothing(algo, student, ranks[1][-1], {k: sum(algo.counts(b)[k] for b in single)
                                                               for k in algo.counts(single[0])})
    _same_step(_step(algo, student, ranks), _step(algo, student, [single]))
