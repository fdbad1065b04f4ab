"""Where a pipeline's layers live and which stages each tick's permutes connect, as tables.

``layer_order``: the logical layer each stored layer of the stacked, ``pipe``-sharded
stack is (a loop's or a V's placement of virtual stages). ``send_patterns``: each
tick's (source, target) stage pairs in both directions, from the compiled table's
arrivals, so the executor sends only where something arrives and the report counts
the permutes from the table. Both are plain numpy, checked without devices.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from shardlib.parallel.pipeline.schedules import Placement, virtual_stage_of
from shardlib.parallel.pipeline.table import TickTable

Pairs = tuple[tuple[int, int], ...]  # (source stage, target stage) of one permute


def layer_order(n_layers: int, stages: int, virtual: int, placement: Placement = "loop") -> np.ndarray:
    """Logical layer index of each stored layer.

    The stack is sharded contiguously over ``pipe``, so device s stores layers
    [s*L/p, (s+1)*L/p), which it runs as its chunks 0..v-1; chunk c of device s
    is virtual stage ``virtual_stage_of(placement, p, s, c)``: c*p + s for a loop,
    s and 2p-1-s for a V. With v = 1 this is the identity.
    """
    per_chunk = n_layers // (stages * virtual)
    order = np.empty(n_layers, np.int64)
    for s in range(stages):
        for c in range(virtual):
            k = virtual_stage_of(placement, stages, s, c)
            for j in range(per_chunk):
                order[s * virtual * per_chunk + c * per_chunk + j] = k * per_chunk + j
    return order


@dataclasses.dataclass(frozen=True)
class SendPatterns:
    """The permutes of a step, as a table: each direction's distinct sets of stage pairs, and which tick uses which.

    down[i], up[i]: the (source, target) stage pairs of pattern i, sends to stage s + 1 (mod p)
      and to s - 1; pattern 0 is empty (nothing arrives that tick: no permute runs). Down
      carries 1F1B's activations and up its gradients; a V sends both ways in both.
    tick: [ticks, 2] int32, the down (column 0) and up (1) pattern of each tick.
    """

    down: tuple[Pairs, ...]
    up: tuple[Pairs, ...]
    tick: np.ndarray

    def runs(self) -> dict[Pairs, int]:
        """Ticks per step that run a permute over each distinct set of pairs, both directions together."""
        runs: dict[Pairs, int] = {}
        for column, patterns in enumerate((self.down, self.up)):
            for index, count in zip(*np.unique(self.tick[:, column], return_counts=True), strict=True):
                if patterns[index]:
                    runs[patterns[index]] = runs.get(patterns[index], 0) + int(count)
        return runs

    def sends(self) -> tuple[int, int]:
        """(down, up): microbatches sent per step, over all stages (one per pair and tick)."""
        down, up = (
            int(sum(len(patterns[i]) for i in self.tick[:, column]))
            for column, patterns in enumerate((self.down, self.up))
        )
        return down, up


def send_patterns(plan: TickTable) -> SendPatterns:
    """Each tick's permute pairs, from the table's arrivals: what arrives at stage s from below
    comes from stage s - 1 (mod p), from above from s + 1 (mod p)."""
    p = plan.schedule.stages
    columns = []
    for arrivals, step in ((plan.recv_below_slot, -1), (plan.recv_above_slot, 1)):
        patterns: dict[Pairs, int] = {(): 0}
        index = [
            # numpy integers as the stages: they hash and compare as the ints Pairs names
            patterns.setdefault(tuple(((s + step) % p, s) for s in np.flatnonzero(row >= 0)), len(patterns))  # type: ignore[misc]
            for row in arrivals
        ]
        columns.append((tuple(patterns), index))
    (down, d_index), (up, u_index) = columns
    return SendPatterns(down, up, np.stack([d_index, u_index], axis=1).astype(np.int32))
