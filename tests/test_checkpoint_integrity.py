"""Checkpoint integrity: every file of a step and every array checked on restore, each damage named by
step, file and kind; falling back to an older step; a full disk mid-run.

One finished run (steps 5 and 10 saved) serves every case: each damages a copy of its directory."""

from __future__ import annotations

import json
import logging
import pathlib
import re
import resource
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from jax._src import compilation_cache as jax_compilation_cache
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib.training import checkpoint_integrity
from shardlib.training.checkpoint import UNUSABLE_DIR, Checkpointer, CheckpointError
from shardlib.training.checkpoint_integrity import FILE_DIGESTS, tree_digests, write_file_digests
from shardlib.training.cli import train_main
from shardlib.training.train_state import abstract_state
from shardlib.training.trainer import setup_training, train
from tests import procs
from tests.support import mesh_of, tiny_config

STEPS = 15
MESH_FILE = "meshes/cpu-8.yaml"  # data 4 x model 2, as mesh_of(data=4, model=2)


def integrity_config(run_dir: pathlib.Path, **overrides):
    return tiny_config(
        run_dir, **({"steps": STEPS, "sharding": "tp", "checkpoint": {"every": 5, "keep": 3}} | overrides)
    )


def digest_tree(directory: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def garble(step_dir: pathlib.Path, nbytes: int = 32, places: int = 8) -> pathlib.Path:
    """Overwrites ``nbytes`` at ``places`` spread points of the step's largest array data file with
    random bytes: same size, same names, as a bad disk or a botched copy leaves it. Returns the file."""
    data = _largest_data_file(step_dir)
    raw = bytearray(data.read_bytes())
    noise = np.random.default_rng(0).bytes(nbytes * places)
    for i in range(places):
        at = (2 * i + 1) * len(raw) // (2 * places)
        raw[at : at + nbytes] = noise[i * nbytes : (i + 1) * nbytes]
    data.write_bytes(bytes(raw))
    return data


def _size(path: pathlib.Path) -> int:
    return path.stat().st_size


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Steps 1..10 of a 15-step run, checkpoints at 5 and 10, and its compiled setup."""
    run_dir = tmp_path_factory.mktemp("finished")
    cfg = integrity_config(run_dir)
    setup = setup_training(cfg, mesh_of(data=4, model=2))
    result = train(cfg, setup.mesh, stop_at=10, setup=setup, progress=False, log=lambda _: None)
    assert result.final_step == 10
    return run_dir, setup, result.losses


def copy_of(finished, tmp_path: pathlib.Path) -> pathlib.Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    return run_dir


def test_digests_do_not_depend_on_the_sharding():
    x = jax.random.normal(jax.random.key(0), (16, 8))
    tree = {"w": x, "count": jnp.int32(7), "h": x.astype(jnp.bfloat16)}

    def placed(mesh, spec):
        return {k: jax.device_put(v, NamedSharding(mesh, spec if v.ndim else P())) for k, v in tree.items()}

    expected = tree_digests(placed(mesh_of(data=4, model=2), P("data", "model")))
    assert tree_digests(placed(mesh_of(data=2, model=2), P(None, "data"))) == expected
    assert tree_digests(placed(mesh_of(devices=1), P())) == expected
    assert set(expected) == {"w", "count", "h"} and expected["w"].startswith("float32:")
    flipped = np.array(x)
    flipped[3, 4] = np.nextafter(flipped[3, 4], np.inf)  # one bit
    swapped = np.array(x)[[1, 0, *range(2, 16)]]  # the same values elsewhere
    for other in (flipped, swapped):
        assert tree_digests({**tree, "w": jnp.asarray(other)})["w"] != expected["w"]


def _refuse_to_start(run_dir, finished) -> str:
    """The one-line error of a start on ``run_dir``; nothing under its checkpoints changes."""
    before = digest_tree(run_dir / "checkpoints")
    with pytest.raises(CheckpointError) as err:
        train(integrity_config(run_dir), finished[1].mesh, setup=finished[1], progress=False, log=lambda _: None)
    message = str(err.value)
    assert "older complete checkpoints: steps 5" in message and "checkpoint.fallback=true" in message, message
    assert "\n" not in message
    assert digest_tree(run_dir / "checkpoints") == before, "a failed start changed the checkpoints"
    return message


def rewrite_array(step_dir: pathlib.Path, name: str = "params.layers.qkv", factor: float = 1.01) -> None:
    """Rewrites one array of the step through tensorstore, in Orbax's own format (zarr in the step's OCDBT
    database): every file decodes, to other values."""
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{step_dir / 'state'}/"}, "path": name}
    store = ts.open(spec).result()
    store.write(store.read().result() * np.float32(factor)).result()


def restore_error(step_dir: pathlib.Path, finished, dtype=None) -> str:
    """The CheckpointError of restoring ``step_dir`` onto the run's targets (parameters in ``dtype``, if given)."""
    run = finished[1]
    params, opt_state = abstract_state(run.model, run.tx, run.shardings)
    if dtype is not None:
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding), params)
    checkpointer = Checkpointer(step_dir.parent, every=5, keep=3)
    with pytest.raises(CheckpointError) as err:
        checkpointer.restore(int(step_dir.name), params, opt_state)
    checkpointer.close()
    return str(err.value)


