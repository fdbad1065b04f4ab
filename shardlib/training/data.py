"""Deterministic token data for language-model training, ready for several processes.

Corpus sources (``data_cfg.source``):

* ``"stdlib"`` (default): byte-level tokens (0..255) over every ``.py`` file of the running
  Python's standard library (``sysconfig.get_paths()["stdlib"]``), skipping anything under
  ``site-packages``/``dist-packages``. Files are read in sorted relative-POSIX-path order, so
  every machine with the same Python version gets the same corpus (CPython 3.11.7: 1790
  files, 31.5 MB, about half of it the ``test`` package).
* ``"text"``: byte-level tokens over ``data_cfg.paths`` (files, or directories whose regular
  files are taken recursively in sorted relative-path order).
* ``"bin"``: pre-tokenised little-endian ``uint16`` files without a header, concatenated in
  the given order (directories contribute their ``*.bin`` files, sorted).

For byte-level sources every file is followed by one NUL byte (token 0). NUL never occurs in
Python or ordinary text files, so it acts as an unambiguous end-of-document token and keeps
the end of one file from reading as the start of the next.

The last ``heldout_fraction`` of the token stream (rounded down to whole tokens) is held
out; everything before it is training data. Taking a contiguous tail, rather than sampling,
keeps held-out windows from sharing text with training windows.

Batches: the split is cut into non-overlapping windows of ``seq_len + 1`` tokens, window
``k`` being ``tokens[k * (seq_len + 1):(k + 1) * (seq_len + 1)]``. Epoch ``e`` visits the
windows in the order of a permutation seeded by ``(seed, e)``, ``batch_size`` at a time; the
last ``n_windows % batch_size`` windows of each permutation are skipped so that no batch
straddles two epochs. Batch ``i`` is therefore a pure function of the tokens, ``i``, the
batch shape and the seed, and does not depend on how many processes or devices read it.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sysconfig
from collections.abc import Sequence

import jax
import numpy as np

SEPARATOR = 0
"""Token appended after every file of a byte-level corpus (end of document)."""

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages"})


# --------------------------------------------------------------------------- corpus


def _walk_files(root: pathlib.Path, suffix: str = "") -> list[pathlib.Path]:
    """Regular files under ``root`` ending in ``suffix``, sorted by relative POSIX path.

    Sorting relative paths (not absolute ones, nor ``os.walk`` order, which follows the
    filesystem) makes the order identical wherever the tree is installed.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into installed third-party code.
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        found += [pathlib.Path(dirpath, f) for f in filenames if f.endswith(suffix)]
    found = [p for p in found if p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _expand_paths(paths: Sequence[str | os.PathLike], suffix: str) -> list[pathlib.Path]:
    """Files named by ``paths`` in order; directories expand to their sorted files."""
    files = []
    for raw in paths:
        path = pathlib.Path(raw)
        if path.is_dir():
            files += _walk_files(path, suffix)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"data path does not exist: {str(raw)!r}")
    return files


def corpus_files(data_cfg) -> list[pathlib.Path]:
    """The files of the corpus described by ``data_cfg``, in load order.

    ``data_cfg`` needs ``source`` ("stdlib" | "text" | "bin") and ``paths`` (ignored by
    "stdlib", where it must be empty so that a misconfiguration is not silently ignored).
    """
    source, paths = data_cfg.source, list(data_cfg.paths or [])
    if source == "stdlib":
        if paths:
            raise ValueError(f"source='stdlib' takes no paths, got {paths!r}; use source='text'")
        return _walk_files(pathlib.Path(sysconfig.get_paths()["stdlib"]), ".py")
    if source not in ("text", "bin"):
        raise ValueError(f"unknown data source {source!r}; expected 'stdlib', 'text' or 'bin'")
    if not paths:
        raise ValueError(f"source={source!r} needs at least one entry in paths")
    return _expand_paths(paths, ".bin" if source == "bin" else "")


