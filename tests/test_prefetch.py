"""The next batch is read while the current step runs, in order, and the position stays the consumed one."""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from shardlib.training import data
from shardlib.training.data import BatchLoader
from shardlib.training.prefetch import Prefetcher

READ_S, STEP_S = 0.15, 0.6  # a slow source, a slower step


def loader(position: int = 0) -> BatchLoader:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    tokens = np.arange(20_000, dtype=np.uint16) % 256
    return BatchLoader(tokens, 8, 16, NamedSharding(mesh, PartitionSpec("data")), seed=3, position=position)


@pytest.fixture
def slow_source(monkeypatch):
    """batch_windows that takes READ_S and records when each batch index finished reading."""
    finished: dict[int, float] = {}
    windows = data.batch_windows

    def slow(tokens, index, *args, **kwargs):
        time.sleep(READ_S)
        out = windows(tokens, index, *args, **kwargs)
        if threading.current_thread() is not threading.main_thread():
            finished[index] = time.perf_counter()
        return out

    monkeypatch.setattr(data, "batch_windows", slow)
    return finished


def test_batch_n_plus_1_is_ready_before_step_n_ends(slow_source):
    with Prefetcher(loader(), depth=2) as batches:
        for n in range(3):
            batches.next()
            step_ends = time.perf_counter() + STEP_S
            time.sleep(STEP_S)  # step n, on the devices
            assert slow_source[n + 1] < step_ends, (n, slow_source)
        start = time.perf_counter()
        batches.next()
        assert time.perf_counter() - start < READ_S / 2  # read already: next() only hands it over


def test_same_batches_in_the_same_order_and_the_consumed_position():
    plain, ahead = loader(position=5), Prefetcher(loader(position=5), depth=3)
    try:
        for _ in range(4):
            want, got = plain.next(), ahead.next()
            for key in ("inputs", "targets"):
                np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
                assert got[key].sharding == want[key].sharding
        assert ahead.position == plain.position == 9  # what a checkpoint records: consumed, not read ahead
    finally:
        ahead.close()


def test_a_read_error_reaches_the_step_that_needs_the_batch(monkeypatch):
    windows = data.batch_windows

    def broken_from_2(tokens, index, *args, **kwargs):
        if index >= 2:
            raise OSError(f"disk gone reading batch {index}")
        return windows(tokens, index, *args, **kwargs)

    monkeypatch.setattr(data, "batch_windows", broken_from_2)
    with Prefetcher(loader(), depth=2) as batches:
        batches.next(), batches.next()  # read ahead while batch 2 already failed: not their concern
        with pytest.raises(OSError, match="batch 2"):
            batches.next()
        assert batches.position == 2
