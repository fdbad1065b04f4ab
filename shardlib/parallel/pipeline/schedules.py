"""Pipeline schedules as data: for every tick and every stage, what runs.

A schedule is a table ``actions[tick][stage]``: ``None`` (idle) or an
``Action`` (forward or backward of one microbatch on one of the stage's
virtual chunks). One executor (``shardlib.parallel.pipeline.executor``) runs any table,
so a new schedule is a new table, not new code.

Placement: where each virtual stage runs. ``loop`` (Megatron's interleaving):
virtual stage k is chunk k // p of device k % p, so microbatches loop through
the devices v times. ``v`` (the V of ZB-V, two chunks): virtual stage k < p
is chunk 0 of device k, and k >= p is chunk 1 of device 2p - 1 - k, so a
microbatch goes down the devices and back up; the turn at device p - 1, and
the loss on device 0 beside the embedding, need no send.

Each schedule but ZB-V is given by the order in which every stage wants to run
its actions; ``simulate`` turns those orders into a table by running each
stage's next action at the first tick its inputs exist. ZB-V places whole
microbatches at once, V by V (``zb_v``). Data moves between stages at the end
of a tick, so an output made at tick t is usable from tick t + 1.

Tick = one forward or one backward of one chunk. Counting a backward as one
tick (the same cost as a forward) is the convention under which the classic
bubble formulas hold: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v*m+p-1) for
interleaved 1F1B with v chunks per stage.

Zero-bubble schedules (Qi et al., "Zero Bubble Pipeline Parallelism", 2023)
split each backward in two: B, the gradient with respect to the stage's
input, which the previous stage waits for, and W, the gradient with respect
to the stage's weights, which nothing waits for and so fills the bubbles.
A table with W actions is a split table: its B actions are the input
gradient only. Counting F, B and W as one tick each, the paper's ZB-H1
bubble (p-1)(T_F + T_B - T_W) is (p-1)/(3m+p-1) of the step, a third of
1F1B's, at 1F1B's count of microbatches in flight.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from fractions import Fraction
from typing import Literal, cast

Kind = Literal["F", "B", "W"]
Placement = Literal["loop", "v"]


def virtual_stage_of(placement: Placement, p: int, stage: int, chunk: int) -> int:
    """Virtual stage (position in the layer order) of ``chunk`` on device ``stage``."""
    if placement == "v":
        return stage if chunk == 0 else 2 * p - 1 - stage
    return chunk * p + stage


def device_of(placement: Placement, p: int, k: int) -> tuple[int, int]:
    """(stage, chunk) that runs virtual stage ``k``: the inverse of ``virtual_stage_of``."""
    if placement == "v":
        return (k, 0) if k < p else (2 * p - 1 - k, 1)
    return k % p, k // p


@dataclasses.dataclass(frozen=True, order=True)
class Action:
    """Forward (F), backward (B) or weight gradient (W, split tables only) of ``microbatch``
    through chunk ``chunk`` of a stage."""

    kind: Kind
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule over ``stages`` devices, ``microbatches`` microbatches and
    ``virtual`` chunks per device. Virtual stage ``chunk * stages + stage`` is chunk
    ``chunk`` of device ``stage``: the model's layers run through virtual stages
    0, 1, ..., stages * virtual - 1 in order.
    """

    name: str
    stages: int
    microbatches: int
    virtual: int
    actions: tuple[tuple[Action | None, ...], ...]  # [tick][stage]
    placement: Placement = "loop"

    @property
    def ticks(self) -> int:
        return len(self.actions)

    def virtual_stage(self, stage: int, chunk: int) -> int:
        return virtual_stage_of(self.placement, self.stages, stage, chunk)

    def device_of(self, k: int) -> tuple[int, int]:
        """(stage, chunk) that runs virtual stage ``k``."""
        return device_of(self.placement, self.stages, k)

    def cross_device_boundaries(self) -> int:
        """Of the p v - 1 boundaries between consecutive virtual stages, those between two devices:
        each microbatch sends across them once each way (a V turns, and ends, on one device)."""
        return cross_device_boundaries(self.placement, self.stages, self.virtual)

    @property
    def forward_only(self) -> bool:
        """Whether the table runs forwards alone (an eval step's, ``forward_only``)."""
        return all(a is None or a.kind == "F" for row in self.actions for a in row)

    @property
    def split_backward(self) -> bool:
        """Whether backwards are split into B (input gradient) and W (weight gradient) actions."""
        return any(a is not None and a.kind == "W" for row in self.actions for a in row)

    def bubble_fraction(self) -> Fraction:
        """Idle (tick, stage) slots over all slots."""
        idle = sum(a is None for row in self.actions for a in row)
        return Fraction(idle, self.ticks * self.stages)

    def expected_bubble(self) -> Fraction:
        """The schedule family's formula, one tick per action: (p-1) / (v*m + p-1), or for a split
        table (p-1) / (3vm + p-1): ZB-H1's (p-1)(T_F + T_B - T_W) with T_F = T_B = T_W, and for
        ZB-V the p - 1 ticks of one chunk that a synchronous step's fill leaves each stage (the
        paper's "zero bubble" counts none: it overlaps them with the next step's). ZB-H1 with
        m < p has no W to fill stage 0's wait for its first B (tick 2p - 1, after m forwards):
        2m + 2p - 1 ticks, GPipe's and 1F1B's makespan."""
        p, m, v = self.stages, self.microbatches, self.virtual
        if not self.split_backward:
            return Fraction(p - 1, v * m + p - 1)
        ticks = 3 * v * m + p - 1 if v > 1 else 2 * m + p - 1 + max(m, p)
        return Fraction(ticks - 3 * v * m, ticks)

    def action_cost(self, stage: int, action: Action, costs: dict[str, Fraction], head: Fraction) -> Fraction:
        """What ``action`` costs on ``stage``: ``costs`` by kind, plus ``head`` (the loss head's
        forward and backward) for a forward of the last virtual stage, which runs the loss."""
        last = action.kind == "F" and self.virtual_stage(stage, action.chunk) == self.stages * self.virtual - 1
        return costs[action.kind] + (head if last else 0)

    def lockstep_time(self, costs: dict[str, Fraction], head: Fraction = Fraction(0)) -> tuple[Fraction, Fraction]:
        """(step time, bubble) when every stage starts each tick together, as an SPMD step's
        per-tick permutes make them: a tick lasts as long as its slowest action (``costs`` per
        kind, in any unit; ``head`` on the loss's forward, ``action_cost``), and the bubble is the
        idle share of p times that step time. With equal costs and no head this is
        ``bubble_fraction``; with a backward dearer than a forward, ticks that mix the two idle
        the stages running forwards."""
        time = sum(
            (
                max((self.action_cost(s, a, costs, head) for s, a in enumerate(row) if a), default=Fraction(0))
                for row in self.actions
            ),
            Fraction(0),
        )
        work = sum(
            (self.action_cost(s, a, costs, head) for row in self.actions for s, a in enumerate(row) if a), Fraction(0)
        )
        return time, 1 - work / (self.stages * time)

    def ideal_time(self, costs: dict[str, Fraction], head: Fraction = Fraction(0)) -> Fraction:
        """The table's ideal step: each stage runs its column in order, each action as soon as the
        actions it depends on have finished, without ticks (asynchronously, at ``action_cost``):
        the busiest stage's work plus the fill the table's dependencies force on it. What a
        lockstep step (``lockstep_time``) would take if no tick waited for a slower stage."""
        p, v, where = self.stages, self.virtual, self.placement
        free = [Fraction(0)] * p
        finished: dict[tuple[int, Action], Fraction] = {}
        for row in self.actions:  # a dependency always sits on an earlier tick
            for stage, action in enumerate(row):
                if action is None:
                    continue
                deps = _dependencies(action, stage, p, v, where)
                start = max([free[stage], *(finished[d] for d in deps)])
                finished[(stage, action)] = free[stage] = start + self.action_cost(stage, action, costs, head)
        return max(free)

    def max_in_flight(self) -> int:
        """Most microbatch-chunks any stage holds activations for: forward done, backward not (or,
        in a split table, weight gradient not: the weight gradient still needs them)."""
        done = "W" if self.split_backward else "B"
        worst = 0
        for stage in range(self.stages):
            live = 0
            for row in self.actions:
                action = row[stage]
                if action is not None and action.kind in ("F", done):
                    live += 1 if action.kind == "F" else -1
                    worst = max(worst, live)
        return worst

    def format(self) -> str:
        """The table as text: one row per stage, one column per tick."""
        width = max((len(str(a)) for row in self.actions for a in row if a), default=1)
        header = f"{self.name}: p={self.stages} m={self.microbatches} v={self.virtual}, {self.ticks} ticks"
        lines = [f"{header}, bubble {float(self.bubble_fraction()):.3f}"]
        for stage in range(self.stages):
            cells = [str(row[stage]) if row[stage] else "." for row in self.actions]
            lines.append(f"stage {stage}: " + " ".join(c.rjust(width) for c in cells))
        return "\n".join(lines)