def _read_bytes(files: list[pathlib.Path]) -> np.ndarray:
    """[sum(len(file) + 1)] uint8: the files' bytes, each followed by ``SEPARATOR``.

    Empty files are left out entirely (no separator either), so a corpus of empty files
    is reported as empty instead of turning into a run of separators.
    """
    sep = bytes([SEPARATOR])
    contents = (f.read_bytes() for f in files)
    # One join and a zero-copy frombuffer: the stdlib corpus loads in about 0.3 s.
    return np.frombuffer(b"".join(c + sep for c in contents if c), dtype=np.uint8)


def _read_bin(files: list[pathlib.Path]) -> np.ndarray:
    """[sum(len(file) // 2)] uint16: the files' tokens; memory-mapped when there is one file."""
    parts = []
    for f in files:
        size = f.stat().st_size
        if size % 2:
            raise ValueError(f"{str(f)!r} has an odd byte length ({size}); expected uint16 tokens")
        if size:  # np.memmap refuses empty files; they contribute no tokens anyway
            parts.append(np.memmap(f, dtype="<u2", mode="r"))
    if len(parts) == 1:
        return parts[0]  # stays on disk; windows are read page by page
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def load_token_splits(data_cfg) -> tuple[np.ndarray, np.ndarray]:
    """Load the corpus and split it into (train_tokens, heldout_tokens).

    Returns two 1-D integer arrays (uint8 for byte-level sources, uint16 for "bin") that
    together are the whole token stream: train is the first part, held-out the last
    ``floor(n * heldout_fraction)`` tokens. Both are read-only views, not copies.
    """
    fraction = float(data_cfg.heldout_fraction)
    if not 0.0 < fraction <= 0.5:
        raise ValueError(f"heldout_fraction must be in (0, 0.5], got {fraction}")
    files = corpus_files(data_cfg)
    tokens = _read_bin(files) if data_cfg.source == "bin" else _read_bytes(files)
    if tokens.size == 0:
        raise ValueError(f"empty corpus: source={data_cfg.source!r} gave no tokens ({len(files)} files)")
    n_heldout = int(tokens.size * fraction)
    if n_heldout == 0:
        raise ValueError(f"corpus of {tokens.size} tokens is too small to hold out {fraction} of it")
    split = tokens.size - n_heldout
    return tokens[:split], tokens[split:]


def describe_source(data_cfg) -> str:
    """The corpus as a user configured it, for error messages: ``'stdlib'`` or the source and its paths."""
    if data_cfg.source == "stdlib":
        return "source 'stdlib' (this Python's standard library)"
    paths = ", ".join(str(p) for p in data_cfg.paths)
    return f"source {data_cfg.source!r} ({paths})"


def check_token_ids(data_cfg, vocab_size: int, splits: dict[str, np.ndarray]) -> None:
    """Raises ValueError if a split holds a token id the model has no embedding for.

    An id at or above ``vocab_size`` fails nowhere on the device: the embedding's
    gather fills it with NaN. Training then stops as "diverged" at the first such
    step, or an out-of-vocabulary id that only the held-out split holds turns the
    held-out loss into NaN while training exits 0. One ``np.max`` per split at load
    time (a pass over the tokens, about 10 ms for the stdlib corpus) rules both out.
    """
    for name, tokens_N in splits.items():
        top = int(np.max(tokens_N))
        if top >= vocab_size:
            raise ValueError(
                f"data {describe_source(data_cfg)} holds token id {top} in its {name} split, but "
                f"model.vocab_size is {vocab_size}: every id must be below vocab_size; set "
                f"model.vocab_size to at least {top + 1} or use data tokenised for this vocabulary"
            )


# --------------------------------------------------------------------------- batches


