"""Pipeline schedule tables, checked without devices: validity, bubbles, activations in flight."""

import itertools
from fractions import Fraction

import numpy as np
import pytest

from shardlib.parallel.pipeline.actions import tick_costs
from shardlib.parallel.pipeline.schedules import (
    SPLIT_BACKWARD,
    Action,
    Schedule,
    ScheduleError,
    gpipe,
    make_schedule,
    one_f_one_b,
    placement,
    validate,
)
from shardlib.parallel.pipeline.sends import layer_order, send_patterns
from shardlib.parallel.pipeline.table import compile_table

CASES = [
    (name, p, m, v)
    for p in (2, 4)
    for m in (4, 5, 8, 10, 16)
    for name, v in (
        ("gpipe", 1),
        ("1f1b", 1),
        ("interleaved-1f1b", 2),
        ("interleaved-1f1b", 4),
        ("zb-h1", 1),
        ("zb-v", 2),
    )
    if not (name == "interleaved-1f1b" and m % p)
]
SPLIT = SPLIT_BACKWARD


def published_ticks(name: str, p: int, m: int, v: int) -> int:
    """The papers' makespans in ticks of one action: 2 (v m + p - 1) for GPipe, 1F1B and interleaved
    1F1B; for ZB-H1 (Qi et al. 2023) m (T_F + T_B + T_W) + (p - 1)(T_F + T_B - T_W) = 3 m + p - 1;
    for ZB-V (m >= p) 2 m chunks of F, B and W, and the p - 1 ticks of a synchronous step's fill."""
    return 3 * v * m + p - 1 if name in SPLIT else 2 * (v * m + p - 1)


@pytest.mark.parametrize("name, p, m, v", CASES)
def test_schedule_is_valid_and_its_bubble_is_the_formula(name, p, m, v):
    schedule = make_schedule(name, p, m, v)
    validate(schedule)
    actions = (3 if name in SPLIT else 2) * v * m  # per stage
    assert schedule.ticks == published_ticks(name, p, m, v)
    assert schedule.bubble_fraction() == Fraction(schedule.ticks - actions, schedule.ticks)
    assert schedule.expected_bubble() == schedule.bubble_fraction()


@pytest.mark.parametrize("p, m", [(2, 4), (4, 4), (4, 8), (4, 16), (8, 32)])
def test_zb_h1_has_a_third_of_1f1b_bubble_at_1f1b_memory(p, m):
    """Counting a 1F1B backward as B + W (two ticks), 1F1B idles 3 (p - 1) ticks a stage, ZB-H1 p - 1;
    and no stage holds more microbatches between F and W than 1F1B's first stage does between F and B."""
    zb = make_schedule("zb-h1", p, m)
    assert zb.split_backward and not one_f_one_b(p, m).split_backward
    assert zb.ticks - 3 * m == p - 1  # idle ticks per stage
    assert zb.max_in_flight() == one_f_one_b(p, m).max_in_flight() == p
    table = compile_table(zb)
    assert table.act_slots <= p and table.res_slots <= p
    when = {(stage, a): t for t, row in enumerate(zb.actions) for stage, a in enumerate(row) if a}
    for (stage, action), tick in when.items():
        if action.kind == "W":
            assert when[(stage, Action("B", action.microbatch))] < tick