class ScheduleError(ValueError):
    """A table that cannot run: a dependency violated, an action missing or repeated."""


def cross_device_boundaries(placement: Placement, p: int, v: int) -> int:
    """Boundaries k -> k + 1 between virtual stages that run on different devices."""
    return sum(device_of(placement, p, k)[0] != device_of(placement, p, k + 1)[0] for k in range(p * v - 1))


def _dependencies(action: Action, stage: int, p: int, v: int, placement: Placement) -> list[tuple[int, Action]]:
    """(stage, action) pairs that must finish, at an earlier tick, before ``action`` runs."""
    k = virtual_stage_of(placement, p, stage, action.chunk)
    last = p * v - 1
    mb = action.microbatch

    def at(k: int, kind: Kind) -> tuple[int, Action]:
        where, chunk = device_of(placement, p, k)
        return where, Action(kind, mb, chunk)

    if action.kind == "W":
        return [(stage, Action("B", mb, action.chunk))]
    if action.kind == "F":
        return [] if k == 0 else [at(k - 1, "F")]
    deps = [(stage, Action("F", mb, action.chunk))]
    if k < last:
        deps.append(at(k + 1, "B"))
    return deps


def simulate(
    name: str, orders: Sequence[Sequence[Action]], microbatches: int, virtual: int, placement: Placement = "loop"
) -> Schedule:
    """Runs each stage's action order as early as dependencies allow; returns the table."""
    p = len(orders)
    done: dict[tuple[int, Action], int] = {}  # -> tick it ran
    cursor = [0] * p
    rows: list[tuple[Action | None, ...]] = []
    total = sum(len(o) for o in orders)
    while len(done) < total:
        tick = len(rows)
        row: list[Action | None] = []
        for stage in range(p):
            action = orders[stage][cursor[stage]] if cursor[stage] < len(orders[stage]) else None
            ready = action is not None and all(
                done.get(dep, tick) < tick for dep in _dependencies(action, stage, p, virtual, placement)
            )
            row.append(action if ready else None)
        if not any(row):
            raise ScheduleError(f"{name}: deadlock at tick {tick}; stage orders: {orders}")
        for stage, action in enumerate(row):
            if action is not None:
                done[(stage, action)] = tick
                cursor[stage] += 1
        rows.append(tuple(row))
    return Schedule(name, p, microbatches, virtual, tuple(rows), placement)