@functools.lru_cache(maxsize=8)
def _epoch_order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """[n_windows] int64: the order in which epoch ``epoch`` visits the windows.

    Cached because every batch of an epoch (and every process) needs the same permutation;
    read-only so a caller cannot corrupt the cache.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_windows)
    order.flags.writeable = False
    return order


def batch_windows(
    tokens: np.ndarray,
    index: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    rows: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """The windows of global batch ``index``.

    Args:
      tokens: [n] integer token stream (one split).
      index: global batch number, >= 0; batches continue across epochs without end.
      batch_size, seq_len: the batch is ``batch_size`` windows of ``seq_len + 1`` tokens.
      seed: non-negative seed of the per-epoch window permutations.
      rows: optional batch rows (in [0, batch_size)) to materialise, in the order given;
        the default is all rows.

    Returns:
      [len(rows) or batch_size, seq_len + 1] int32; inputs are ``[:, :-1]``, targets ``[:, 1:]``.
    """
    if index < 0 or batch_size < 1 or seq_len < 1 or seed < 0:
        raise ValueError(
            f"need index >= 0, batch_size >= 1, seq_len >= 1, seed >= 0; got "
            f"{index=}, {batch_size=}, {seq_len=}, {seed=}"
        )
    window = seq_len + 1
    n_windows = len(tokens) // window
    per_epoch = n_windows // batch_size
    if per_epoch == 0:
        raise ValueError(
            f"split of {len(tokens)} tokens has {n_windows} windows of {window} tokens, "
            f"fewer than one batch of {batch_size}"
        )
    epoch, step = divmod(index, per_epoch)
    chosen = _epoch_order(n_windows, seed, epoch)[step * batch_size : (step + 1) * batch_size]
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= batch_size):
            raise ValueError(f"rows must lie in [0, {batch_size}), got {rows.tolist()}")
        chosen = chosen[rows]
    offsets = chosen[:, None] * window + np.arange(window)
    return np.asarray(tokens[offsets], dtype=np.int32)


def _local_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, int]) -> np.ndarray:
    """[r] int64: the batch rows this process's devices hold, ascending and without repeats.

    This is the layout ``jax.make_array_from_process_local_data`` expects: the row blocks
    of the addressable devices, in order of their start, stacked. With one process (or a
    batch dimension replicated over processes) it is every row.
    """
    n_rows = global_shape[0]
    blocks = {idx[0].indices(n_rows)[:2] for idx in sharding.addressable_devices_indices_map(global_shape).values()}
    return np.unique(np.concatenate([np.arange(a, b) for a, b in blocks]))


class BatchLoader:
    """Iterates global batches of one split as ``jax.Array``s laid out by ``sharding``.

    Each process reads only the rows its own devices hold, so the host work per step is
    proportional to the local share of the batch. ``position`` (batches consumed) is the
    whole iteration state: save it in the checkpoint and pass it back to resume exactly.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        sharding: jax.sharding.Sharding,
        seed: int = 0,
        position: int = 0,
    ):
        """``tokens``: [n] split; ``sharding``: for the 2-D [batch_size, seq_len] arrays."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.sharding = sharding
        self.seed = seed
        self.position = position
        self.global_shape = (batch_size, seq_len)
        # Fail at construction, not at the first step, if the batch cannot be split over
        # the devices or the split is too small.
        sharding.shard_shape(self.global_shape)
        batch_windows(tokens, 0, batch_size, seq_len, seed, rows=[])
        self._rows = _local_rows(sharding, self.global_shape)

    def peek(self, index: int) -> dict[str, jax.Array]:
        """Global batch ``index`` without moving: {"inputs", "targets"}, each [B, L] int32."""
        local = batch_windows(self.tokens, index, self.batch_size, self.seq_len, self.seed, rows=self._rows)
        return {
            name: jax.make_array_from_process_local_data(self.sharding, np.ascontiguousarray(part), self.global_shape)
            for name, part in (("inputs", local[:, :-1]), ("targets", local[:, 1:]))
        }

    def next(self) -> dict[str, jax.Array]:
        """Batch ``position``, then advance ``position`` by one."""
        batch = self.peek(self.position)
        self.position += 1
        return batch
