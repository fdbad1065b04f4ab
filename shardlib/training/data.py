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

Tokenizers (``data_cfg.tokenizer``, text sources only): a ``tokenizers`` ``tokenizer.json``,
or a directory holding one (a Hugging Face checkpoint), replaces the byte-level tokens. Each
file is decoded as UTF-8 (undecodable bytes become U+FFFD, so any file reads the same way
everywhere), encoded without special tokens, and followed by the end-of-document token: the
``eos_token`` of a ``tokenizer_config.json`` beside the tokenizer, else the first of
``</s>``, ``<|endoftext|>``, ``<|end_of_text|>``, ``<eos>`` the vocabulary has. Tokens are
``uint16`` (``uint32`` above 65536 ids). Every process gets the same ids: ``tokenizers`` is
deterministic and the files come in the same order. Tokenizing is slow (the 31.5 MB stdlib
corpus took 28 s, 26.7 M ids, 0.5 GB peak memory, with the test fixture's 200-id BPE on the
2-core machine), so the ids are cached on disk keyed by the tokenizer and the files' contents
(``shardlib.training.token_cache``): only the first start over a corpus tokenizes it.
``check_token_ids`` also checks the tokenizer's vocabulary (added tokens included) against
``model.vocab_size``.

The last ``heldout_fraction`` of the token stream (rounded down to whole tokens) is held
out; everything before it is training data. Taking a contiguous tail, rather than sampling,
keeps held-out windows from sharing text with training windows.

Batches: the split is cut into non-overlapping windows of ``seq_len + 1`` tokens, window
``k`` being ``tokens[k * (seq_len + 1):(k + 1) * (seq_len + 1)]``. Epoch ``e`` visits the
windows in the order of a permutation seeded by ``(seed, e)``, ``batch_size`` at a time; the
last ``n_windows % batch_size`` windows of each permutation are skipped so that no batch
straddles two epochs. Batch ``i`` is therefore a pure function of the tokens, ``i``, the
batch shape and the seed, and does not depend on how many processes or devices read it.

Why not grain. Grain would bring worker prefetch, sharding by process and a checkpointable
iterator. Here the iterator state is already one integer in the checkpoint, and batch ``i``
does not depend on the process count, so a run resumes bitwise onto another number of
processes. Grain's ``ShardByJaxProcess`` gives each process its own slice of the dataset,
so the global batches change with the process count. Prefetch has nothing to hide either. We
measured on the project's 2-core machine, over the stdlib corpus, 200 batches, one process
(grain 0.2.18, ``MapDataset.range(n).shuffle(seed).map(window).batch(B)``, no workers):

============  =================  ===================  ==============
batch B x L   ``batch_windows``  grain random access  grain iterator
============  =================  ===================  ==============
16 x 128      0.03 ms            0.43 ms              1.1 ms
64 x 2048     0.39 ms            4.1 ms               4.6 ms
256 x 2048    1.7 ms             29 ms                13 ms
============  =================  ===================  ==============

A step on 0.5 M tokens takes far longer than 1.7 ms, so the loader stays hand-written.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import sysconfig
from collections.abc import Sequence

import jax
import numpy as np

from shardlib.training.token_cache import cached_tokens, corpus_key

SEPARATOR = 0
"""Token appended after every file of a byte-level corpus (end of document)."""

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages"})
TOKENIZER_FILE = "tokenizer.json"
# Files beside tokenizer.json that belong to it (exports copy them along).
_TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# End-of-document tokens looked for when no tokenizer_config.json names an eos_token.
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
_ENCODE_CHUNK = 64  # files per encode_batch call: bounds the memory its Encoding objects take


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


# --------------------------------------------------------------------------- tokenizers


def tokenizer_files(spec: str | os.PathLike) -> list[pathlib.Path]:
    """``tokenizer.json`` named by ``spec`` (the file, or a directory holding it), then the files beside it."""
    path = pathlib.Path(spec)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"data.tokenizer {str(spec)!r}: no such tokenizer file ({file})")
    return [file, *(file.parent / n for n in _TOKENIZER_SIDE_FILES if (file.parent / n).is_file())]


