"""Tests for shardlib.training.data: corpus loading, deterministic batches, resume and sharding."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlib.cluster.launch import free_port
from shardlib.training.data import (
    SEPARATOR,
    BatchLoader,
    _local_rows,
    batch_windows,
    check_token_ids,
    corpus_files,
    load_token_splits,
)
from shardlib.training.token_cache import CACHE_ENV

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _token_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Tokenized corpora are cached in a directory of the test session's, not ~/.cache (tests/test_corpus_cache.py),
    and not under tmp_path, which the tests tokenize."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("token-cache")))


def cfg(source="stdlib", paths=(), heldout_fraction=0.05):
    return SimpleNamespace(source=source, paths=list(paths), heldout_fraction=heldout_fraction)


@pytest.fixture(scope="module")
def stdlib_splits():
    start = time.perf_counter()
    train, heldout = load_token_splits(cfg())
    return train, heldout, time.perf_counter() - start


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


# --------------------------------------------------------------------------- corpus


def test_stdlib_corpus_files_sorted_stable_and_without_site_packages():
    files = corpus_files(cfg())
    assert files, "no stdlib files found"
    assert files == corpus_files(cfg())
    root = Path(os.path.commonpath(files))
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert all(f.suffix == ".py" for f in files)
    assert not [r for r in rel if "site-packages" in r or "dist-packages" in r]


def test_stdlib_splits(stdlib_splits):
    train, heldout, seconds = stdlib_splits
    total = train.size + heldout.size
    sizes = [f.stat().st_size for f in corpus_files(cfg())]
    expected = sum(size + 1 for size in sizes if size)  # empty files add no separator
    assert total == expected > 1_000_000, f"stdlib corpus is {total} bytes"
    assert seconds < 5, f"loading {total} bytes took {seconds:.2f} s"
    assert train.dtype == heldout.dtype == np.uint8
    assert heldout.size == int(total * 0.05)
    assert not np.shares_memory(train, heldout)
    assert (train == SEPARATOR).sum() + (heldout == SEPARATOR).sum() == sum(map(bool, sizes))


def test_text_source(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.txt").write_bytes(b"bbbb")
    (tmp_path / "docs" / "sub" / "a.txt").write_bytes(b"aa")
    (tmp_path / "docs" / "empty.txt").write_bytes(b"")
    (tmp_path / "first.txt").write_bytes(b"0123456789")
    data = cfg("text", [tmp_path / "first.txt", tmp_path / "docs"], heldout_fraction=0.25)
    assert [f.name for f in corpus_files(data)] == ["first.txt", "b.txt", "empty.txt", "a.txt"]
    train, heldout = load_token_splits(data)
    stream = b"0123456789\0bbbb\0aa\0"  # empty file: no bytes, no separator
    assert bytes(train) + bytes(heldout) == stream
    assert len(heldout) == int(len(stream) * 0.25)


def test_bin_source(tmp_path):
    a = np.array([1, 2, 300, 65535], dtype="<u2")
    b = np.array([7, 8], dtype="<u2")
    a.tofile(tmp_path / "a.bin")
    b.tofile(tmp_path / "b.bin")
    data = cfg("bin", [tmp_path / "b.bin", tmp_path / "a.bin"], heldout_fraction=0.5)
    train, heldout = load_token_splits(data)
    assert train.dtype == np.uint16
    np.testing.assert_array_equal(np.concatenate([train, heldout]), np.concatenate([b, a]))
    assert len(heldout) == 3
    # A single file stays memory-mapped.
    train, _ = load_token_splits(cfg("bin", [tmp_path / "a.bin"], heldout_fraction=0.25))
    assert isinstance(train, np.memmap) and train.tolist() == [1, 2, 300]


def test_token_ids_are_checked_against_the_vocabulary_in_both_splits(tmp_path):
    """An id only the held-out split holds would make the held-out loss NaN: it is named with its split."""
    np.array([1, 2, 300, 9, 65535, 7], dtype="<u2").tofile(tmp_path / "a.bin")
    data = cfg("bin", [tmp_path / "a.bin"], heldout_fraction=0.5)
    train, heldout = load_token_splits(data)
    check_token_ids(data, 65536, {"train": train, "held-out": heldout})
    with pytest.raises(ValueError) as caught:
        check_token_ids(data, 1000, {"train": train, "held-out": heldout})
    assert str(caught.value) == (
        f"data source 'bin' ({tmp_path / 'a.bin'}) holds token id 65535 in its held-out split, but "
        "model.vocab_size is 1000: every id must be below vocab_size; set model.vocab_size to at least "
        "65536 or use data tokenised for this vocabulary"
    )
    with pytest.raises(ValueError, match=r"token id 300 in its train split, but model.vocab_size is 300"):
        check_token_ids(data, 300, {"train": train, "held-out": heldout})


@pytest.mark.parametrize("fraction", [0.0, -0.1, 0.51, 1.0])
def test_heldout_fraction_out_of_range(fraction):
    with pytest.raises(ValueError, match=r"heldout_fraction must be in \(0, 0.5\]"):
        load_token_splits(cfg(heldout_fraction=fraction))


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match=r"does not exist: .*nope\.txt"):
        load_token_splits(cfg("text", [missing]))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty corpus"):
        load_token_splits(cfg("text", [tmp_path]))
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty corpus"):
        load_token_splits(cfg("bin", [tmp_path / "empty.bin"]))


def test_odd_length_bin(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"odd\.bin.*odd byte length \(3\)"):
        load_token_splits(cfg("bin", [tmp_path / "odd.bin"]))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data source 'csv'"):
        corpus_files(cfg("csv", [tmp_path]))
    with pytest.raises(ValueError, match="source='stdlib' takes no paths"):
        corpus_files(cfg("stdlib", [tmp_path]))
    with pytest.raises(ValueError, match="needs at least one entry in paths"):
        corpus_files(cfg("text", []))


# --------------------------------------------------------------------------- tokenizers

HF_TINY = REPO / "tests" / "fixtures" / "hf_tiny_llama" / "untied"  # has tokenizer.json (200 ids, eos </s>)


def tokenized(paths, tokenizer, heldout_fraction=0.25):
    return SimpleNamespace(
        source="text", paths=list(paths), heldout_fraction=heldout_fraction, tokenizer=str(tokenizer)
    )


def test_tokenizer_text_source(tmp_path):
    """Each file's ids, then end-of-document, in corpus order; from a checkpoint directory or the file itself."""
    from tokenizers import Tokenizer

    (tmp_path / "a.txt").write_text("Beautiful is better than ugly.\n")
    (tmp_path / "b.txt").write_text("Simple is better than complex, naïvely.\n")
    (tmp_path / "c.txt").write_bytes("Flat is better than nested: café.\n".encode("latin-1"))  # not UTF-8
    (tmp_path / "empty.txt").write_text("")
    tokenizer = Tokenizer.from_file(str(HF_TINY / "tokenizer.json"))
    eos = tokenizer.token_to_id("</s>")
    expected = []
    for name in ("a.txt", "b.txt", "c.txt"):
        text = (tmp_path / name).read_bytes().decode("utf-8", errors="replace")
        expected += [*tokenizer.encode(text, add_special_tokens=False).ids, eos]
    for spec in (HF_TINY, HF_TINY / "tokenizer.json"):
        train, heldout = load_token_splits(tokenized([tmp_path], spec))
        assert train.dtype == np.uint16 and len(heldout) == int(len(expected) * 0.25)
        assert np.concatenate([train, heldout]).tolist() == expected


