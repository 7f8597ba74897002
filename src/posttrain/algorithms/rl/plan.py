"""The engine's plan for online RL: iterations, epochs, mini- and micro-batches, the r::N share."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random


from ...train.plan import rank_world, share_layout
from ..online.stream import derive_seed
from .loss import Sample


class RolloutPlan:
    """The engine's plan for online RL: iteration ``k`` covers optimizer steps
    ``k * E * M ... (k + 1) * E * M - 1`` (E = loss.epochs, M = loss.mini_batches). Its first step
    samples the rollout batch with the current weights; each epoch shuffles the batch's groups
    (seeded) into M mini-batches of whole groups, each split into micro-batches of
    ``micro_batch_size`` groups.

    With N processes, every process holds the whole rollout batch (each samples and scores a
    share of the groups, then they exchange them) and process r trains micro-batches r, r+N, ...
    of each optimizer step. A step with fewer micro-batches than processes has its groups
    re-split into N micro-batches; a process whose share is short (fewer groups than processes, or
    a number of micro-batches that is not a multiple of N) runs a zero-weight copy of a group, so
    every process runs the same number of forward / backward passes
    (:func:`posttrain.train.plan.share_layout`)."""

    samples_from_model = True  # the engine refuses to shard it (train.sharding)

    def __init__(self, runner, total_steps: int):
        self.r = runner
        self.total = total_steps
        self.per_iter = runner.loss.epochs * runner.loss.mini_batches
        self.iteration = -1
        self.groups: list[list[Sample]] = []
        self.last: list[dict] = []
        self.rank, self.world = rank_world()

    def num_steps(self) -> int:
        return self.total

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(["rl", self.total, self.per_iter, self.r.seed]).encode())
        for p in self.r.prompts:
            h.update(json.dumps([p.ids, p.fields], sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def micro_batch_layout(self, iteration: int, epoch: int, mb: int, n_groups: int) -> list[list[int]]:
        """The group indices of each micro-batch of mini-batch ``mb`` in ``epoch`` of ``iteration``
        (the epoch's seeded shuffle, every ``M``-th group, chunks of ``micro_batch_size``), for all
        processes (:meth:`share` gives this process its share)."""
        order = list(range(n_groups))
        random.Random(derive_seed("rl-epoch", self.r.seed, iteration, epoch)).shuffle(order)
        m = self.r.loss.mini_batches
        # dynamic sampling can keep fewer groups than mini-batches: an empty share takes the whole batch
        chosen = order[mb::m] or order
        size = self.r.micro_batch_size
        return [chosen[i:i + size] for i in range(0, len(chosen), size)]

    def share(self, micro: list[list[int]]) -> list[list[int]]:
        """This process's micro-batches of a step's ``micro`` (:func:`posttrain.train.plan.share_layout`:
        micro-batches r, r+N, ..., the same number on every process; ``~i`` (negative) stands for a
        zero-weight copy of group ``i``)."""
        return share_layout(micro, self.rank, self.world)

    def first_epoch_layout(self, iteration: int, n_groups: int) -> list[list[int]]:
        """This process's micro-batches of the first epoch, in training order."""
        out = []
        for mb in range(self.r.loss.mini_batches):
            out.extend(self.share(self.micro_batch_layout(iteration, 0, mb, n_groups)))
        return out

    def batches(self, step: int) -> list[dict]:
        k = step // self.per_iter
        if k != self.iteration:
            self.iteration = k
            self.groups = self.r.rollout(k, lambda n: self.first_epoch_layout(k, n))
        epoch, mb = divmod(step % self.per_iter, self.r.loss.mini_batches)
        layout = self.share(self.micro_batch_layout(self.iteration, epoch, mb, len(self.groups)))
        self.last = []
        for ids in layout:
            batch = self.r.collate([group_of(self.groups, i) for i in ids])
            if all(i < 0 for i in ids):  # a zero-weight copy: no work to count
                batch["num_input_tokens"] = 0
            self.last.append(batch)
        return self.last

    def probe_batches(self) -> list[dict]:
        """The engine's end-of-run probe: the last step's micro-batches (no new rollout)."""
        return self.last


def group_of(groups: list[list[Sample]], i: int) -> list[Sample]:
    """Group ``i``, or for ``~i`` a copy of it that trains nothing (zero weight)."""
    if i >= 0:
        return groups[i]
    return [dataclasses.replace(s, trained=False) for s in groups[~i]]