def _end_of_document(tokenizer, file: pathlib.Path) -> int:
    """The id appended after every file: the eos_token of tokenizer_config.json, else a usual name."""
    config = file.parent / "tokenizer_config.json"
    eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
    if isinstance(eos, dict):  # {"content": "</s>", ...}
        eos = eos.get("content")
    names = (eos,) if eos else _EOS_NAMES
    for name in names:
        if (token_id := tokenizer.token_to_id(name)) is not None:
            return token_id
    where = f"the eos_token {eos!r} of {config}" if eos else f"any of {', '.join(_EOS_NAMES)}"
    raise ValueError(f"data.tokenizer {str(file)!r} has no end-of-document token: its vocabulary lacks {where}")


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str):
    """(``tokenizers.Tokenizer``, end-of-document id) for ``data.tokenizer`` ``spec``."""
    from tokenizers import Tokenizer  # only runs that tokenize need the library loaded

    file = tokenizer_files(spec)[0]
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust side raises a bare Exception
        raise ValueError(f"data.tokenizer {spec!r}: {file} is not a tokenizers file ({err})") from err
    return tokenizer, _end_of_document(tokenizer, file)


def _tokenize(files: list[pathlib.Path], spec: str) -> np.ndarray:
    """[n] uint16 (uint32 for vocabularies over 65536): every file's ids, each followed by end-of-document."""
    tokenizer, eos = load_tokenizer(str(spec))
    dtype = np.uint16 if tokenizer.get_vocab_size(with_added_tokens=True) <= 2**16 else np.uint32
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets
    parts = []
    for start in range(0, len(files), _ENCODE_CHUNK):
        texts = [f.read_bytes().decode("utf-8", errors="replace") for f in files[start : start + _ENCODE_CHUNK]]
        for encoding in encode([t for t in texts if t], add_special_tokens=False):
            parts += [np.asarray(encoding.ids, dtype), np.array([eos], dtype)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def load_token_splits(data_cfg) -> tuple[np.ndarray, np.ndarray]:
    """Load the corpus and split it into (train_tokens, heldout_tokens).

    Returns two 1-D integer arrays (uint8 for byte-level sources, uint16 for "bin" and
    mostly for a tokenizer, see the module docstring) that
    together are the whole token stream: train is the first part, held-out the last
    ``floor(n * heldout_fraction)`` tokens. Both are read-only views, not copies.
    """
    fraction = float(data_cfg.heldout_fraction)
    if not 0.0 < fraction <= 0.5:
        raise ValueError(f"heldout_fraction must be in (0, 0.5], got {fraction}")
    tokenizer = getattr(data_cfg, "tokenizer", None)
    if tokenizer and data_cfg.source == "bin":
        raise ValueError("data.tokenizer tokenizes text sources ('stdlib', 'text'); source 'bin' is tokenized already")
    files = corpus_files(data_cfg)
    if data_cfg.source == "bin":
        tokens = _read_bin(files)
    elif tokenizer:  # from the on-disk cache when an earlier start stored it (shardlib.training.token_cache)
        tokens = cached_tokens(corpus_key(files, tokenizer_files(tokenizer)), lambda: _tokenize(files, tokenizer))
    else:
        tokens = _read_bytes(files)
    if tokens.size == 0:
        raise ValueError(f"empty corpus: source={data_cfg.source!r} gave no tokens ({len(files)} files)")
    n_heldout = int(tokens.size * fraction)
    if n_heldout == 0:
        raise ValueError(f"corpus of {tokens.size} tokens is too small to hold out {fraction} of it")
    split = tokens.size - n_heldout
    return tokens[:split], tokens[split:]


def describe_source(data_cfg) -> str:
    """The corpus as a user configured it, for error messages: ``'stdlib'`` or the source and its paths."""
    tokenizer = getattr(data_cfg, "tokenizer", None)
    tokenized = f" tokenized by {tokenizer!r}" if tokenizer else ""
    if data_cfg.source == "stdlib":
        return f"source 'stdlib' (this Python's standard library){tokenized}"
    paths = ", ".join(str(p) for p in data_cfg.paths)
    return f"source {data_cfg.source!r} ({paths}){tokenized}"


def check_token_ids(data_cfg, vocab_size: int, splits: dict[str, np.ndarray]) -> None:
    """Raises ValueError if a split holds a token id the model has no embedding for.

    An id at or above ``vocab_size`` fails nowhere on the device: the embedding's
    gather fills it with NaN. Training then stops as "diverged" at the first such
    step, or an out-of-vocabulary id that only the held-out split holds turns the
    held-out loss into NaN while training exits 0. One ``np.max`` per split at load
    time (a pass over the tokens, about 10 ms for the stdlib corpus) rules both out.
    With ``data_cfg.tokenizer``, its whole vocabulary must fit too, even ids the corpus lacks.
    """
    if tokenizer := getattr(data_cfg, "tokenizer", None):
        size = load_tokenizer(str(tokenizer))[0].get_vocab_size(with_added_tokens=True)
        if size > vocab_size:
            raise ValueError(
                f"data.tokenizer {tokenizer!r} has {size} tokens but model.vocab_size is {vocab_size}: "
                f"set model.vocab_size to at least {size}, or use a tokenizer made for this model"
            )
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
