"""bench/wall.py and bench/pipeline_wall.py: the wall-time method's arithmetic, and one tiny 2-process run.

The bench itself (minutes) is not run here; what its figures rest on is: the
lockstep model at measured costs (``lockstep_at``), the control's ideal, the
spread, the alternation and the slowest-process rule, the refusal of more
stages than cores, and that a launched worker is pinned to its own core and
talks to the other through a collective.
"""

from __future__ import annotations

import os
import textwrap

import pytest

from bench import pipeline_costs, wall
from bench.pipeline_wall import SCHEDULES, lockstep_at
from shardlib.parallel.pipeline.actions import tick_costs
from shardlib.parallel.pipeline.schedules import make_schedule


@pytest.mark.parametrize("name, virtual", SCHEDULES)
def test_lockstep_at_tick_costs_is_the_schedules_lockstep_time(name, virtual):
    schedule = make_schedule(name, 2, 4, virtual)
    costs = tick_costs(schedule)
    per_stage = {kind: float(cost * schedule.virtual) for kind, cost in costs.items()}  # lockstep_at takes a stage's
    per_stage.setdefault("W", 0.0)
    assert lockstep_at(schedule, per_stage) == pytest.approx(float(schedule.lockstep_time(costs)[0]))


def test_lockstep_at_adds_the_loss_head_to_the_last_stages_forwards():
    # GPipe, p = 2, m = 4: tick 0 only stage 0 runs F; ticks 1-4 hold stage 1's four F's (each F + L,
    # the slowest of the tick); then 5 ticks of B's. F = 1, B = 3: 1 + 4 (1 + L) + 15.
    schedule = make_schedule("gpipe", 2, 4)
    assert lockstep_at(schedule, {"F": 1.0, "B": 3.0, "W": 0.0}, loss_head=0.5) == pytest.approx(22.0)
    # ZB-V's last virtual stage is chunk 1 of device 0: the head rides on device 0's second chunk.
    zbv = make_schedule("zb-v", 2, 4, 2)
    without = lockstep_at(zbv, {"F": 1.0, "B": 2.0, "W": 1.0})
    assert lockstep_at(zbv, {"F": 1.0, "B": 2.0, "W": 1.0}, loss_head=0.25) > without


def test_gpipe_ideal_is_a_stages_share_plus_the_fill():
    # 2 s of work on one device, 2 stages, 4 microbatches: 1 s per stage + 1 microbatch's 0.25 s.
    assert wall.gpipe_ideal(2.0, 2, 4) == pytest.approx(1.25)
    assert wall.ideal_time(1.0, 0.25) == pytest.approx(1.25)


def test_spread():
    s = wall.Spread.of([1.0, 2.0, 3.0, 4.0, 10.0])
    assert (s.median, s.range_rel, s.iqr_rel, s.repeats) == (3.0, 3.0, 2.0 / 3.0, 5)
    assert wall.Spread.of([2.0]).iqr_rel == 0.0
    with pytest.raises(ValueError, match="at least one"):
        wall.Spread.of([])


def test_alternating_times_alternates_and_takes_the_slowest_process():
    calls: list[str] = []
    sides = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    barriers: list[int] = []

    def gather(flat):  # a second process whose steps took 1 s more, except b's: 1 s less
        other = [t + 1.0 for t in flat[:2]] + [t - 1.0 for t in flat[2:]]
        return [flat, other]

    times = wall.alternating_times(sides, 2, lambda: barriers.append(1), gather, only_here=["b"])
    assert calls == ["a", "b", "a", "b"] and len(barriers) == 4
    assert all(t >= 1.0 for t in times["a"])  # the slower process's time
    assert all(0.0 <= t < 1.0 for t in times["b"])  # only_here: this process's own


def test_action_costs_takes_w_as_the_difference():
    medians = {name: 1.0 for name in pipeline_costs.ACTION_NAMES} | {"B saved": 3.0, "input pullback": 1.75}
    costs = pipeline_costs.action_costs(medians)
    assert costs["W"] == pytest.approx(1.25) and costs["input pullback"] == 1.75  # a kept split B
    assert set(costs) == set(pipeline_costs.MODEL_RATIOS)


def test_host_load_is_a_count_of_cores():
    load = wall.HostLoad()
    load.start()
    sum(i * i for i in range(200_000))
    assert 0.0 <= load.stop(own_cpu_s=1e9) <= os.cpu_count()


def test_launch_refuses_more_stages_than_cores():
    with pytest.raises(ValueError, match=r"needs 3 distinct cores, one per stage"):
        wall.launch(["-c", "pass"], 3, cores=[0, 1])
    with pytest.raises(ValueError, match="distinct cores"):
        wall.launch(["-c", "pass"], 2, cores=[0, 0])


WORKER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    from bench import wall
    index = wall.pin_and_join()
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    assert os.sched_getaffinity(0) == {{index}}, os.sched_getaffinity(0)
    mesh = jax.make_mesh((2,), ("pipe",), devices=jax.devices())
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("pipe")), np.full((1,), float(index)))
    swap = jax.jit(jax.shard_map(lambda a: jax.lax.ppermute(a, "pipe", [(0, 1), (1, 0)]), mesh=mesh,
                                 in_specs=P("pipe"), out_specs=P("pipe")))
    got = float(np.asarray(swap(x).addressable_shards[0].data)[0])
    assert got == 1.0 - index, got
    print("worker", index, "pinned to", sorted(os.sched_getaffinity(0)), "got", got)
    """
)


@pytest.mark.skipif(len(wall.available_cores()) < 2, reason="the method needs 2 cores")
def test_two_workers_are_pinned_and_exchange_through_a_permute(tmp_path, capfd):
    script = tmp_path / "worker.py"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script.write_text(WORKER.format(root=root))
    assert wall.launch([str(script)], 2, cores=[0, 1]) == 0
    assert "worker 0 pinned to [0] got 1.0" in capfd.readouterr().out