@pytest.mark.parametrize("p", range(2, 9))
def test_zb_v_idles_only_the_fill_at_1f1b_memory_and_beats_zb_h1_in_lockstep_at_every_m(p):
    """ZB-V at every m from p to 3p + 2 (p + 1 and 2p + 2 among them, where waves of p do not
    divide m): p - 1 idle ticks a stage, the bubble ``expected_bubble`` prints (the paper's zero
    bubble plus a synchronous step's fill), at most 2p half-stage chunks between F and W (1F1B's p
    stage inputs), the embedding and the loss on stage 0, the V's turn (the only send to itself)
    on stage p - 1; and, with B dearer than F and W, a shorter step in lockstep than ZB-H1's at
    the same m.

    In this executor the residual slots (a chunk's weight-use inputs and cotangents, per layer)
    hold as many layers as ZB-H1's; the stage-input slots are at most 2p + 1 of [B, L, D] against
    ZB-H1's p (a chunk's input is a whole activation, and one more arrives before its forward runs)."""
    for m in range(p, 3 * p + 3):
        zv, zh = make_schedule("zb-v", p, m, 2), make_schedule("zb-h1", p, m)
        assert zv.ticks - 6 * m == p - 1, (p, m, zv.format())
        assert zv.bubble_fraction() == zv.expected_bubble() == Fraction(p - 1, 6 * m + p - 1)
        assert zv.max_in_flight() <= 2 * one_f_one_b(p, m).max_in_flight() == 2 * p
        table, h1 = compile_table(zv), compile_table(zh)
        assert table.res_slots / 2 <= h1.res_slots == p, (p, m)  # in layers: half a stage's per slot
        assert table.act_slots <= 2 * p + 1
        assert set(np.flatnonzero((table.recv_self_slot >= 0).any(axis=0))) == {p - 1}
        assert zv.lockstep_time(tick_costs(zv))[0] < zh.lockstep_time(tick_costs(zh))[0], (p, m)
    assert (zv.device_of(0), zv.device_of(2 * p - 1), zv.device_of(p - 1), zv.device_of(p)) == (
        (0, 0),
        (0, 1),
        (p - 1, 0),
        (p - 1, 1),
    )


def test_zb_v_refuses_fewer_microbatches_than_stages_and_zb_h1_states_their_bubble():
    """With m < p, ZB-V's last stage waits for its first B until tick 3p - 1 with only 2m forwards
    to run, so no table idles only the fill: refused, naming the m it needs. ZB-H1 runs them, and
    ``expected_bubble`` states what its table idles (GPipe's makespan, no W to fill the wait)."""
    with pytest.raises(ScheduleError, match=r"zb-v needs microbatches >= stages \(got 3 < 4\).*microbatches >= 4"):
        make_schedule("zb-v", 4, 3, 2)
    for p, m in ((4, 1), (4, 3), (8, 5)):
        zh = make_schedule("zb-h1", p, m)
        assert zh.ticks == 2 * m + 2 * p - 1 and zh.bubble_fraction() == zh.expected_bubble()


def test_zb_v_needs_two_chunks_and_fills_its_layers_in_a_v():
    with pytest.raises(ScheduleError, match="virtual_stages must be 2"):
        make_schedule("zb-v", 2, 4, 1)
    # 8 layers on 2 stages: stage 0 stores logical layers 0-1 (chunk 0) and 6-7 (chunk 1).
    assert layer_order(8, 2, 2, placement("zb-v")).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]


def test_validate_rejects_a_weight_gradient_before_its_input_gradient():
    schedule = make_schedule("zb-h1", 2, 2)
    rows = [list(r) for r in schedule.actions]
    ((tick_b, stage),) = [(t, s) for t, r in enumerate(rows) for s, a in enumerate(r) if a == Action("B", 1)][:1]
    tick_w = next(t for t, r in enumerate(rows) if r[stage] == Action("W", 1))
    rows[tick_b][stage], rows[tick_w][stage] = rows[tick_w][stage], rows[tick_b][stage]
    with pytest.raises(ScheduleError, match="W1 runs before B1"):
        validate(_with(schedule, [tuple(r) for r in rows]))


@pytest.mark.parametrize("p, m", [(2, 4), (4, 4), (4, 8), (4, 16)])
def test_1f1b_holds_at_most_p_microbatches_and_gpipe_m(p, m):
    assert one_f_one_b(p, m).max_in_flight() == min(p, m)
    assert gpipe(p, m).max_in_flight() == m
    # The executor's buffers follow the table: p stage inputs for 1F1B, m for GPipe
    # (the first stage recomputes its input from the tokens, so it needs none).
    assert compile_table(one_f_one_b(p, m)).act_slots <= p
    assert compile_table(gpipe(p, m)).act_slots == m