def test_tokenizer_vocabulary_is_checked_against_the_model(tmp_path):
    (tmp_path / "a.txt").write_text("Errors should never pass silently. " * 4)
    data = tokenized([tmp_path], HF_TINY)
    splits = dict(zip(("train", "held-out"), load_token_splits(data), strict=True))
    check_token_ids(data, 256, splits)
    with pytest.raises(ValueError, match=rf"data.tokenizer '{HF_TINY}' has 200 tokens but model.vocab_size is 199"):
        check_token_ids(data, 199, splits)


def test_tokenizer_errors(tmp_path):
    from tokenizers import Tokenizer, models

    (tmp_path / "a.txt").write_text("a b")
    with pytest.raises(ValueError, match="no such tokenizer file"):
        load_token_splits(tokenized([tmp_path / "a.txt"], tmp_path / "missing"))
    with pytest.raises(ValueError, match="source 'bin' is tokenized already"):
        load_token_splits(SimpleNamespace(source="bin", paths=[tmp_path], heldout_fraction=0.1, tokenizer=str(HF_TINY)))
    words = tmp_path / "words"
    words.mkdir()
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(words / "tokenizer.json"))
    with pytest.raises(ValueError, match="has no end-of-document token: its vocabulary lacks any of </s>"):
        load_token_splits(tokenized([tmp_path / "a.txt"], words))
    (words / "tokenizer_config.json").write_text('{"eos_token": {"content": "<end>"}}')
    with pytest.raises(ValueError, match="lacks the eos_token '<end>' of"):
        load_token_splits(tokenized([tmp_path / "a.txt"], words / "tokenizer.json"))