def validate(schedule: Schedule) -> None:
    """Checks without devices that the table can run: every forward and backward of every
    microbatch on every virtual stage appears exactly once, after its dependencies."""
    p, m, v = schedule.stages, schedule.microbatches, schedule.virtual
    seen: dict[tuple[int, Action], int] = {}
    for tick, row in enumerate(schedule.actions):
        if len(row) != p:
            raise ScheduleError(f"tick {tick} has {len(row)} entries for {p} stages")
        for stage, action in enumerate(row):
            if action is None:
                continue
            if not (0 <= action.microbatch < m and 0 <= action.chunk < v):
                raise ScheduleError(f"tick {tick}, stage {stage}: {action} is out of range (m={m}, v={v})")
            if (stage, action) in seen:
                raise ScheduleError(f"tick {tick}, stage {stage}: {action} already ran at tick {seen[(stage, action)]}")
            for dep in _dependencies(action, stage, p, v, schedule.placement):
                if seen.get(dep, tick) >= tick:
                    raise ScheduleError(
                        f"tick {tick}, stage {stage}: {action} runs before {dep[1]} on stage {dep[0]} has finished"
                    )
            seen[(stage, action)] = tick
    kinds = 1 if schedule.forward_only else 3 if schedule.split_backward else 2
    missing = kinds * p * m * v - len(seen)
    if missing:
        raise ScheduleError(f"{missing} actions never run")