def test_every_forward_precedes_its_backward_and_stage_order_holds():
    schedule = make_schedule("interleaved-1f1b", 2, 4, 2)
    when = {(stage, a): t for t, row in enumerate(schedule.actions) for stage, a in enumerate(row) if a}
    p = schedule.stages
    for (stage, action), tick in when.items():
        k = action.chunk * p + stage
        if action.kind == "B":
            assert when[(stage, Action("F", action.microbatch, action.chunk))] < tick
        elif k > 0:
            prev = ((k - 1) % p, Action("F", action.microbatch, (k - 1) // p))
            assert when[prev] < tick


def _with(schedule: Schedule, actions) -> Schedule:
    return Schedule(schedule.name, schedule.stages, schedule.microbatches, schedule.virtual, tuple(actions))


def test_validate_rejects_a_backward_before_its_forward():
    schedule = gpipe(2, 2)
    rows = [list(r) for r in schedule.actions]
    rows[0][0], rows[-1][0] = Action("B", 1), rows[0][0]
    with pytest.raises(ScheduleError, match="runs before"):
        validate(_with(schedule, [tuple(r) for r in rows]))


def test_validate_rejects_a_stage_running_before_its_input_arrives():
    schedule = gpipe(2, 2)
    rows = [list(r) for r in schedule.actions]
    rows[0][1] = Action("F", 0)  # stage 1 at tick 0, same tick as stage 0 makes its input
    rows[1][1] = None
    with pytest.raises(ScheduleError, match=r"F0 runs before F0 on stage 0"):
        validate(_with(schedule, [tuple(r) for r in rows]))


def test_validate_rejects_missing_and_repeated_actions():
    schedule = gpipe(2, 2)
    with pytest.raises(ScheduleError, match="never run"):
        validate(_with(schedule, schedule.actions[:-1]))
    with pytest.raises(ScheduleError, match="already ran"):
        validate(_with(schedule, (*schedule.actions, schedule.actions[-1])))


def test_bad_requests_are_clear_errors():
    with pytest.raises(ScheduleError, match="unknown schedule 'zb'"):
        make_schedule("zb", 2, 4)
    with pytest.raises(ScheduleError, match="divisible by stages"):
        make_schedule("interleaved-1f1b", 4, 6, 2)
    with pytest.raises(ScheduleError, match="virtual_stages must be 1"):
        make_schedule("1f1b", 2, 4, 2)


def test_table_prints_one_row_per_stage():
    text = make_schedule("1f1b", 2, 2).format()
    assert text.splitlines() == [
        "1f1b: p=2 m=2 v=1, 6 ticks, bubble 0.333",
        "stage 0: F0 F1  . B0  . B1",
        "stage 1:  . F0 B0 F1 B1  .",
    ]


@pytest.mark.parametrize("name, p, m, v", CASES)
def test_each_tick_permutes_exactly_the_pairs_that_have_an_arrival(name, p, m, v):
    """The permute patterns send the minimum: 2 m (p v - 1) microbatches per step, no more."""
    schedule = make_schedule(name, p, m, v)
    plan = compile_table(schedule)
    patterns = send_patterns(plan)
    assert patterns.tick.shape == (schedule.ticks, 2) and patterns.down[0] == patterns.up[0] == ()
    assert len(set(patterns.down)) == len(patterns.down) and len(set(patterns.up)) == len(patterns.up)
    # Derived from the schedule's actions alone, not from the plan's slot arrays: a forward on
    # virtual stage k < last sends its output to the stage of k + 1, a backward on k > 0 sends
    # its input's gradient to the stage of k - 1, at the end of the tick; to the stage below
    # (s + 1) or above (s - 1), or nowhere when that stage is the sender itself (a V's turn).
    last = p * v - 1
    for tick, row in enumerate(schedule.actions):
        down, up = set(), set()
        for stage, a in enumerate(row):
            k = schedule.virtual_stage(stage, a.chunk) if a else None
            target = None
            if a and a.kind == "F" and k < last:
                target = schedule.device_of(k + 1)[0]
            if a and a.kind == "B" and k > 0:
                target = schedule.device_of(k - 1)[0]
            if target is not None and target != stage:
                (down if (target - stage) % p == 1 else up).add((stage, target))
        got = patterns.down[patterns.tick[tick, 0]], patterns.up[patterns.tick[tick, 1]]
        assert (set(got[0]), set(got[1])) == (down, up), (tick, row)
        assert (patterns.tick[tick, 0] > 0, patterns.tick[tick, 1] > 0) == (bool(down), bool(up))
    crossings = p * v - 1 - (p > 1 and name == "zb-v")  # a V turns on one device
    assert schedule.cross_device_boundaries() == crossings
    assert sum(patterns.sends()) == 2 * m * crossings
    assert sum(patterns.runs().values()) == int((patterns.tick > 0).sum())


def test_a_backward_without_recomputation_costs_two_forwards():
    schedule = make_schedule("1f1b", 2, 2)
    assert tick_costs(schedule, recompute=False) == {"F": 1, "B": 2}
    assert tick_costs(schedule)["B"] == 3
    # A split table's units, once forwards keep their residuals, cost one forward each.
    assert tick_costs(make_schedule("zb-h1", 2, 4), recompute=False) == {"F": 1, "B": 1, "W": 1}


def test_lockstep_time_is_the_sum_of_each_ticks_slowest_action():
    # 1f1b p=2 m=2: F0 F1 . B0 . B1 / . F0 B0 F1 B1 . -> ticks cost 1, 1, 3, 3, 3, 3 at F = 1, B = 3.
    schedule = make_schedule("1f1b", 2, 2)
    time, bubble = schedule.lockstep_time(tick_costs(schedule))
    assert time == 14 and bubble == 1 - Fraction(2 * 2 * 4, 2 * 14)
    equal = {"F": Fraction(1), "B": Fraction(1), "W": Fraction(1)}
    assert schedule.lockstep_time(equal)[1] == schedule.bubble_fraction()


@pytest.mark.parametrize("m", [8, 16])
def test_zero_bubble_beats_1f1b_in_lockstep_at_1f1b_memory(m):
    """The executor's B is dearer than its F (it recomputes the forward): ticks that mix them idle
    the forward stages, which costs 1F1B more than ZB-H1, whose B is lighter (its W is apart)."""
    ones, zb = one_f_one_b(4, m), make_schedule("zb-h1", 4, m)
    assert zb.lockstep_time(tick_costs(zb))[0] < ones.lockstep_time(tick_costs(ones))[0]


def test_split_1f1b_is_1f1b_with_each_w_right_after_its_b():
    """1F1B's split table (what runs when forwards keep their residuals): the same order of F's and
    B's, each W on its stage's next tick after its B, 1F1B's microbatches in flight and messages."""
    for p, m in [(2, 4), (4, 8), (4, 16)]:
        whole, split = one_f_one_b(p, m), make_schedule("1f1b", p, m, split=True)
        assert split.split_backward and split.max_in_flight() == whole.max_in_flight() == p
        assert split.ticks == 3 * m + 2 * (p - 1)
        for stage in range(p):
            column = [row[stage] for row in split.actions if row[stage] is not None]
            assert [a for a in column if a.kind != "W"] == [row[stage] for row in whole.actions if row[stage]]
            for a, after in itertools.pairwise(column):
                assert a.kind != "B" or after == Action("W", a.microbatch), (p, m, stage)
        assert sum(send_patterns(compile_table(split)).sends()) == sum(send_patterns(compile_table(whole)).sends())
    assert make_schedule("gpipe", 2, 4, split=True) == gpipe(2, 4)  # GPipe stays whole


def _kept_costs(schedule: Schedule) -> dict:
    """The executor's costs when forwards keep their residuals (``pipeline.recompute=false``)."""
    return tick_costs(schedule, recompute=False)


FIGURE_POINTS = [(4, 16), (2, 8), (8, 32)]  # issue 28's table
HEADS = [Fraction(0), Fraction(1, 2)]  # the loss head's forward and backward, in stage forwards


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("p, m", FIGURE_POINTS)
def test_kept_residual_tables_run_at_their_ideal_in_lockstep(p, m, head):
    """Forwards keeping their residuals, every schedule (1F1B's split) runs units of one cost: its
    lockstep step is within 5% of its table's ideal (each stage's work plus the fill, asynchronously,
    ``Schedule.ideal_time``), the loss head's dearer ticks counted in both."""
    for name, v in [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1), ("zb-v", 2)]:
        schedule = make_schedule(name, p, m, v, split=True)
        costs = _kept_costs(schedule)
        lockstep, ideal = schedule.lockstep_time(costs, head)[0], schedule.ideal_time(costs, head)
        assert lockstep <= Fraction(105, 100) * ideal, (name, p, m, float(lockstep / ideal))


ZB_V_FILL_MISSES = {(2, 8)}  # ZB-V over GPipe 0.907 (head 0) and above 0.90 with the head: its fill


@pytest.mark.parametrize("p, m", FIGURE_POINTS)
def test_kept_residual_zero_bubble_tables_beat_gpipe_at_1f1b_memory(p, m):
    """Issue 28's figures in the lockstep model, forwards keeping their residuals (the loss head
    at 0 and half a stage): 1F1B <= 1.02 x GPipe's step, ZB-H1 <= 0.95 x, ZB-V <= 0.90 x, with at
    most 1F1B's microbatch-chunks in flight (ZB-V's chunks are half a stage's: 2p of them).
    ZB-V at p = 2, m = 8 misses 0.90 by its fill alone: (3m + (p-1)/2) / (3(m + p - 1)) = 0.907
    with no head; no table can start its first backward sooner."""
    for head in HEADS:
        steps, ideals = {}, {}
        for name, v in [("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("zb-v", 2)]:
            schedule = make_schedule(name, p, m, v, split=True)
            steps[name] = schedule.lockstep_time(_kept_costs(schedule), head)[0]
            ideals[name] = schedule.ideal_time(_kept_costs(schedule), head)
        assert steps["1f1b"] <= Fraction(102, 100) * steps["gpipe"], (p, m, head)
        assert steps["zb-h1"] <= Fraction(95, 100) * steps["gpipe"], (p, m, head)
        zb_v_ratio = steps["zb-v"] / steps["gpipe"]
        if (p, m) in ZB_V_FILL_MISSES:
            # Shown, not excused: nothing is lost to lockstep, the miss is the fill's, and it stays a miss.
            assert steps["zb-v"] == ideals["zb-v"], (p, m, head)
            assert zb_v_ratio > Fraction(90, 100), f"ZB-V now within 0.90 at {(p, m)}: drop it from the misses"
        else:
            assert zb_v_ratio <= Fraction(90, 100), (p, m, head, float(zb_v_ratio))
    in_flight = make_schedule("1f1b", p, m, split=True).max_in_flight()
    assert make_schedule("zb-h1", p, m).max_in_flight() <= in_flight
    assert make_schedule("zb-v", p, m, 2).max_in_flight() <= 2 * in_flight


def test_the_loss_head_lengthens_the_ticks_of_the_last_virtual_stages_forwards():
    schedule = gpipe(2, 2)  # F0 F1 . / . F0 F1 then the backwards
    costs = {"F": Fraction(1), "B": Fraction(2)}
    assert schedule.lockstep_time(costs, Fraction(1, 2))[0] == schedule.lockstep_time(costs)[0] + 1
    assert schedule.ideal_time(costs, Fraction(1, 2)) == schedule.ideal_time(costs) + 1
    assert schedule.ideal_time(costs) == schedule.lockstep_time(costs)[0] == 9
