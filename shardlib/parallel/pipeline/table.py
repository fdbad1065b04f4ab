"""Compile a schedule table into the index arrays the executor scans over.

For every tick and stage: which branch runs (idle, forward, backward, with
the embedding or the loss head where the virtual stage is the first or the
last), on which microbatch and chunk, and which buffer slots hold the
activation it reads and the gradient it reads. Slots are assigned here, once,
by a free list per stage, so the buffers are exactly as large as the table
needs: m activations in flight for GPipe, p for 1F1B.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from shardlib.parallel.pipeline.schedules import Schedule

IDLE, FWD, FWD_FIRST, FWD_LAST, BWD, BWD_FIRST, FWD_ONLY = range(7)
# FWD_ONLY: a virtual stage that is both first and last (a one-stage pipeline) embeds and takes the loss.
BRANCHES = ("idle", "forward", "forward+embed", "forward+loss", "backward", "backward+embed", "forward+embed+loss")


@dataclasses.dataclass(frozen=True)
class TickTable:
    """Arrays of shape [ticks, stages] (int32); -1 where nothing is read or written."""

    schedule: Schedule
    branch: np.ndarray
    microbatch: np.ndarray
    chunk: np.ndarray
    act_slot: np.ndarray  # activation buffer slot the action reads
    grad_slot: np.ndarray  # gradient buffer slot the action reads (backward) or writes (forward+loss)
    recv_act_slot: np.ndarray  # where the activation arriving at the end of the tick goes
    recv_grad_slot: np.ndarray  # where the gradient arriving at the end of the tick goes
    act_slots: int
    grad_slots: int


class _Slots:
    def __init__(self):
        self.free: list[int] = []
        self.size = 0
        self.held: dict[tuple[int, int], int] = {}

    def take(self, key: tuple[int, int]) -> int:
        slot = min(self.free) if self.free else self.size
        if self.free:
            self.free.remove(slot)
        else:
            self.size += 1
        self.held[key] = slot
        return slot

    def give(self, key: tuple[int, int]) -> int:
        slot = self.held.pop(key)
        self.free.append(slot)
        return slot


def compile_table(schedule: Schedule) -> TickTable:
    """Index arrays for ``schedule`` (already validated)."""
    p, v = schedule.stages, schedule.virtual
    last = p * v - 1
    shape = (schedule.ticks, p)
    arrays = {
        name: np.full(shape, -1, np.int32)
        for name in ("microbatch", "chunk", "act_slot", "grad_slot", "recv_act_slot", "recv_grad_slot")
    }
    branch = np.full(shape, IDLE, np.int32)
    acts = [_Slots() for _ in range(p)]
    grads = [_Slots() for _ in range(p)]

    for tick, row in enumerate(schedule.actions):
        # Reads happen during the tick; slots they free can take arrivals at its end.
        arrivals = []
        for stage, action in enumerate(row):
            if action is None:
                continue
            k = schedule.virtual_stage(stage, action.chunk)
            key = (action.microbatch, action.chunk)
            arrays["microbatch"][tick, stage] = action.microbatch
            arrays["chunk"][tick, stage] = action.chunk
            if action.kind == "F":
                if k == 0:
                    branch[tick, stage] = FWD_ONLY if k == last else FWD_FIRST
                else:
                    branch[tick, stage] = FWD_LAST if k == last else FWD
                if k > 0:
                    arrays["act_slot"][tick, stage] = acts[stage].held[key]
                if k == last:  # the loss head's gradient is this stage's own incoming gradient
                    arrays["grad_slot"][tick, stage] = grads[stage].take(key)
                if k < last:
                    nxt = (k + 1) % p, (action.microbatch, (k + 1) // p)
                    arrivals.append(("act", *nxt))
            else:
                branch[tick, stage] = BWD_FIRST if k == 0 else BWD
                if k > 0:  # the first virtual stage recomputes its input from the tokens
                    arrays["act_slot"][tick, stage] = acts[stage].give(key)
                arrays["grad_slot"][tick, stage] = grads[stage].give(key)
                if k > 0:
                    prev = (k - 1) % p, (action.microbatch, (k - 1) // p)
                    arrivals.append(("grad", *prev))
        for kind, stage, key in arrivals:
            pool, name = (acts, "recv_act_slot") if kind == "act" else (grads, "recv_grad_slot")
            arrays[name][tick, stage] = pool[stage].take(key)

    return TickTable(
        schedule,
        branch,
        arrays["microbatch"],
        arrays["chunk"],
        arrays["act_slot"],
        arrays["grad_slot"],
        arrays["recv_act_slot"],
        arrays["recv_grad_slot"],
        max(1, max(a.size for a in acts)),
        max(1, max(g.size for g in grads)),
    )
