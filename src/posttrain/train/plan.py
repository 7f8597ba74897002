"""Deterministic training plans: the micro-batches of every optimizer step, fixed up front.

Per epoch a method lists its *units* in order (examples, packed rows of examples, preference
pairs, K-sets) using a random generator seeded by the plan's tag, seed and the epoch; units
form micro-batches of ``micro_batch_size`` and ``grad_accum`` micro-batches form one optimizer
step. The plan is a list of index lists, so resuming at step ``s`` replays exactly what an
uninterrupted run would see, and its fingerprint (stored in every checkpoint) detects a
resume with different data or batching (but not another number of processes with the same
number of micro-batches per step: the same run).

Data parallel (``accelerate launch`` / ``torchrun`` with N processes): the plan is the
single-process plan with ``grad_accum * N`` micro-batches per step, and each process takes every
N-th micro-batch of a step (rank r: r, r+N, ...). The engine normalizes the loss by the step's
token / sequence counts summed over all processes, so N processes with accumulation k train
exactly like one process with accumulation N*k. A step with fewer micro-batches than a
multiple of N (an epoch's last) has its units re-split into N-multiple micro-batches (the
gradient does not depend on the split); a step with fewer units than processes is refused.
The plans that build a step's micro-batches as they train (online RL, online DPO, on-policy
distillation) take each process's share with :func:`share_layout` (the same r::N split, padded
with zero-weight copies so every process runs the same number of passes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence

from ..errors import ConfigError, DataError

MAX_PLAN_STEPS = 10_000_000  # the plan is materialized up front; beyond this it would not fit in memory


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process as ``accelerate launch`` / ``torchrun`` set them
    (``RANK``, ``WORLD_SIZE``), else ``(0, 1)``."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def gather_objects(obj) -> list:
    """``obj`` from every process, in rank order (``[obj]`` in a single process). The objects
    travel between this run's own processes (``torch.distributed.all_gather_object``)."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# How long a process waits in a collective for the others (gradient sums, sample exchange, the
# barrier while rank 0 writes a checkpoint) before it fails instead of hanging. A crashed process
# ends the run sooner: the launcher (torchrun / accelerate launch) stops the others.
DIST_TIMEOUT_S = int(os.environ.get("POSTTRAIN_DIST_TIMEOUT", 1800))


def init_distributed() -> None:
    """Join the launcher's process group (gloo on CPU, nccl on GPUs) with posttrain's timeout;
    a no-op in a single process or when already joined."""
    if rank_world()[1] == 1:
        return
    import datetime

    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    if not dist.is_initialized():
        PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(seconds=DIST_TIMEOUT_S))


def write_on_main(write: Callable[..., None], *args, **kwargs) -> None:
    """Run ``write(*args, **kwargs)`` (a file write) on rank 0 only; with several processes the
    others wait until it is done, so a file that is read back next is complete for everyone."""
    rank, world = rank_world()
    if rank == 0:
        write(*args, **kwargs)
    if world > 1:
        import torch.distributed as dist

        init_distributed()
        dist.barrier()


def split_even(units: list, parts: int) -> list[list]:
    """``units`` in ``parts`` consecutive, non-empty, near-equal chunks."""
    q, r = divmod(len(units), parts)
    out, i = [], 0
    for j in range(parts):
        n = q + (j < r)
        out.append(units[i:i + n])
        i += n
    return out