def test_values_rewritten_in_orbaxs_format_fail_the_checksum_in_any_target_dtype(tmp_path, finished):
    """What Orbax restores without complaint (a valid encoding of other values) is refused: by the file
    digests first (the rewrite added and changed files); listed again, as if the values had changed before
    the files were listed (in memory, on the way to disk), by the array checksum, also for a target of
    another dtype (verified in the dtype it was stored in, then cast)."""
    step_dir = copy_of(finished, tmp_path) / "checkpoints" / "10"
    rewrite_array(step_dir)
    message = restore_error(step_dir, finished)
    assert f"checkpoint step 10 at {step_dir} is damaged: state/manifest.ocdbt differs from what" in message, message
    write_file_digests(step_dir)
    for dtype in (None, jnp.bfloat16):
        message = restore_error(step_dir, finished, dtype)
        assert f"checkpoint step 10 at {step_dir} fails its checksum (params/layers/qkv differs" in message, message


def test_a_clean_step_restores_under_another_dtype_cast_from_the_stored_one(tmp_path, finished):
    run = finished[1]
    params, opt_state = abstract_state(run.model, run.tx, run.shardings)
    bf16 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16, sharding=a.sharding), params)
    checkpointer = Checkpointer(copy_of(finished, tmp_path) / "checkpoints", every=5, keep=3)
    stored, _, _ = checkpointer.restore(10, params, opt_state)
    cast, _, _ = checkpointer.restore(10, bf16, opt_state)
    checkpointer.close()
    for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(cast), strict=True):
        assert b.dtype == jnp.bfloat16 and b.sharding == a.sharding
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a.astype(jnp.bfloat16)))


def edit_meta(step_dir: pathlib.Path, edit) -> None:
    """Rewrites the step's meta item as valid JSON, changed by ``edit(record)``."""
    path = step_dir / "meta" / "metadata"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


META_EDITS = {
    "data_position": lambda record: record.update(data_position=record["data_position"] - 3),
    "checksums deleted": lambda record: record.pop("checksums"),
}


@pytest.mark.parametrize("edit", META_EDITS)
def test_edited_metadata_is_refused(tmp_path, finished, edit):
    """The meta item is covered by the file digests: another data position would resume on other batches."""
    step_dir = copy_of(finished, tmp_path) / "checkpoints" / "10"
    edit_meta(step_dir, META_EDITS[edit])
    message = _refuse_to_start(step_dir.parent.parent, finished)
    assert f"checkpoint step 10 at {step_dir} is damaged: meta/metadata differs from what" in message, message


def test_missing_checksums_are_an_error_unless_the_checkpoint_predates_them(tmp_path, finished):
    """Without its checksums and its file digests, a step whose meta was written by a version that records
    them is refused; one whose meta holds only what the versions before checksums wrote restores, saying so."""
    step_dir = copy_of(finished, tmp_path) / "checkpoints" / "10"
    edit_meta(step_dir, META_EDITS["checksums deleted"])
    (step_dir / FILE_DIGESTS).unlink()
    message = _refuse_to_start(step_dir.parent.parent, finished)
    assert f"checkpoint step 10 at {step_dir} is damaged: meta/metadata records no checksums" in message, message

    edit_meta(
        step_dir, lambda record: [record.pop(k) for k in set(record) - {"step", "data_position", "skipped_updates"}]
    )
    log: list[str] = []
    checkpointer = Checkpointer(step_dir.parent, every=5, keep=3)
    meta = checkpointer.read_meta(10, log=log.append)
    checkpointer.close()
    assert meta == {"step": 10, "data_position": 10, "skipped_updates": 0}
    assert log == [f"warning: checkpoint step 10 at {step_dir} predates checksums: restored without verification"], log