def gpipe(stages: int, microbatches: int) -> Schedule:
    """All forwards, then all backwards: m microbatches of activations in flight."""
    order = [Action("F", i) for i in range(microbatches)] + [Action("B", i) for i in range(microbatches)]
    return simulate("gpipe", [order] * stages, microbatches, 1)


def one_f_one_b(stages: int, microbatches: int, split: bool = False) -> Schedule:
    """1F1B (PipeDream-flush): p - s - 1 warm-up forwards, then alternate one forward and
    one backward, so stage s never holds more than p - s microbatches of activations.

    ``split``: each backward as a B (input gradient) and, at once after it on the same stage, its
    W (weight gradient): the same order, memory and messages, in units that each cost one
    forward when the forward keeps its residuals (``actions.tick_costs``), so that no lockstep
    tick mixes a cheap action with a dear one. The B's, on the critical path, get a tick each
    instead of two: 3m + 2(p - 1) ticks, against 1F1B's 2(m + p - 1) of up to 2 forwards each.
    """
    orders = []
    for stage in range(stages):
        warmup = min(stages - stage - 1, microbatches)
        order = [Action("F", i) for i in range(warmup)]
        for i in range(warmup, microbatches):
            order += [Action("F", i), *_backward(i - warmup, split)]
        order += [a for i in range(microbatches - warmup, microbatches) for a in _backward(i, split)]
        orders.append(order)
    return simulate("1f1b", orders, microbatches, 1)


def _backward(microbatch: int, split: bool) -> list[Action]:
    """A whole backward, or a split one's B and then its W."""
    return _backward_of(Action("B", microbatch), split)


def _backward_of(b: Action, split: bool) -> list[Action]:
    return [b, Action("W", b.microbatch, b.chunk)] if split else [b]


