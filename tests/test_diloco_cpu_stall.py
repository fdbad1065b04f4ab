"""XLA:CPU's stall under DiLoCo: the loop's bound on dispatched steps keeps the outer all-reduce from hanging.

Without a bound the reproducer (bench/cpu_stall.py: DiLoCo's inner and outer programs, nothing
fetched) hangs in the outer all-reduce: 3 of 3 runs here (jaxlib 0.10.2, 2 cores), XLA aborting
the process after 40 s; with the loop's bound it finishes in seconds. It runs in a subprocess, so
that a hang is a timeout of this test and not an abort of the suite.
"""

import pathlib
import subprocess
import sys

import jax
import pytest

from shardlib.core.mesh import build_mesh, mesh_spec
from shardlib.training.loop import CPU_STEPS_IN_FLIGHT, DispatchWindow, steps_in_flight

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_diloco_programs_queued_under_the_loops_bound_finish():
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "cpu_stall.py"), "--steps-in-flight", "loop"],
            check=False,  # the return code is asserted below, with the output
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=150,  # a few seconds of work; a hang would last until XLA's 40 s abort, or forever
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"bench/cpu_stall.py hung (an all-reduce that never gathers its devices):\n{e.stderr}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"steps in flight {CPU_STEPS_IN_FLIGHT}: done" in done.stdout


def test_only_xla_cpu_with_several_devices_is_bounded():
    assert steps_in_flight(build_mesh(mesh_spec(data=4, model=2))) == CPU_STEPS_IN_FLIGHT
    assert steps_in_flight(build_mesh(mesh_spec(), jax.devices()[:1])) is None


def test_the_window_waits_for_the_oldest_step_only():
    window = DispatchWindow(2)
    steps = [jax.numpy.full((), float(i)) for i in range(3)]
    for out in steps:
        window.admit()
        window.dispatched(out)
    assert list(window.unfinished) == steps[1:]  # the third admit waited for the first step alone
    unbounded = DispatchWindow(None)
    unbounded.dispatched(steps[0])
    unbounded.admit()
    assert not unbounded.unfinished  # nothing kept, nothing waited for