# --------------------------------------------------------------------------- batches

# Token k has value k, so a window's first token tells which window it is.
RAMP = np.arange(10 * 9, dtype=np.int32)  # 10 windows of seq_len 8 + 1


def test_batch_windows_shape_shift_and_epochs():
    seen = []
    for index in range(6):  # 10 windows // 4 = 2 batches per epoch, 3 epochs
        w = batch_windows(RAMP, index, 4, 8, seed=1)
        assert w.shape == (4, 9) and w.dtype == np.int32
        np.testing.assert_array_equal(w - w[:, :1], np.broadcast_to(np.arange(9), (4, 9)))
        assert (w[:, 0] % 9 == 0).all()  # windows start on the non-overlapping grid
        seen.append(w[:, 0] // 9)
    for epoch in range(3):
        ids = np.concatenate(seen[2 * epoch : 2 * epoch + 2])
        assert len(set(ids.tolist())) == 8  # no window twice within an epoch
    assert not np.array_equal(seen[0], seen[2])  # each epoch has its own order


def test_batch_windows_deterministic_and_seeded(stdlib_splits):
    train = stdlib_splits[0]
    a = batch_windows(train, 3, 8, 64, seed=0)
    np.testing.assert_array_equal(a, batch_windows(train, 3, 8, 64, seed=0))
    assert not np.array_equal(a, batch_windows(train, 4, 8, 64, seed=0))
    assert not np.array_equal(a, batch_windows(train, 3, 8, 64, seed=1))


def test_rows_subset_matches_full_batch(stdlib_splits):
    train = stdlib_splits[0]
    full = batch_windows(train, 7, 8, 32, seed=2)
    rows = [6, 1, 2, 5]
    np.testing.assert_array_equal(batch_windows(train, 7, 8, 32, seed=2, rows=rows), full[rows])
    assert batch_windows(train, 7, 8, 32, seed=2, rows=[]).shape == (0, 33)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 8\)"):
        batch_windows(train, 7, 8, 32, seed=2, rows=[8])


def test_split_too_small_for_a_batch():
    with pytest.raises(ValueError, match="fewer than one batch of 11"):
        batch_windows(RAMP, 0, 11, 8, seed=0)


def test_loader_determinism(stdlib_splits, mesh):
    train = stdlib_splits[0]
    sharding = NamedSharding(mesh, P("data", None))
    first, second = BatchLoader(train, 8, 16, sharding), BatchLoader(train, 8, 16, sharding)
    a, b = first.next(), second.next()
    assert first.position == second.position == 1
    for name in ("inputs", "targets"):
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
    np.testing.assert_array_equal(np.asarray(first.peek(0)["inputs"]), np.asarray(a["inputs"]))
    assert first.position == 1  # peek does not move
    np.testing.assert_array_equal(np.asarray(a["inputs"])[:, 1:], np.asarray(a["targets"])[:, :-1])
    assert not np.array_equal(np.asarray(first.next()["inputs"]), np.asarray(a["inputs"]))


