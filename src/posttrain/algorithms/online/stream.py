"""Seeds and the prompt order of the sampling methods."""

from __future__ import annotations

import hashlib
import json
import math
import random


def derive_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "little") % (2**63)


def epoch_order_indices(n: int, start: int, count: int, epoch_seed) -> list[int]:
    """Positions ``start .. start+count-1`` of the endless sequence of shuffles of ``range(n)``,
    epoch ``e`` shuffled by ``random.Random(epoch_seed(e))`` (a new order per pass over the data)."""
    out, orders = [], {}
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(epoch_seed(epoch)).shuffle(orders[epoch])
        out.append(orders[epoch][i])
    return out



def refill_count(want: int, kept: int, drawn: int, rounds: int) -> int:
    """How many prompts a sampling round draws: ``want`` in the first round; in a later one (dynamic
    sampling, or pairs that need differing rewards) enough to fill the ``want - kept`` missing at
    the keep rate seen so far (taken as at least 1/4), at most ``4 * want``."""
    if rounds == 0:
        return want
    return min(4 * want, math.ceil((want - kept) / max(kept / drawn, 0.25)))


class LoopState:
    """What an online method carries between iterations, as an engine callback: the prompt cursor
    (saved in every checkpoint, so a resumed run draws the same prompts) and the iteration's
    sampling metrics, added to the first step record after the rollout (``pending``)."""

    def __init__(self):
        self.cursor = 0
        self.pending: dict | None = None

    def next_prompts(self, n_prompts: int, count: int, epoch_seed) -> list[int]:
        """The next ``count`` prompt indices of the seeded per-epoch order (:func:`epoch_order_indices`)."""
        out = epoch_order_indices(n_prompts, self.cursor, count, epoch_seed)
        self.cursor += count
        return out

    def __call__(self, record: dict) -> None:
        if self.pending is not None:
            record.update(self.pending)
            self.pending = None
            self.on_rollout_record(record)

    def on_rollout_record(self, record: dict) -> None:
        """Called with the first step record of an iteration, once its metrics are in."""

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
