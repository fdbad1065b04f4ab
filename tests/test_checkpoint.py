"""Checkpoints: bitwise resume, restore onto another mesh, and clear errors that lose nothing."""

import hashlib
import pathlib
import shutil

import jax
import numpy as np
import pytest

from shardlib.training.checkpoint import Checkpointer, CheckpointError
from shardlib.training.data import load_token_splits
from shardlib.training.train_state import abstract_state
from shardlib.training.trainer import setup_training, train
from tests.support import mesh_of, tiny_config

quiet = {"progress": False, "log": lambda _: None}


def _tree_digest(directory: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A 10-step run on data=4 x model=2 that stopped after step 5 (checkpoint at 5)."""
    run_dir = tmp_path_factory.mktemp("saved")
    cfg = tiny_config(run_dir, sharding="tp")
    result = train(cfg, mesh_of(data=4, model=2), stop_at=5, **quiet)
    assert result.final_step == 5
    return cfg


@pytest.fixture(scope="module")
def straight_losses(tmp_path_factory):
    """The losses of saved_run's config trained 10 steps without a stop."""
    run_dir = tmp_path_factory.mktemp("straight")
    return train(tiny_config(run_dir, sharding="tp"), mesh_of(data=4, model=2), **quiet).losses


def test_resume_is_bitwise_identical(tmp_path, saved_run, straight_losses):
    # saved_run stopped after 5 of 10 steps; copy it so the module fixture stays at step 5.
    resumed_dir = tmp_path / "resumed"
    _copy_tree(pathlib.Path(saved_run.run_dir), resumed_dir)
    second = train(tiny_config(resumed_dir, sharding="tp"), mesh_of(data=4, model=2), **quiet)

    assert second.start_step == 5
    assert len(straight_losses) == 10 and len(second.losses) == 5
    assert second.losses == straight_losses[5:], "resumed losses differ from the uninterrupted run"
    assert straight_losses[0] > straight_losses[-1], "the run did not train"


def _separate(tree):
    """Every fused layer stack of ``tree`` split into the five weights checkpoints held before the fusion.

    Written out here, index by index, rather than with shardlib's own conversion: query head
    h = n * G + g was q[:, :, h]; it is qkv slot g of kv head n; k and v are slots G and G + 1.
    """

    def split(node):
        qkv, gate_up = np.asarray(node.pop("qkv")), np.asarray(node.pop("gate_up"))
        n, slots = qkv.shape[2:4]
        group = slots - 2
        q = np.stack([qkv[:, :, h // group, h % group] for h in range(n * group)], axis=2)
        attention = {"q": q, "k": qkv[:, :, :, group], "v": qkv[:, :, :, group + 1]}
        return node | attention | {"gate": gate_up[:, :, 0], "up": gate_up[:, :, 1]}

    def is_layers(x):
        return isinstance(x, dict) and "qkv" in x

    return jax.tree.map(lambda x: split(dict(x)) if is_layers(x) else x, tree, is_leaf=is_layers)


def _save_as_before_checksums(directory: pathlib.Path, step: int, state: dict, meta: dict) -> None:
    """A step as the code before checksums (and before the fused projections) wrote it: Orbax's standard
    handler, and a meta of the step, the data position and the skip count only."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(directory, item_names=("state", "meta"))
    meta = {"step": step, "data_position": meta["data_position"], "skipped_updates": meta["skipped_updates"]}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    manager.close()


def test_a_checkpoint_from_before_the_checksums_and_the_fused_projections_resumes_exactly(
    tmp_path, saved_run, straight_losses
):
    """saved_run's step 5 rewritten as the code before the checksums and the fusion saved it (layers/q, k, v,
    gate, up in params and in both AdamW moments; a meta without checksums, layout or ``projections``): the run
    resumes on the fused model with the very losses of the uninterrupted run, saying that the step was not
    verified and that it was converted."""
    run_dir = tmp_path / "old"
    _copy_tree(pathlib.Path(saved_run.run_dir), run_dir)
    mesh = mesh_of(data=4, model=2)
    run = setup_training(saved_run, mesh)
    with jax.set_mesh(mesh):
        checkpointer = Checkpointer(run_dir / "checkpoints", every=5, keep=3, async_save=False)
        params, opt_state, meta = checkpointer.restore(5, *abstract_state(run.model, run.tx, run.shardings))
        old_params, old_opt_state = _separate(jax.device_get((params, opt_state)))
        shutil.rmtree(checkpointer.step_path(5))
        checkpointer.close()
        replicated = jax.NamedSharding(mesh, jax.P())
        old_state = jax.device_put({"params": old_params, "opt_state": old_opt_state}, replicated)
        _save_as_before_checksums(run_dir / "checkpoints", 5, old_state, meta)
    assert "q" in old_params["layers"] and "qkv" not in old_opt_state[1][0].mu["layers"]

    logged = []
    resumed = train(tiny_config(run_dir, sharding="tp"), mesh, progress=False, log=logged.append)
    assert resumed.start_step == 5
    assert resumed.losses == straight_losses[5:], "the converted checkpoint resumed with other losses"
    assert any("converted to layers/qkv and layers/gate_up" in line for line in logged), logged
    unverified = f"warning: checkpoint step 5 at {run_dir / 'checkpoints' / '5'} predates checksums"
    assert any(line.startswith(unverified) for line in logged), logged


def test_restore_onto_another_mesh(saved_run):
    """Saved on 8 devices (data 4 x model 2, tp); restored on 4 (data 2 x model 2, fsdp) and on 8 under
    HSDP (data_replica 2 x data 2 x model 2, a copy per replica group)."""
    losses = {}
    for name, sharding, mesh in [
        ("saved mesh", "tp", mesh_of(data=4, model=2)),
        ("other mesh", "fsdp", mesh_of(data=2, model=2)),
        ("hsdp mesh", "hsdp_tp", mesh_of(data_replica=2, data=2, model=2)),
    ]:
        cfg = saved_run.model_copy(update={"sharding": sharding})
        run = setup_training(cfg, mesh)
        checkpointer = Checkpointer(pathlib.Path(cfg.run_dir) / "checkpoints", every=5, keep=3)
        params, _, meta = checkpointer.restore(5, *abstract_state(run.model, run.tx, run.shardings))
        checkpointer.close()
        assert meta["data_position"] == 5
        assert len(params["layers"]["qkv"].sharding.device_set) == mesh.size
        tokens, _ = load_token_splits(cfg.data)
        next_batch = run.loader(tokens, seed=cfg.seed, position=meta["data_position"]).next()
        losses[name] = float(run.eval_step(params, next_batch))
    assert abs(losses["saved mesh"] - losses["other mesh"]) <= 1e-5, losses
    assert abs(losses["saved mesh"] - losses["hsdp mesh"]) <= 1e-5, losses


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tensorstore's noisy coroutines
def test_unreadable_checkpoint_names_step_and_path_and_is_kept(tmp_path, saved_run):
    run_dir = tmp_path / "corrupt"
    _copy_tree(pathlib.Path(saved_run.run_dir), run_dir)
    step_dir = run_dir / "checkpoints" / "5"
    victims = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 64]
    assert victims, "no data files found in the checkpoint"
    for path in victims:  # truncate the array data, as a crashed copy would
        path.write_bytes(path.read_bytes()[:16])
    before = _tree_digest(run_dir / "checkpoints")

    with pytest.raises(CheckpointError, match=r"checkpoint step 5 at .*checkpoints/5") as err:
        train(tiny_config(run_dir, sharding="tp"), mesh_of(data=4, model=2), **quiet)
    assert "\n" not in str(err.value), "the error is not one line"
    assert _tree_digest(run_dir / "checkpoints") == before, "a failed run changed the checkpoints"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tensorstore's noisy coroutines
def test_checkpoint_of_another_config_is_a_clear_error(tmp_path, saved_run):
    """The run guard (tests/test_run_guard.py) stops this first; without its records, Orbax's error is one line."""
    run_dir = tmp_path / "other_config"
    _copy_tree(pathlib.Path(saved_run.run_dir), run_dir)
    for record in ("config.json", "config-history.jsonl"):
        (run_dir / record).unlink()
    before = _tree_digest(run_dir / "checkpoints")
    wider = tiny_config(run_dir, sharding="tp", model={"d_model": 64})
    misfit = (
        r"cannot be restored for this config and mesh \(it holds \S+ of shape \(\d+, 32\), this run needs \(\d+, 64\)\)"
    )
    with pytest.raises(CheckpointError, match=rf"checkpoint step 5 at .*checkpoints/5 {misfit}") as err:
        train(wider, mesh_of(data=4, model=2), **quiet)
    assert "\n" not in str(err.value) and "no older checkpoint" in str(err.value), str(err.value)
    assert _tree_digest(run_dir / "checkpoints") == before


def test_keeps_the_last_k(tmp_path):
    cfg = tiny_config(tmp_path, steps=4, checkpoint={"every": 1, "keep": 2})
    train(cfg, mesh_of(devices=1), **quiet)
    checkpointer = Checkpointer(tmp_path / "checkpoints", every=1, keep=2)
    assert checkpointer.all_steps() == [3, 4]
    checkpointer.close()
    # Starting a finished run again trains nothing and touches nothing.
    before = _tree_digest(tmp_path / "checkpoints")
    again = train(cfg, mesh_of(devices=1), **quiet)
    assert (again.start_step, again.losses) == (4, [])
    assert _tree_digest(tmp_path / "checkpoints") == before


def test_restored_state_equals_saved_state(tmp_path):
    cfg = tiny_config(tmp_path, steps=2, checkpoint={"every": 2})
    mesh = mesh_of(data=4, model=2)
    run = setup_training(cfg, mesh)
    params, opt_state = run.init_state()
    expected = jax.device_get((params, opt_state))
    checkpointer = Checkpointer(tmp_path / "ckpt", every=1, keep=1)
    checkpointer.save(1, params, opt_state, {"data_position": 3})
    checkpointer.wait()
    restored_params, restored_opt, meta = checkpointer.restore(1, *abstract_state(run.model, run.tx, run.shardings))
    checkpointer.close()
    assert meta == {"step": 1, "data_position": 3}
    for a, b in zip(
        jax.tree.leaves(expected), jax.tree.leaves(jax.device_get((restored_params, restored_opt))), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(restored_opt) == jax.tree.structure(opt_state)


def test_a_checkpoint_written_by_orbaxs_standard_handler_restores(tmp_path):
    """Checkpoints from before the arrays were saved one replica at a time (Orbax's StandardSave,
    replica-parallel) and before file digests restore bitwise, with their checksums verified, saying
    that the rest is not."""
    import orbax.checkpoint as ocp

    from shardlib.training.checkpoint_integrity import DIGEST, tree_digests

    cfg = tiny_config(tmp_path)
    run = setup_training(cfg, mesh_of(data=4, model=2))
    params, opt_state = run.init_state()
    state = {"params": params, "opt_state": opt_state}
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", "meta"))
    meta = {"step": 1, "checksums": {"algorithm": DIGEST, "arrays": tree_digests(state)}}
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    manager.close()
    checkpointer = Checkpointer(tmp_path / "ckpt", every=1, keep=1)
    logged: list[str] = []
    checkpointer.read_meta(1, log=logged.append)
    restored = checkpointer.restore(1, *abstract_state(run.model, run.tx, run.shardings))
    checkpointer.close()
    unverified = (
        "predates file digests: its arrays are verified by their checksums, its metadata and other files are not"
    )
    assert logged == [f"warning: checkpoint step 1 at {tmp_path / 'ckpt' / '1'} {unverified}"], logged
    expected = jax.device_get((params, opt_state))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(restored[:2])), strict=True):
        np.testing.assert_array_equal(a, b)


def _copy_tree(src: pathlib.Path, dst: pathlib.Path) -> None:
    shutil.copytree(src, dst)


def test_the_gist_of_a_tensorstore_error_keeps_what_was_read_and_why():
    """What tensorstore said when restoring a step whose index file was cut to 10 bytes (its long path
    shortened here), specs included: the array, the file and the reason survive; the specs go."""
    from shardlib.training.checkpoint_noise import gist

    state = "/very/long/path/of/a/run/directory/on/a/cluster/filesystem/checkpoints/10/state"
    spec = '{\\"context\\":{\\"cache_pool\\":{}},\\"driver\\":\\"zarr\\"}'
    error = ValueError(
        'OUT_OF_RANGE: Error opening "cast" driver: Error opening "zarr" driver: Error reading '
        f'"params.unembed/.zarray" in OCDBT database at local file "{state}/": Error reading Byte range '
        f'[0, 2834) of local file "{state}/d/0539432570faf28110c7d75a321c777e": Requested byte range [0, 2834) '
        f"is not valid for value of size 10 [tensorstore_spec='{spec * 20}'] [tensorstore_spec[1]='{spec * 20}']"
    )
    text = gist(error)
    assert len(text) <= 260 and "tensorstore_spec" not in text and "driver" not in text, text
    for kept in ('"params.unembed/.zarray"', "d/0539432570faf28110c7d75a321c777e", "is not valid for value of size 10"):
        assert kept in text, text
