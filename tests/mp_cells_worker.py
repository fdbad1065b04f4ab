"""One process of a multi-process run of compatibility cells (tests/test_multiprocess_cells.py).

``python -m shardlib.cluster.launch --processes 2 -- tests/mp_cells_worker.py OUT COMBO...``:
each process emulates 4 CPU devices and joins the run; for every ``COMBO`` (features joined
by ``+``, as tests/test_compat.py names them) it builds that cell's setup on a mesh whose
devices come from both processes, runs one train step (plain SGD, as tests/test_compat.py's
cells do) on the walk's batch, and process 0 writes its loss, the gradients it applied
(gathered whole, in logical layer order) and a pipeline's eval loss to ``OUT/<combo>.npz``
for the test to hold against one device.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np

DEVICES_PER_PROCESS = 4


def _spanning_devices(count: int) -> list[jax.Device]:
    """``count`` devices, alternating between the processes, so that every mesh axis of
    size >= 2 can cross a process boundary and every mesh spans all processes."""
    by_process = [sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id) for p in range(2)]
    alternating = [d for pair in zip(*by_process, strict=True) for d in pair]
    return alternating[:count]


def _global(array: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _run_cell(combo: tuple[str, ...], out: pathlib.Path) -> None:
    from shardlib.core.mesh import build_mesh, mesh_spec
    from tests.test_compat import _batch, _cfg, _config, active_features, sgd_setup, step_outputs

    raw, sizes = _config(combo)
    count = int(np.prod(list(sizes.values())))
    mesh = build_mesh(mesh_spec(**sizes), _spanning_devices(count))
    assert {d.process_index for d in mesh.devices.flat} == {0, 1}, "a cell run inside one process"
    cfg = _cfg(raw)
    run = sgd_setup(cfg, mesh)
    assert set(run.plan.active_features()) == active_features(combo), (run.plan.active_features(), combo)
    batch = {k: _global(v, run.batch_sharding) for k, v in _batch(cfg.model.vocab_size).items()}
    # Gathered whole onto every device in one program (process_allgather compiles one for each leaf).
    whole = jax.jit(lambda tree: tree, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def fetch(tree):
        return jax.tree.map(lambda leaf: np.asarray(leaf.addressable_data(0)), whole(tree))

    loss, grads, eval_loss = step_outputs(run, batch, fetch)
    results = {"loss": np.float64(loss), "grads": grads}
    if eval_loss is not None:
        results["eval_loss"] = np.float64(eval_loss)
    if jax.process_index() == 0:
        flat = {
            jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(results)[0]
        }
        np.savez(out / f"{'+'.join(combo)}.npz", **flat)
        print(f"cell {'+'.join(combo)}: loss {loss:.6f}", flush=True)


def main(argv: list[str]) -> int:
    out, combos = pathlib.Path(argv[0]), [tuple(c.split("+")) for c in argv[1:]]
    jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
    from shardlib.cluster.join import join, join_settings

    join(join_settings(), peer_timeout_s=60.0)
    assert jax.process_count() == 2 and len(jax.devices()) == 2 * DEVICES_PER_PROCESS
    for combo in combos:
        _run_cell(combo, out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `tests` as a package
    sys.exit(main(sys.argv[1:]))
