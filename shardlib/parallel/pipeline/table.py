"""Compile a schedule table into the index arrays the executor scans over.

For every tick and stage: which branch runs (idle, forward, backward, with
the embedding or the loss head where the virtual stage is the first or the
last), on which microbatch and chunk, and which buffer slots hold the
activation it reads and the gradient it reads. Slots are assigned here, once,
by a free list per stage, so the buffers are exactly as large as the table
needs: m activations in flight for GPipe, p for 1F1B. A split table's B
frees the activation and takes a residual slot (what its W needs), which
the W frees. In a forward-only (eval) table each forward frees the
activation it reads, and the last virtual stage only scores its output.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from shardlib.parallel.pipeline.schedules import Schedule

(
    IDLE,
    FWD,
    FWD_FIRST,
    FWD_LAST,
    BWD,
    BWD_FIRST,
    FWD_ONLY,
    BWD_INPUT,
    BWD_INPUT_FIRST,
    WGT,
    WGT_FIRST,
    SCORE,
    SCORE_ONLY,
) = range(13)
# FWD_ONLY: a virtual stage that is both first and last (a one-stage pipeline) embeds and takes the loss.
# BWD_INPUT*, WGT*: a split table's B (input gradient, residuals saved) and W (weight gradient from them).
# SCORE, SCORE_ONLY: a forward-only (eval) table's FWD_LAST and FWD_ONLY: the loss's value, no gradient.
BRANCHES = (
    "idle",
    "forward",
    "forward+embed",
    "forward+loss",
    "backward",
    "backward+embed",
    "forward+embed+loss",
    "backward-input",
    "backward-input+embed",
    "weight-gradient",
    "weight-gradient+embed",
    "forward+loss value",
    "forward+embed+loss value",
)


@dataclasses.dataclass(frozen=True)
class TickTable:
    """Arrays of shape [ticks, stages] (int32); -1 where nothing is read or written."""

    schedule: Schedule
    branch: np.ndarray
    microbatch: np.ndarray
    chunk: np.ndarray
    act_slot: np.ndarray  # buffer slot of the activation the action reads
    grad_slot: np.ndarray  # buffer slot of the gradient the action reads (backward) or writes (forward+loss)
    recv_below_slot: np.ndarray  # where what stage s - 1 sends at the end of the tick goes
    recv_above_slot: np.ndarray  # where what stage s + 1 sends goes
    recv_self_slot: np.ndarray  # where the stage's own output goes, when its next virtual stage is local
    res_slot: np.ndarray  # residual buffer slot a split B writes and its W reads
    saved_slot: np.ndarray  # slot of the stage's residuals an F keeps for its B (executor without recomputation)
    act_slots: int
    grad_slots: int
    res_slots: int  # 0 unless the table is split
    saved_slots: int  # microbatch-chunks between F and B, at most

    @property
    def buffer_slots(self) -> int:
        """Slots of the shared activation and gradient buffer, before its scratch slot."""
        return self.act_slots + self.grad_slots

    @property
    def sends_to_itself(self) -> bool:
        return bool((self.recv_self_slot >= 0).any())


_ARRIVALS = ("recv_below_slot", "recv_above_slot", "recv_self_slot")


def _arrival_column(source: int, target: int, p: int) -> str:
    """Which of a target stage's arrival columns a send from ``source`` lands in. With p = 2 the
    stage below is the stage above; both sends then ride the one permute "below" names."""
    if source == target:
        return "recv_self_slot"
    return "recv_below_slot" if (target - source) % p == 1 else "recv_above_slot"


class _Slots:
    def __init__(self) -> None:
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
    names = ("microbatch", "chunk", "act_slot", "grad_slot", "recv_below_slot", "recv_above_slot", "recv_self_slot")
    arrays = {name: np.full(shape, -1, np.int32) for name in (*names, "res_slot", "saved_slot")}
    branch = np.full(shape, IDLE, np.int32)
    is_grad = {name: np.zeros(shape, bool) for name in _ARRIVALS}  # arrivals taking a gradient slot
    acts = [_Slots() for _ in range(p)]
    grads = [_Slots() for _ in range(p)]
    residuals = [_Slots() for _ in range(p)]
    saved = [_Slots() for _ in range(p)]
    split = schedule.split_backward
    evaluating = schedule.forward_only

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
            if action.kind in ("F", "B") and not evaluating:
                pool = saved[stage]
                arrays["saved_slot"][tick, stage] = pool.take(key) if action.kind == "F" else pool.give(key)
            if action.kind == "F":
                if k == 0:
                    branch[tick, stage] = (SCORE_ONLY if evaluating else FWD_ONLY) if k == last else FWD_FIRST
                else:
                    branch[tick, stage] = (SCORE if evaluating else FWD_LAST) if k == last else FWD
                if k > 0:  # without a backward, nothing reads the stage input again
                    arrays["act_slot"][tick, stage] = acts[stage].give(key) if evaluating else acts[stage].held[key]
                if k == last and not evaluating:  # the loss head's gradient is this stage's own incoming gradient
                    arrays["grad_slot"][tick, stage] = grads[stage].take(key)
                if k < last:
                    arrivals.append(("act", stage, k + 1, action.microbatch))
            elif action.kind == "W":
                branch[tick, stage] = WGT_FIRST if k == 0 else WGT
                arrays["res_slot"][tick, stage] = residuals[stage].give(key)
            else:
                if split:
                    branch[tick, stage] = BWD_INPUT_FIRST if k == 0 else BWD_INPUT
                    arrays["res_slot"][tick, stage] = residuals[stage].take(key)
                else:
                    branch[tick, stage] = BWD_FIRST if k == 0 else BWD
                if k > 0:  # the first virtual stage recomputes its input from the tokens
                    arrays["act_slot"][tick, stage] = acts[stage].give(key)
                arrays["grad_slot"][tick, stage] = grads[stage].give(key)
                if k > 0:
                    arrivals.append(("grad", stage, k - 1, action.microbatch))
        for kind, source, k, microbatch in arrivals:
            target, chunk = schedule.device_of(k)
            column = _arrival_column(source, target, p)
            pools = acts if kind == "act" else grads
            arrays[column][tick, target] = pools[target].take((microbatch, chunk))
            is_grad[column][tick, target] = kind == "grad"

    act_slots = max(1, max(a.size for a in acts))
    is_grad["grad_slot"] = arrays["grad_slot"] >= 0
    for name, grad in is_grad.items():  # gradient slots follow the activation slots in the shared buffer
        arrays[name] = np.where(grad, arrays[name] + act_slots, arrays[name])
    return TickTable(
        schedule,
        branch,
        **{name: arrays[name] for name in (*names, "res_slot", "saved_slot")},
        act_slots=act_slots,
        grad_slots=max(1, max(g.size for g in grads)),
        res_slots=max(r.size for r in residuals),
        saved_slots=max(s.size for s in saved),
    )