def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"), key=_size)


def _smallest_index_node(step_dir: pathlib.Path) -> pathlib.Path:
    """A b-tree node of process 0's OCDBT database, which the merged index at state/ supersedes: never read."""
    return min((p for p in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir()), key=_size)


def garble_file(path: pathlib.Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 8] = bytes(b ^ 0x5A for b in raw[len(raw) // 2 : len(raw) // 2 + 8])
    path.write_bytes(bytes(raw))


def cut_file(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


GARBLED_BYTES = r"differs from what was saved \(same size, other bytes: garbled or edited\)"
DAMAGED_FILES = {  # what damage, to which file, says what
    # Files restoring onto a target never reads (Orbax's record of the shardings, the per-process OCDBT
    # databases that the merged one at state/ supersedes): a damaged step, nonetheless.
    "shardings garbled": (lambda s: s / "state" / "_sharding", garble_file, GARBLED_BYTES),
    "process manifest garbled": (
        lambda s: s / "state" / "ocdbt.process_0" / "manifest.ocdbt",
        garble_file,
        GARBLED_BYTES,
    ),
    "index node garbled": (_smallest_index_node, garble_file, GARBLED_BYTES),
    # Files restoring reads, whose errors named neither the file nor the damage.
    "tree metadata garbled": (lambda s: s / "state" / "_METADATA", garble_file, GARBLED_BYTES),
    "data file garbled": (lambda s: garble(s), lambda _: None, GARBLED_BYTES),
    "data file deleted": (_largest_data_file, pathlib.Path.unlink, "is missing"),
    "data file cut short": (_largest_data_file, cut_file, r"differs from what was saved \(\d+ of \d+ bytes: cut short"),
    "file digests garbled": (
        lambda s: s / FILE_DIGESTS,
        garble_file,
        r"is garbled \(its list differs from its own digest\)",
    ),
    "file digests deleted": (lambda s: s / FILE_DIGESTS, pathlib.Path.unlink, "is missing"),
}


@pytest.mark.parametrize("case", DAMAGED_FILES)
def test_a_damaged_file_is_named_with_its_damage(tmp_path, finished, case):
    locate, damage, expected = DAMAGED_FILES[case]
    step_dir = copy_of(finished, tmp_path) / "checkpoints" / "10"
    path = locate(step_dir)
    damage(path)
    message = _refuse_to_start(step_dir.parent.parent, finished)
    name = re.escape(str(path.relative_to(step_dir)))
    assert re.search(f"checkpoint step 10 at {re.escape(str(step_dir))} is damaged: {name} {expected}", message), (
        message
    )
    assert "config and mesh" not in message, message


def test_an_unreadable_data_file_listed_by_size_only_is_never_blamed_on_the_config(tmp_path, finished, monkeypatch):
    """Data files over 1 MiB (a real model's) are listed by size only: one overwritten in place with
    random bytes cannot be decoded, and the error says a data file is damaged, not "another config"."""
    step_dir = copy_of(finished, tmp_path) / "checkpoints" / "10"
    monkeypatch.setattr(checkpoint_integrity, "HASHED_UP_TO", 32 * 1024)  # the metadata hashed, the data not
    write_file_digests(step_dir)
    data = _largest_data_file(step_dir)
    data.write_bytes(np.random.default_rng(0).bytes(data.stat().st_size))
    message = _refuse_to_start(step_dir.parent.parent, finished)
    unread = r"cannot be read \(.*\): (its data file|one of its data files) state/ocdbt.process_0/d/\w+.* is damaged"
    assert re.search(f"checkpoint step 10 at {re.escape(str(step_dir))} {unread}", message), message
    assert "config and mesh" not in message, message


def truncate(step_dir: pathlib.Path) -> None:
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[:16])


def garble_step_metadata(step_dir: pathlib.Path) -> None:
    """Orbax's own record of the step, which Orbax reads when it lists the steps (and logged an absl ERROR)."""
    garble_file(step_dir / "_CHECKPOINT_METADATA")


def delete_step_metadata(step_dir: pathlib.Path) -> None:
    """As above, an absl WARNING."""
    (step_dir / "_CHECKPOINT_METADATA").unlink()


@pytest.mark.parametrize("damage", [garble, truncate, garble_step_metadata, delete_step_metadata])
def test_a_bad_checkpoint_is_one_error_line_of_the_cli(tmp_path, finished, capfd, caplog, damage):
    """No Orbax traceback or absl log, no tensorstore "Event loop is closed": one line naming the step,
    the damaged file and the older steps."""
    run_dir = copy_of(finished, tmp_path)
    damage(run_dir / "checkpoints" / "10")
    config = procs.write_config(integrity_config(run_dir), tmp_path / "cfg.yaml")
    capfd.readouterr()
    assert train_main(["--config", str(config), "--mesh", MESH_FILE, "--no-progress"]) == 2
    out, err = capfd.readouterr()
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"error: checkpoint step 10 at {run_dir / 'checkpoints' / '10'} " in line, line
    assert "older complete checkpoints: steps 5 (checkpoint.fallback=true" in line, line
    assert " is damaged: " in line, line
    assert len(err.splitlines()) <= 2 and "Traceback" not in out + err and "Event loop" not in out + err, err
    logged = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [line for line in logged if line.startswith("absl")], logged  # what a terminal would show


def test_fallback_resumes_from_the_newest_good_step_and_keeps_the_bad_one(tmp_path, finished):
    """An edited data position (valid JSON, the step's arrays intact) is a bad step like any other: the run
    resumes from step 5, whose state it then calls the last good checkpoint, never from step 10's."""
    run_dir = copy_of(finished, tmp_path)
    edit_meta(run_dir / "checkpoints" / "10", META_EDITS["data_position"])
    bad = digest_tree(run_dir / "checkpoints" / "10")
    log: list[str] = []
    cfg = integrity_config(run_dir, checkpoint={"every": 5, "keep": 3, "fallback": True})
    result = train(cfg, finished[1].mesh, setup=finished[1], progress=False, log=log.append)

    assert result.start_step == 5 and result.final_step == STEPS
    assert result.losses[:5] == finished[2][5:10], "the fallback did not resume step 5's state exactly"
    text = "\n".join(log)
    assert "checkpoint step 10 at" in text and "is damaged: meta/metadata differs from what was saved" in text, text
    assert "checkpoint.fallback: resuming from step 5; step 10 moved to" in text, text
    (kept,) = (run_dir / UNUSABLE_DIR).iterdir()
    assert kept.name.startswith("10-") and digest_tree(kept) == bad, "the bad checkpoint was not kept as it was"
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [5, 10, 15]


@pytest.fixture
def small_file_limit(monkeypatch):
    """Writes past 64 KiB fail with EFBIG, in this process and its threads, as on a full disk.

    JAX's persistent compilation cache (tests/conftest.py) writes its entries in place, so
    it is kept from writing meanwhile: a truncated entry would poison later runs.
    """
    monkeypatch.setattr(jax_compilation_cache, "put_executable_and_time", lambda *args, **kwargs: None)
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def apply(on: bool = True):
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, previous_limit[1]) if on else previous_limit)

    try:
        yield apply
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_handler)