def test_loader_resume(stdlib_splits, mesh):
    train = stdlib_splits[0]
    sharding = NamedSharding(mesh, P("data", None))
    running = BatchLoader(train, 8, 16, sharding, seed=5)
    for _ in range(5):
        running.next()
    resumed = BatchLoader(train, 8, 16, sharding, seed=5, position=running.position)
    a, b = running.next(), resumed.next()
    assert running.position == resumed.position == 6
    for name in ("inputs", "targets"):
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


def test_loader_sharded_global_array(stdlib_splits, mesh):
    train = stdlib_splits[0]
    sharding = NamedSharding(mesh, P("data", None))
    batch = BatchLoader(train, 8, 32, sharding, seed=4, position=2).next()
    full = batch_windows(train, 2, 8, 32, seed=4)
    for name, expected in (("inputs", full[:, :-1]), ("targets", full[:, 1:])):
        array = batch[name]
        assert array.shape == (8, 32) and array.dtype == np.int32
        assert array.sharding == sharding
        np.testing.assert_array_equal(np.asarray(array), expected)
        for shard in array.addressable_shards:
            assert shard.data.shape == (2, 32)
            np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])


def test_loader_rejects_indivisible_batch(mesh):
    with pytest.raises(ValueError, match="should evenly divide"):
        BatchLoader(RAMP, 6, 8, NamedSharding(mesh, P("data", None)))


class _FakeSharding:
    """The one method _local_rows uses, as a process owning row blocks 0 and 2 of 4 sees it."""

    def addressable_devices_indices_map(self, shape):
        return {
            0: (slice(0, 2), slice(None)),
            1: (slice(4, 6), slice(None)),
            2: (slice(0, 2), slice(None)),
        }


def test_local_rows(mesh):
    np.testing.assert_array_equal(_local_rows(_FakeSharding(), (8, 16)), [0, 1, 4, 5])
    # One process: every row, whether the batch is sharded or replicated.
    for spec in (P("data", None), P(None, None), P("model", None)):
        np.testing.assert_array_equal(_local_rows(NamedSharding(mesh, spec), (8, 16)), range(8))


_CHILD = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    pid, port = int(sys.argv[1]), int(sys.argv[2])
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_platforms", "cpu")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from shardlib.training.data import BatchLoader, _local_rows, batch_windows

    own = [[d for d in jax.devices() if d.process_index == p] for p in (0, 1)]
    # data-axis rows 0 and 2 live on process 0, rows 1 and 3 on process 1: each process
    # owns two separate row blocks of the batch.
    grid = np.array([own[0][:2], own[1][:2], own[0][2:], own[1][2:]])
    mesh = Mesh(grid, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    sharding = NamedSharding(mesh, P("data", None))
    tokens = np.random.default_rng(0).integers(0, 65536, 5000).astype(np.uint16)
    loader = BatchLoader(tokens, 8, 16, sharding, seed=3, position=2)
    batch = loader.next()
    full = batch_windows(tokens, 2, 8, 16, seed=3)
    for name, expected in (("inputs", full[:, :-1]), ("targets", full[:, 1:])):
        assert batch[name].shape == (8, 16) and batch[name].sharding == sharding
        for shard in batch[name].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
    print("rows", pid, _local_rows(sharding, (8, 16)).tolist(), flush=True)
    jax.distributed.shutdown()
    """
)


def test_two_processes_read_only_their_rows(tmp_path):
    """Two processes x 4 CPU devices: each builds its part of the same global batch."""
    port = free_port()
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["PYTHONPATH"] = str(REPO)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(pid), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert "rows 0 [0, 1, 4, 5]" in outputs[0]
    assert "rows 1 [2, 3, 6, 7]" in outputs[1]