def share_layout(micro_batches: Sequence[Sequence[int]], rank: int, world: int) -> list[list[int]]:
    """Process ``rank``'s micro-batches of one optimizer step, out of ``world`` processes.

    ``micro_batches`` are the step's micro-batches for all processes, in training order, each a
    list of item indices ``>= 0`` (prompt groups, pairs, packed rows ...). Process r takes every
    N-th one from r (``micro_batches[r::N]``; all of them when N = 1), and every process gets the
    same number of them, ``ceil(max(len(micro_batches), N) / N)``, so all run the same number of
    forward / backward passes:

    * a step with fewer micro-batches than processes has its items re-split into N micro-batches
      (:func:`split_even`), or, with fewer items than processes, into one item each;
    * the step's list is then padded to a multiple of N with *zero-weight copies*, the ``j``-th
      being ``[~items[j % len(items)]]`` (``~i = -i - 1``: item ``i`` again, negative), which land
      on the processes whose share is one short.

    A zero-weight copy is always a micro-batch of one item, never mixed with real ones. The method
    builds it from item ``i`` and makes it count nothing: zero loss tokens / sequences / units in
    ``counts`` and its loss and metrics multiplied by 0 (``batch["zero_weight"]``, or, in online RL,
    samples with no trained token), so its backward adds exact zeros to the gradient and the
    step's global normalizers are those of a single process.

    Example: 3 micro-batches ``[[0, 1], [2, 3], [4]]`` on 2 processes: rank 0 gets
    ``[[0, 1], [4]]``, rank 1 ``[[2, 3], [~0]]``."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of {world} processes")
    micro = [list(mb) for mb in micro_batches]
    items = [i for mb in micro for i in mb]
    if not items or any(i < 0 for i in items):
        raise ValueError(f"a step's micro-batches must hold item indices >= 0, got {micro_batches!r}")
    if len(micro) < world:
        micro = split_even(items, world) if len(items) >= world else [[i] for i in items]
    micro += [[~items[j % len(items)]] for j in range(-len(micro) % world)]
    return micro[rank::world]


def hold_out(units: list, fraction: float, *, seed: str, what: str = "training examples",
             capped: str = "") -> tuple[list, list]:
    """``data.eval_fraction``: hold out ``max(1, int(len(units) * fraction))`` of ``units`` for
    evaluation, chosen by a shuffle seeded with the string ``seed`` (the same split on every run
    and every machine). Returns ``(train, held)``, each in the units' order; refuses a split that
    leaves nothing to train on (``capped`` adds why there are so few, e.g. a max_examples key)."""
    rng = random.Random(seed)
    idx = list(range(len(units)))
    rng.shuffle(idx)
    k = max(1, int(len(idx) * fraction))
    if k >= len(idx):
        raise ConfigError(
            f"data.eval_fraction={fraction} holds out {k} of the {len(idx)} {what}{capped}, leaving none to train on.",
            fix="use more training data, a smaller data.eval_fraction (0 for no eval), or a separate data.eval file.")
    held = set(idx[:k])
    return [u for i, u in enumerate(units) if i not in held], [units[i] for i in sorted(held)]


def spread_eval_every(num_steps: int, times: int) -> int:
    """``train.eval_every`` for about ``times`` evaluations spread over ``num_steps`` steps, the last
    at the final step: ``ceil(num_steps / times)``. (The floor put a periodic evaluation a few
    steps before the final one, e.g. steps 456 and 459 of 459 for four: two points at the end of
    a curve.)"""
    return max(1, math.ceil(num_steps / max(1, times)))


class StepPlan:
    """Implements the engine's plan protocol (``num_steps``, ``batches``, ``fingerprint``).

    ``epoch_units(epoch, rng)`` returns the epoch's units in training order (JSON-serializable
    index structures); ``collate(units)`` builds one micro-batch; ``content()`` yields the data
    the units index into (hashed into the fingerprint).
    """

    def __init__(self, *, n_items: int, epoch_units: Callable[[int, random.Random], list],
                 collate: Callable[[list], dict], content: Callable[[], Iterable], micro_batch_size: int,
                 grad_accum: int, epochs: float, max_steps: int, seed: int, tag: str, extra: list | None = None,
                 rank: int | None = None, world: int | None = None):
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
        env_rank, env_world = rank_world()
        self.rank = env_rank if rank is None else rank
        self.world = env_world if world is None else world
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
        per_step = self.grad_accum * self.world
        steps = [micro[i : i + per_step] for i in range(0, len(micro), per_step)]
        if self.world > 1:
            for s, mbs in enumerate(steps):
                if len(mbs) % self.world:
                    flat = [u for mb in mbs for u in mb]
                    if len(flat) < self.world:
                        raise ConfigError(
                            f"Step {s + 1} of epoch {epoch + 1} has {len(flat)} training unit(s) for {self.world} "
                            "processes, so some process would have nothing to train on.",
                            fix="use fewer processes, or change train.micro_batch_size / train.grad_accum / the data "
                            "size so every step has at least one unit per process.")
                    parts = self.world * math.ceil(len(mbs) / self.world)
                    steps[s] = split_even(flat, parts if len(flat) >= parts else self.world)
        return steps

    def num_steps(self) -> int:
        return len(self.steps)

    def batches(self, step: int) -> list[dict]:
        """This process's micro-batches of ``step`` (all of them in a single process)."""
        return [self.collate(mb) for mb in self.steps[step][self.rank::self.world]]

    def fingerprint(self) -> str:
        """What the run trains on, step by step: the units of every optimizer step in order (not how
        they are split into micro-batches and processes, which does not change the gradient), so a
        run may resume with another number of processes N when N x train.grad_accum stays the same."""
        units = [[u for mb in step for u in mb] for step in self.steps]
        return self._hash([self.tag, self.micro_batch_size, self.grad_accum * self.world, self.seed, self.extra, units])

    def legacy_fingerprint(self) -> str:
        """The fingerprint of checkpoints written before the process-count-free one (it hashed the
        micro-batch split, train.grad_accum and the number of processes): still accepted on resume."""
        return self._hash([self.tag, self.micro_batch_size, self.grad_accum, self.seed, self.extra,
                           self.steps] + ([self.world] if self.world > 1 else []))

    def _hash(self, header: list) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(header).encode())
        for item in self.content():
            h.update(json.dumps(item).encode())
        return h.hexdigest()[:16]