def test_full_disk_mid_run_is_one_error_line_and_keeps_the_last_checkpoint(tmp_path, finished, capfd, small_file_limit):
    """Resumed at 10 with keep=1: the asynchronous save of 15 fails in the background; the save of
    20 reports it as one line, exit status 2; steps 5 and 10 survive (a completed 15 would prune them)."""
    run_dir = copy_of(finished, tmp_path)
    before = digest_tree(run_dir / "checkpoints")
    cfg = integrity_config(run_dir, steps=20, checkpoint={"every": 5, "keep": 1})
    config = procs.write_config(cfg, tmp_path / "cfg.yaml")
    capfd.readouterr()
    small_file_limit()
    status = train_main(["--config", str(config), "--mesh", MESH_FILE, "--no-progress"])
    small_file_limit(on=False)
    out, err = capfd.readouterr()

    assert status == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out + err and len(err.splitlines()) <= 3, err[-3000:]
    assert f"saving step 15 in {run_dir / 'checkpoints'} failed" in errors[0], errors[0]
    assert f"step 10 at {run_dir / 'checkpoints' / '10'} is kept" in errors[0], errors[0]
    after = digest_tree(run_dir / "checkpoints")
    assert {k: v for k, v in after.items() if k.split("/")[0] in ("5", "10")} == before, "a failed save changed them"
    checkpointer = Checkpointer(run_dir / "checkpoints", every=5, keep=3)
    run = finished[1]
    _, _, meta = checkpointer.restore(10, *abstract_state(run.model, run.tx, run.shardings))
    checkpointer.close()
    assert meta["data_position"] == 10