def interleaved_1f1b(stages: int, microbatches: int, virtual: int, split: bool = False) -> Schedule:
    """Interleaved 1F1B (Megatron-LM): each device holds ``virtual`` chunks; microbatches go
    through the chunks in groups of ``stages``, cutting the bubble by a factor of about v.
    ``split``: each backward a B and at once its W, as ``one_f_one_b``'s."""
    p, m, v = stages, microbatches, virtual
    if m % p:
        raise ScheduleError(f"interleaved 1F1B needs microbatches ({m}) divisible by stages ({p})")
    forwards = [Action("F", g * p + i, c) for g in range(m // p) for c in range(v) for i in range(p)]
    backwards = [Action("B", g * p + i, c) for g in range(m // p) for c in reversed(range(v)) for i in range(p)]
    orders = []
    for stage in range(p):
        warmup = min((p - stage - 1) * 2 + (v - 1) * p, len(forwards))
        order = forwards[:warmup]
        for i in range(warmup, len(forwards)):
            order += [forwards[i], *_backward_of(backwards[i - warmup], split)]
        order += [a for b in backwards[len(forwards) - warmup :] for a in _backward_of(b, split)]
        orders.append(order)
    return simulate("interleaved-1f1b", orders, m, v)


def zb_h1(stages: int, microbatches: int) -> Schedule:
    """ZB-H1: 1F1B with each backward split into B and W, and the W's moved into the bubbles.

    Stage s runs p - s forwards, then for each microbatch its B, then the
    oldest pending W once more than s are pending, then the next F; the W's
    left over run last. The last stage settles into F B W after p F B pairs,
    stage 0 into B W F; every stage holds at most p microbatches between F
    and W (1F1B's peak, on stage 0), and the W's a stage defers fill the
    cool-down bubble, leaving p - 1 idle ticks per stage instead of 3 (p - 1).
    """
    p, m = stages, microbatches
    orders = []
    for stage in range(p):
        warmup = min(p - stage, m)
        order = [Action("F", i) for i in range(warmup)]
        next_f, next_w = warmup, 0
        for i in range(m):
            order.append(Action("B", i))
            if i + 1 - next_w > stage:
                order.append(Action("W", next_w))
                next_w += 1
            if next_f < m:
                order.append(Action("F", next_f))
                next_f += 1
        order += [Action("W", i) for i in range(next_w, m)]
        orders.append(order)
    return simulate("zb-h1", orders, m, 1)


def zb_v(stages: int, microbatches: int) -> Schedule:
    """ZB-V (Qi et al., "Pipeline Parallelism with Controllable Memory", 2024): two chunks per
    device in a V (``placement`` "v"), backwards split into B and W; needs m >= p.

    Built from V's. A forward V started at tick t runs one microbatch's chunk 0 on
    stage s at t + s and its chunk 1 at t + 2p - 1 - s: down the devices and back up,
    one tick a virtual stage. A backward V runs its B's the same way (chunk 1 at t + s,
    chunk 0 at t + 2p - 1 - s), which is the order the gradient takes. Slot j starts a V
    at tick 2j, and two V's of even starts never meet on a stage (t + s and
    t' + 2p - 1 - s differ in parity), so the slots are a sequence (``_zb_v_slots``):
    p forward V's, then the other microbatches in waves of up to p (their backward V's
    for as many older microbatches, then a free slot and a forward V for each), then
    the last p backward V's. Each stage runs its oldest pending W on every tick no V
    uses. A backward V starts p slots or more after its forward V, past its loss on
    stage 0; a free slot comes only when every stage has a W to fill it with.

    With F, B and W one tick each, every stage then idles p - 1 ticks, all before its
    first backward, and the step takes 6m + p - 1 ticks: (p-1)/(6m+p-1), whatever m >= p
    (no wave needs m divisible by p). Each stage holds at most 2p half-stage chunks
    between F and W (1F1B's p stage inputs), and the backward waves keep the B's of many
    stages on the same ticks, which is what a lockstep step pays for
    (``Schedule.lockstep_time``); tests/test_pipeline_schedules.py checks all three at
    every m from p to 3p + 2 for p <= 8 (past the warm-up, the table repeats by waves). With
    m < p no table reaches that bubble: stage p - 1's first B waits for the loss on
    stage 0 and p B's back, tick 3p - 1, and until then it has only 2m forwards to run.
    """
    p, m = stages, microbatches
    if m < p:
        raise ScheduleError(
            f"zb-v needs microbatches >= stages (got {m} < {p}): with fewer, the last stage idles "
            f"{2 * (p - m)} ticks more than the fill, waiting for its first backward; use microbatches >= {p}"
        )
    occupied: dict[tuple[int, int], Action] = {}  # (tick, stage) -> the V's action there
    started = {"F": 0, "B": 0}
    for slot, kind in enumerate(_zb_v_slots(p, m)):
        if kind == "W":
            continue
        mb, started[kind] = started[kind], started[kind] + 1
        first, second = (0, 1) if kind == "F" else (1, 0)  # the chunk each half of the V runs
        v_kind = cast(Kind, kind)  # a letter of _zb_v_slots' string, F or B here
        for stage in range(p):
            occupied[(2 * slot + stage, stage)] = Action(v_kind, mb, first)
            occupied[(2 * slot + 2 * p - 1 - stage, stage)] = Action(v_kind, mb, second)
    columns = [_with_weight_gradients(occupied, stage, 4 * m) for stage in range(p)]
    ticks = max(len(c) for c in columns)
    rows = tuple(tuple(c[t] if t < len(c) else None for c in columns) for t in range(ticks))
    return Schedule("zb-v", p, m, 2, rows, "v")


def _with_weight_gradients(occupied: dict[tuple[int, int], Action], stage: int, actions: int) -> list[Action | None]:
    """Stage ``stage``'s column: its ``actions`` F's and B's where ``occupied`` puts them, and on
    every other tick the W of its oldest B whose W has not run, until none is left."""
    column: list[Action | None] = []
    pending: list[Action] = []
    placed = 0
    while placed < actions or pending:
        action = occupied.get((len(column), stage))
        if action is None:
            action = pending.pop(0) if pending else None
        else:
            placed += 1
            if action.kind == "B":
                pending.append(Action("W", action.microbatch, action.chunk))
        column.append(action)
    return column


def _zb_v_slots(p: int, m: int) -> str:
    """ZB-V's V's in start order: F (a forward V), B (a backward V, oldest microbatch first), W
    (no V: each stage runs pending W's there). p F's; per wave of b <= p further microbatches,
    b B's, then b free slots and b F's alternating; p B's."""
    waves = ""
    for first in range(p, m, p):
        b = min(p, m - first)
        waves += "B" * b + "WF" * b
    return "F" * p + waves + "B" * p


def forward_only(schedule: Schedule) -> Schedule:
    """An eval step's table: ``schedule``'s forwards alone, on the devices ``schedule`` runs them
    on (so each stage runs the layers it stores), every stage running, each tick, the deepest
    forward whose input has arrived (oldest microbatch first). The last virtual stage scores its
    output (``table.SCORE``). m v + p - 1 ticks where the chunks loop; 2m + 2p - 2 in a V."""
    p, m, v, where = schedule.stages, schedule.microbatches, schedule.virtual, schedule.placement
    waiting = [{Action("F", mb, c) for mb in range(m) for c in range(v)} for _ in range(p)]
    done: dict[tuple[int, int], int] = {}  # (microbatch, virtual stage) -> tick
    rows: list[tuple[Action | None, ...]] = []
    while any(waiting):
        tick, row = len(rows), []
        for stage in range(p):
            ready = [
                (-k, a.microbatch, a)
                for a in waiting[stage]
                if (k := virtual_stage_of(where, p, stage, a.chunk)) == 0
                or done.get((a.microbatch, k - 1), tick) < tick
            ]
            row.append(min(ready)[2] if ready else None)
        for stage, action in enumerate(row):
            if action is not None:
                done[(action.microbatch, virtual_stage_of(where, p, stage, action.chunk))] = tick
                waiting[stage].remove(action)
        rows.append(tuple(row))
    table = Schedule(f"{schedule.name} forward", p, m, v, tuple(rows), where)
    validate(table)
    return table


SCHEDULES = {
    "gpipe": lambda p, m, v: gpipe(p, m),
    "1f1b": lambda p, m, v: one_f_one_b(p, m),
    "interleaved-1f1b": interleaved_1f1b,
    "zb-h1": lambda p, m, v: zb_h1(p, m),
    "zb-v": lambda p, m, v: zb_v(p, m),
}
SINGLE_CHUNK = ("gpipe", "1f1b", "zb-h1")  # schedules that run one chunk per stage
TWO_CHUNK = ("zb-v",)  # schedules that run two chunks per stage, in a V
SPLIT_BACKWARD = ("zb-h1", "zb-v")  # schedules whose backwards are split into B and W (Schedule.split_backward)
PLACEMENTS: dict[str, Placement] = {"zb-v": "v"}  # every other schedule loops


def placement(name: str) -> Placement:
    """Where the named schedule runs each virtual stage (``virtual_stage_of``)."""
    return PLACEMENTS.get(name, "loop")


SPLITTABLE = {  # the 1F1B tables as split ones, W right after B (``one_f_one_b``'s ``split``)
    "1f1b": lambda p, m, v: one_f_one_b(p, m, split=True),
    "interleaved-1f1b": lambda p, m, v: interleaved_1f1b(p, m, v, split=True),
}


@functools.lru_cache(maxsize=256)  # tables are immutable; the planner asks for the same ones often
def make_schedule(name: str, stages: int, microbatches: int, virtual: int = 1, split: bool = False) -> Schedule:
    """The named schedule (one of ``SCHEDULES``); validated. ``split``: 1F1B's tables with each
    backward as B and W back to back (``SPLITTABLE``; what the executor runs when forwards keep
    their residuals, ``plan.schedule_for``); the others as they are (GPipe whole, ZB split)."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    if name in SINGLE_CHUNK and virtual != 1:
        raise ScheduleError(f"{name} runs one chunk per stage; virtual_stages must be 1, got {virtual}")
    if name in TWO_CHUNK and virtual != 2:
        raise ScheduleError(f"{name} runs two chunks per stage, in a V; virtual_stages must be 2, got {virtual}")
    schedule = (SPLITTABLE if split and name in SPLITTABLE else SCHEDULES)[name](stages, microbatches, virtual)
    validate(schedule)
    return schedule
