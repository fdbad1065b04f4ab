"""The next batches, read and placed on the devices in a background thread while the current step runs.

``Prefetcher(loader, depth)`` serves ``loader``'s batches in order, as
``loader.next()`` would, but batch ``n + 1`` .. ``n + depth`` are already being
read (``batch_windows``) and placed (``jax.make_array_from_process_local_data``)
while step ``n`` runs. Without it the host reads batch ``n + 1`` only after it
has dispatched step ``n``, which overlaps with the device only while the host
runs ahead; after a log step (the host waits for the metrics) or with a slow
source, the devices would wait for the read.

``position`` is what the checkpoint records: batches handed out (consumed),
not batches read ahead, so a resume continues exactly where the steps were.

Why a thread of our own and not grain's prefetching: the source is already
an indexable, deterministic function of the batch index (``BatchLoader.peek``),
and what is wanted is one worker reading a fixed number of indices ahead; grain
would add a dependency and its own iterator state beside the one integer the
checkpoint holds.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Self

import jax

from shardlib.training.data import BatchLoader


class Prefetcher:
    """``loader``'s batches in order, ``depth`` of them read ahead in one background thread.

    next() -> {"inputs", "targets"}: [B, L] int32 ``jax.Array``s with the loader's sharding.
    """

    def __init__(self, loader: BatchLoader, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.loader, self.depth = loader, depth
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardlib-prefetch")
        self._ahead: collections.deque[concurrent.futures.Future] = collections.deque()
        self._next_read = loader.position
        self._fill()

    @property
    def position(self) -> int:
        """Batches handed out: the index of the next one ``next`` returns."""
        return self.loader.position

    def next(self) -> dict[str, jax.Array]:
        batch = self._ahead.popleft().result()  # re-raises a read's error here, in the step that needs it
        self.loader.position += 1
        self._fill()
        return batch

    def close(self) -> None:
        """Stops reading ahead; batches already read are dropped."""
        for future in self._ahead:
            future.cancel()
        self._ahead.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fill(self) -> None:
        while len(self._ahead) < self.depth:
            self._ahead.append(self._pool.submit(self.loader.peek, self._next_read))
            self._next_read += 1