# --------------------------------------------------------------------------- shardlib check, offline
# The same finished run, checked without training (shardlib.training.run_check): what a start would find.


def _check(run_dir: pathlib.Path, capsys, *flags: str) -> tuple[int, str]:
    """(exit status, stdout) of ``shardlib check run_dir``; the run directory is byte for byte as it was."""
    from shardlib.commands import main

    before = digest_tree(run_dir)
    status = main(["check", str(run_dir), *flags])
    assert digest_tree(run_dir) == before, "shardlib check changed the run directory"
    return status, capsys.readouterr().out


def test_check_of_a_clean_run_names_the_step_a_start_resumes_and_the_fingerprint(tmp_path, finished, capsys):
    from shardlib.training.run_check import YES, check_run
    from shardlib.training.run_guard import digest, recorded_fingerprint

    run_dir = copy_of(finished, tmp_path)
    shutil.copytree(run_dir / "checkpoints" / "10", run_dir / "checkpoints" / "15.orbax-checkpoint-tmp-0")
    status, out = _check(run_dir, capsys)
    assert status == 0 and out.startswith(f"{run_dir}: a start resumes from step 10\n"), out
    assert re.search(r"^\s+5\s+5\s+ok \(\d+\)\s+not read\s+yes$", out, flags=re.MULTILINE), out
    assert re.search(r"^\s+10\s+10\s+ok \(\d+\)\s+not read\s+yes$", out, flags=re.MULTILINE), out
    assert "incomplete save (never restored from): 15.orbax-checkpoint-tmp-0" in out
    fingerprint = digest(recorded_fingerprint(run_dir))
    assert f"config fingerprint {fingerprint} (1 start(s) recorded, last at " in out
    assert "model n_layers 2, d_model 32; data stdlib; seed 0; batch 16 x 16" in out
    deep = check_run(run_dir, deep=True)
    assert [(s.step, s.arrays, s.restores) for s in deep.steps] == [(5, "ok (29)", YES), (10, "ok (29)", YES)]


def test_check_fails_on_a_damaged_newest_step_naming_the_file_and_the_fallback(tmp_path, finished, capsys):
    run_dir = copy_of(finished, tmp_path)
    path = garble(run_dir / "checkpoints" / "10")
    status, out = _check(run_dir, capsys)
    assert status == 1, out
    assert out.startswith(
        f"{run_dir}: DAMAGED: the newest step 10 does not restore; a start fails unless checkpoint.fallback=true, "
        "which resumes from step 5\n"
    ), out
    assert re.search(r"^\s+10\s+-\s+damaged\s+not read\s+no$", out, flags=re.MULTILINE), out
    name = path.relative_to(run_dir / "checkpoints" / "10")
    assert f"  step 10: {name} differs from what was saved (same size, other bytes: garbled or edited)\n" in out


def test_check_deep_reads_the_arrays_a_relisted_step_holds(tmp_path, finished, capsys):
    """Values rewritten in Orbax's format with the files listed again pass every file check: only the arrays'
    checksums tell, and only --deep reads them. With the newest step damaged too, nothing restores."""
    run_dir = copy_of(finished, tmp_path)
    rewrite_array(run_dir / "checkpoints" / "5")
    write_file_digests(run_dir / "checkpoints" / "5")
    garble(run_dir / "checkpoints" / "10")
    status, out = _check(run_dir, capsys)
    assert status == 1 and re.search(r"^\s+5\s+5\s+ok \(\d+\)\s+not read\s+yes$", out, flags=re.MULTILINE), out
    status, out = _check(run_dir, capsys, "--deep")
    assert status == 1 and out.startswith(f"{run_dir}: DAMAGED: no step restores (2 checked)"), out
    assert re.search(r"^\s+5\s+5\s+ok \(\d+\)\s+differ\s+no$", out, flags=re.MULTILINE), out
    assert "  step 5: fails its checksum (params/layers/qkv differs from what was saved: the files are corrupt)" in out


def test_check_of_a_directory_that_is_no_run_is_one_error_line(tmp_path, capsys):
    from shardlib.commands import main

    assert main(["check", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} is not a run directory: it holds neither")
    assert list(tmp_path.iterdir()) == []
