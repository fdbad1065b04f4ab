"""What a checkpoint step's integrity covers, and the checks that prove it on restore.

Orbax writes a step (``checkpoints/<step>/``) as ``state/`` (the arrays:
zarr arrays in an OCDBT database, one per process under ``ocdbt.process_<i>/``
with their index merged at ``state/``; Orbax's tree ``_METADATA`` and its
record of the shardings ``_sharding``), ``meta/metadata`` (JSON: step, data
position, layout, checksums), Orbax's ``_CHECKPOINT_METADATA`` and
``commit_success.txt`` markers. Restoring onto a target reads only some of
them, and tensorstore does not notice bytes garbled in a data file: they
restore as other numbers. Three records cover every file of a step:

* **Array checksums** (``meta["checksums"]["arrays"]``: {leaf path:
  "dtype:digest"}), computed on the devices from the values being saved. The
  digest (``array_digest``) is a sum, modulo 2**32, over elements of a
  murmur3-mixed hash of (element bits, flat index), in two lanes. Sums of
  integers are exact in any order, so the digest of the *global* array does not
  depend on how it is sharded: every process of a run restored onto another
  mesh, device count or number of processes verifies the whole array (a
  per-shard crc32 could only be checked by a process that reads back the very
  shards it wrote). One jitted reduction reads the state once, without a host
  copy; fetching its few bytes waits for the same step Orbax's own device-to-host
  copy waits for. A leaf is restored, and verified, in the dtype it was stored
  in, then cast to the target's (``stored_dtype_target``, ``cast_to``).
* **File digests** (``file_digests.json`` in the step): the size of every file
  and the sha256 of every file up to ``HASHED_UP_TO`` (the JSON metadata, the
  OCDBT manifests and b-tree nodes; data files larger than that are covered by
  the array checksums). The primary process writes it once every process's
  files are complete, into the temporary directory that Orbax then renames into
  place, so a complete step always has one. A file missing, cut short, grown or
  holding other bytes is named (:class:`Damaged`). This covers the files
  restoring never reads (``state/_sharding``; the per-process OCDBT manifests
  and nodes, which the merged index supersedes) and the meta item itself: an
  edited data position or a deleted ``checksums`` key is a changed
  ``meta/metadata``, and the meta records that the step has file digests
  (``checksums.files``), so deleting them is noticed as well.
* **Orbax's step metadata** (``_CHECKPOINT_METADATA``) and the step's
  ``commit_success.txt`` are rewritten by Orbax after the file digests (the
  commit time): the first must be readable JSON (Orbax reads it to list the
  steps), the second (a marker, never read on a local filesystem) is not checked.

Older checkpoints. A checkpoint written before file digests has array
checksums only: it restores with a warning that its metadata and its other
files are unverified. Before checksums, a checkpoint's meta held only
``PRE_CHECKSUM_KEYS``: it restores with a warning that nothing was verified.
Any other meta without checksums has lost them, and is refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

PyTree = Any
DIGEST = "fmix32-sum-2x32-v1"  # the algorithm's name, stored with the digests
CHECKSUMS = "checksums"  # the meta key
FILE_DIGESTS = "file_digests.json"
HASHED_UP_TO = 1 << 20  # bytes: larger files are listed by size
STEP_METADATA = "_CHECKPOINT_METADATA"
COMMIT_MARKER = "commit_success.txt"
# What the meta of a checkpoint from before the checksums held (its version wrote nothing else).
PRE_CHECKSUM_KEYS = frozenset({"step", "data_position", "skipped_updates"})


class Damaged(ValueError):
    """A step's files are not as they were saved; the message names the file (relative to the step) and the damage."""


# --------------------------------------------------------------------------- array checksums


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's finaliser: every input bit flips about half the output bits (uint32 wraps)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (8-byte dtypes gain a trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def array_digest(x: jax.Array) -> jax.Array:
    """uint32[2] digest of ``x``'s values and positions, the same under any sharding."""
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    mixed = _fmix32(words ^ _fmix32(index + jnp.uint32(0x9E3779B9)))
    second = _fmix32(mixed + jnp.uint32(0x7F4A7C15))
    return jnp.stack([jnp.sum(mixed, dtype=jnp.uint32), jnp.sum(second, dtype=jnp.uint32)])


@functools.cache
def _digest_fn(out_sharding):
    return jax.jit(lambda leaves: [array_digest(x) for x in leaves], out_shardings=out_sharding)


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def tree_digests(tree: PyTree) -> dict[str, str]:
    """{leaf path: "dtype:16 hex digits"} of a tree of (possibly sharded, multi-process) arrays."""
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(tree), strict=True)
    mesh = next((x.sharding.mesh for x in leaves if isinstance(x.sharding, NamedSharding)), None)
    replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    digests = jax.device_get(_digest_fn(replicated)(list(leaves)))  # tiny: 8 bytes per array
    return {
        _leaf_name(path): f"{x.dtype}:{int(d[0]):08x}{int(d[1]):08x}"
        for path, x, d in zip(paths, leaves, digests, strict=True)
    }


def checksums_record(state: PyTree) -> dict:
    """The meta's ``checksums``: the algorithm, every array's digest, and that the step lists its files."""
    return {"algorithm": DIGEST, "arrays": tree_digests(state), "files": FILE_DIGESTS}


