"""Deterministic training plans: the micro-batches of every optimizer step, fixed up front.

Per epoch a method lists its *units* in order (examples, packed rows of examples, preference
pairs, K-sets) using a random generator seeded by the plan's tag, seed and the epoch; units
form micro-batches of ``micro_batch_size`` and ``grad_accum`` micro-batches form one optimizer
step. The plan is a list of index lists, so resuming at step ``s`` replays exactly what an
uninterrupted run would see, and its fingerprint (stored in every checkpoint) detects a
resume with different data or batching.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable

from ..errors import ConfigError, DataError

MAX_PLAN_STEPS = 10_000_000  # the plan is materialized up front; beyond this it would not fit in memory


class StepPlan:
    """Implements the engine's plan protocol (``num_steps``, ``batches``, ``fingerprint``).

    ``epoch_units(epoch, rng)`` returns the epoch's units in training order (JSON-serializable
    index structures); ``collate(units)`` builds one micro-batch; ``content()`` yields the data
    the units index into (hashed into the fingerprint).
    """

    def __init__(self, *, n_items: int, epoch_units: Callable[[int, random.Random], list],
                 collate: Callable[[list], dict], content: Callable[[], Iterable], micro_batch_size: int,
                 grad_accum: int, epochs: float, max_steps: int, seed: int, tag: str, extra: list | None = None):
        if n_items == 0:
            raise DataError("No training examples are left after encoding.",
                            fix="check the data file and data.max_length / data.overlong.")
        self.epoch_units = epoch_units
        self.collate = collate
        self.content = content
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.tag = tag
        self.extra = extra or []
        first = self._epoch(0)
        self.steps_per_epoch = len(first)
        total = max_steps or max(1, round(self.steps_per_epoch * epochs))
        if total > MAX_PLAN_STEPS:
            raise ConfigError(
                f"The run would take {total:,} optimizer steps ({self.steps_per_epoch:,} per epoch; train.epochs="
                f"{epochs}, train.max_steps={max_steps}), more than posttrain plans ({MAX_PLAN_STEPS:,}).",
                fix="lower train.epochs or train.max_steps.")
        steps: list[list[list]] = list(first)
        epoch = 1
        while len(steps) < total:
            steps.extend(self._epoch(epoch))
            epoch += 1
        self.steps = steps[:total]

    def _epoch(self, epoch: int) -> list[list[list]]:
        units = self.epoch_units(epoch, random.Random(f"{self.tag}-plan-{self.seed}-{epoch}"))
        micro = [units[i : i + self.micro_batch_size] for i in range(0, len(units), self.micro_batch_size)]
        return [micro[i : i + self.grad_accum] for i in range(0, len(micro), self.grad_accum)]

    def num_steps(self) -> int:
        return len(self.steps)

    def batches(self, step: int) -> list[dict]:
        return [self.collate(mb) for mb in self.steps[step]]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.tag, self.micro_batch_size, self.grad_accum, self.seed, self.extra,
                             self.steps]).encode())
        for item in self.content():
            h.update(json.dumps(item).encode())
        return h.hexdigest()[:16]
