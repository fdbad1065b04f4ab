"""Checkpoint integrity: checksums verified on restore, falling back to an older step, a full disk mid-run."""

from __future__ import annotations

import json
import pathlib
import re
import resource
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import compilation_cache as jax_compilation_cache
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib.training.checkpoint import UNUSABLE_DIR, Checkpointer, CheckpointError, tree_digests
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
    random bytes: same size, same names, as a bad disk or a botched copy leaves it.

    Several points, not one: the data file can hold bytes no array refers to (where they fall
    depends on the order the asynchronous writes landed in), and garbling only those changes no
    value, which no checksum of values can see: one full run of the suite did, garbling one point."""
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"), key=_size)
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


# Garbled bytes that land in a compressed chunk stop the decoder; those that land in stored values
# decode to other values, which only the checksum sees. Where they land depends on the order the
# asynchronous writes took, so a garbled step is refused for either reason.
GARBLED = r"(fails its checksum|cannot be restored for this config and mesh \(.*(decompress|ZSTD|corrupt))"


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


def test_garbled_checkpoint_is_refused_and_kept(tmp_path, finished):
    run_dir = copy_of(finished, tmp_path)
    garble(run_dir / "checkpoints" / "10")
    message = _refuse_to_start(run_dir, finished)
    assert re.search(f"checkpoint step 10 at {re.escape(str(run_dir / 'checkpoints' / '10'))} {GARBLED}", message)


def test_values_that_decode_but_differ_fail_the_checksum(tmp_path, finished):
    """What Orbax restores without complaint (other values, valid encoding), the checksum refuses:
    here the record of one array's digest no longer matches the array."""
    run_dir = copy_of(finished, tmp_path)
    meta = run_dir / "checkpoints" / "10" / "meta" / "metadata"
    record = json.loads(meta.read_text())
    arrays = record["checksums"]["arrays"]
    name = "params/layers/qkv"
    kind, digest = arrays[name].split(":")
    arrays[name] = f"{kind}:{int(digest, 16) ^ 1:016x}"
    meta.write_text(json.dumps(record))
    message = _refuse_to_start(run_dir, finished)
    assert f"checkpoint step 10 at {run_dir / 'checkpoints' / '10'} fails its checksum ({name}" in message, message


def truncate(step_dir: pathlib.Path) -> None:
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[:16])


@pytest.mark.parametrize("damage", [garble, truncate])
def test_a_bad_checkpoint_is_one_error_line_of_the_cli(tmp_path, finished, capfd, damage):
    """No Orbax traceback, no tensorstore "Event loop is closed": one line naming the step and the older ones."""
    run_dir = copy_of(finished, tmp_path)
    damage(run_dir / "checkpoints" / "10")
    config = procs.write_config(integrity_config(run_dir), tmp_path / "cfg.yaml")
    capfd.readouterr()
    assert train_main(["--config", str(config), "--mesh", MESH_FILE, "--no-progress"]) == 2
    out, err = capfd.readouterr()
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"error: checkpoint step 10 at {run_dir / 'checkpoints' / '10'} " in line, line
    assert "older complete checkpoints: steps 5 (checkpoint.fallback=true" in line, line
    assert len(err.splitlines()) <= 2 and "Traceback" not in out + err and "Event loop" not in out + err, err


def test_fallback_resumes_from_the_newest_good_step_and_keeps_the_bad_one(tmp_path, finished):
    run_dir = copy_of(finished, tmp_path)
    garble(run_dir / "checkpoints" / "10")
    bad = digest_tree(run_dir / "checkpoints" / "10")
    log: list[str] = []
    cfg = integrity_config(run_dir, checkpoint={"every": 5, "keep": 3, "fallback": True})
    result = train(cfg, finished[1].mesh, setup=finished[1], progress=False, log=log.append)

    assert result.start_step == 5 and result.final_step == STEPS
    assert result.losses[:5] == finished[2][5:10], "the fallback did not resume step 5's state exactly"
    text = "\n".join(log)
    assert "checkpoint step 10 at" in text and re.search(GARBLED, text), text
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