def stored_dtype_target(target: PyTree, checksums: dict | None) -> PyTree:
    """``target`` with every leaf in the dtype its checksum records (leaves without one as they are)."""
    arrays = (checksums or {}).get("arrays", {})

    def stored(path, leaf):
        dtype = arrays.get(_leaf_name(path), str(leaf.dtype)).split(":")[0]
        if dtype == str(leaf.dtype):
            return leaf
        try:
            return jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(dtype), sharding=leaf.sharding)
        except TypeError as err:
            raise Damaged(f"meta/metadata records {_leaf_name(path)} in an unknown dtype {dtype!r}") from err

    return jax.tree_util.tree_map_with_path(stored, target)


def cast_to(restored: PyTree, target: PyTree) -> PyTree:
    """``restored`` with each leaf in its target's dtype, on its own sharding (a no-op where they agree)."""

    def cast(x, like):
        if x.dtype == like.dtype:
            return x
        return jax.jit(lambda a: a.astype(like.dtype), out_shardings=x.sharding)(x)

    return jax.tree.map(cast, restored, target)


def mismatched_arrays(checksums: dict, restored: PyTree) -> list[str]:
    """Paths of ``restored`` (read in its stored dtypes) whose digest is not the one recorded, or has none."""
    saved = checksums["arrays"]
    return [path for path, digest in tree_digests(restored).items() if saved.get(path) != digest]


# --------------------------------------------------------------------------- file digests


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _listed_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """Every file of the step but the list itself and what Orbax rewrites after it (see the module doc)."""
    skipped = {FILE_DIGESTS, STEP_METADATA, COMMIT_MARKER}
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.relative_to(step_dir).as_posix() not in skipped)


def _own_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_file_digests(step_dir: pathlib.Path) -> None:
    """Writes ``file_digests.json`` of the complete files in ``step_dir`` (by one process), with a digest of its own."""
    files = {}
    for path in _listed_files(step_dir):
        size = path.stat().st_size
        record = {"bytes": size, "sha256": _sha256(path)} if size <= HASHED_UP_TO else {"bytes": size}
        files[path.relative_to(step_dir).as_posix()] = record
    partial = step_dir / f".{FILE_DIGESTS}.partial"
    partial.write_text(json.dumps({"algorithm": "sha256", "files": files, "digest": _own_digest(files)}, indent=1))
    os.replace(partial, step_dir / FILE_DIGESTS)


def read_file_digests(step_dir: pathlib.Path) -> dict | None:
    """{file: {bytes, sha256?}} recorded for the step, or None if it has none. Damaged if garbled."""
    path = step_dir / FILE_DIGESTS
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_bytes())
        files, digest = record["files"], record["digest"]
    except (ValueError, KeyError, TypeError) as err:  # UnicodeDecodeError is a ValueError
        raise Damaged(f"{FILE_DIGESTS} is garbled (not the JSON it was: {type(err).__name__}: {err})") from err
    if not isinstance(files, dict) or _own_digest(files) != digest:
        raise Damaged(f"{FILE_DIGESTS} is garbled (its list differs from its own digest)")
    return files


def _damage(step_dir: pathlib.Path, name: str, record: dict) -> str | None:
    path = step_dir / name
    if not path.is_file():
        return f"{name} is missing (deleted, or never copied)"
    size, saved = path.stat().st_size, record["bytes"]
    if size < saved:
        return f"{name} differs from what was saved ({size} of {saved} bytes: cut short or rewritten)"
    if size > saved:
        return f"{name} differs from what was saved ({size} bytes, {saved} were saved: rewritten or appended to)"
    if "sha256" in record and _sha256(path) != record["sha256"]:
        return f"{name} differs from what was saved (same size, other bytes: garbled or edited)"
    return None


def check_files(step_dir: pathlib.Path, listed: dict | None) -> None:
    """Raises Damaged naming the first damaged file (and how many more), if any.

    Every listed file must be there as it was saved; files not listed (added
    since) are not looked at. Orbax's step metadata must be readable JSON, and
    there when the step lists its files.
    """
    damages = [d for name, record in (listed or {}).items() if (d := _damage(step_dir, name, record))]
    if damages:
        more = f"; {len(damages) - 1} more files are damaged" if len(damages) > 1 else ""
        raise Damaged(damages[0] + more)
    step_metadata = step_dir / STEP_METADATA
    if not step_metadata.exists():
        if listed is not None:
            raise Damaged(f"{STEP_METADATA} is missing")
        return
    try:
        json.loads(step_metadata.read_bytes())
    except ValueError as err:  # UnicodeDecodeError too
        raise Damaged(f"{STEP_METADATA} is not valid JSON ({type(err).__name__}: {err})") from err


def check_meta(meta: dict, listed: dict | None) -> str | None:
    """Raises Damaged when ``meta`` lacks what the version that wrote it records; otherwise returns what
    goes unverified in a checkpoint older than file digests or checksums (None: nothing)."""
    checksums = meta.get(CHECKSUMS)
    if checksums is None:
        if set(meta) <= PRE_CHECKSUM_KEYS:
            return "predates checksums: restored without verification"
        newer = ", ".join(sorted(set(meta) - PRE_CHECKSUM_KEYS))
        raise Damaged(f"meta/metadata records no checksums, though its keys ({newer}) come from a version that does")
    if not isinstance(checksums, dict) or checksums.get("algorithm") != DIGEST or "arrays" not in checksums:
        raise Damaged(f"meta/metadata records checksums this version cannot check ({json.dumps(checksums)[:80]})")
    if listed is None:
        if checksums.get("files") == FILE_DIGESTS:
            raise Damaged(f"{FILE_DIGESTS} is missing (meta/metadata records that the step lists its files)")
        return "predates file digests: its arrays are verified by their checksums, its metadata and other files are not"
    return None
