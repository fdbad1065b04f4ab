"""The tokenized corpus on disk (shardlib.training.token_cache): read back at the next start, invalidated by a
changed file or tokenizer, and never trusted when cut short or garbled."""

import json
import pathlib
import shutil
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from shardlib.training import data
from shardlib.training.data import load_token_splits
from shardlib.training.token_cache import CACHE_ENV, CorpusCacheWarning, cache_dir

HF_TINY = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf_tiny_llama" / "untied"  # a 200-id BPE
TOKENIZE = data._tokenize  # the tokenizing itself, which the fixture counts


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """Three text files, the cache in tmp_path/cache, and a count of the tokenizing that actually runs."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    texts = tmp_path / "texts"
    texts.mkdir()
    for name, text in {
        "a.txt": "Beautiful is better than ugly.\n",
        "b.txt": "Explicit is better than implicit.\n",
    }.items():
        (texts / name).write_text(text * 20)
    (texts / "c.txt").write_text("Readability counts, naïvely.\n" * 20)
    calls = []
    monkeypatch.setattr(data, "_tokenize", lambda files, spec: calls.append(spec) or TOKENIZE(files, spec))
    return texts, calls


def splits(texts, tokenizer=HF_TINY):
    cfg = SimpleNamespace(source="text", paths=[texts], heldout_fraction=0.25, tokenizer=str(tokenizer))
    return np.concatenate(load_token_splits(cfg))


def uncached(texts, tokenizer=HF_TINY):
    """What tokenizing gives now, without the cache."""
    files = data.corpus_files(SimpleNamespace(source="text", paths=[texts]))
    return TOKENIZE(files, str(tokenizer))


def entries() -> list[pathlib.Path]:
    return sorted(cache_dir().glob("*.tokens"))


def test_the_next_start_reads_the_cache(corpus):
    texts, calls = corpus
    first = splits(texts)
    assert len(calls) == 1 and len(entries()) == 1
    again = splits(texts)
    assert len(calls) == 1, "the second start tokenized again"
    np.testing.assert_array_equal(again, first)
    assert again.dtype == np.uint16 and np.array_equal(first, uncached(texts))
    train, heldout = load_token_splits(
        SimpleNamespace(source="text", paths=[texts], heldout_fraction=0.25, tokenizer=str(HF_TINY))
    )
    assert not train.flags.writeable and not heldout.flags.writeable


@pytest.mark.parametrize(
    "change",
    [
        lambda texts: (texts / "b.txt").write_text("Explicit is better than implicit!\n" * 20),  # one byte
        lambda texts: (texts / "d.txt").write_text("Flat is better than nested.\n"),  # a file added
        lambda texts: (texts / "a.txt").unlink(),  # one removed
    ],
    ids=["a byte changed", "a file added", "a file removed"],
)
def test_a_changed_corpus_is_tokenized_again(corpus, change):
    texts, calls = corpus
    before = splits(texts)
    change(texts)
    after = splits(texts)
    assert len(calls) == 2 and len(entries()) == 2
    np.testing.assert_array_equal(after, uncached(texts))
    assert not np.array_equal(after, before)


def test_a_changed_tokenizer_is_another_entry(corpus, tmp_path):
    """Another end-of-document token (tokenizer_config.json beside tokenizer.json) gives other ids: not the cached ones."""
    texts, calls = corpus
    other = tmp_path / "tokenizer"
    shutil.copytree(HF_TINY, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<unk>"}))
    ours = splits(texts)
    theirs = splits(texts, other)
    assert len(calls) == 2 and len(entries()) == 2
    np.testing.assert_array_equal(theirs, uncached(texts, other))
    assert not np.array_equal(theirs, ours)
    np.testing.assert_array_equal(splits(texts), ours)  # both entries stay valid
    assert len(calls) == 2


def _cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 7])


def _garble_ids(path):
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0x01  # one bit of one id
    path.write_bytes(bytes(raw))


def _garble_header(path):
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'"count": ', b'"count": x', 1))


DAMAGE = {
    "cut short": (_cut, "cut short"),
    "appended to": (lambda p: p.write_bytes(p.read_bytes() + b"\0\0"), "appended to"),
    "one bit of an id": (_garble_ids, "its ids differ from their sha256: garbled"),
    "header garbled": (_garble_header, "its header is garbled"),
    "emptied": (lambda p: p.write_bytes(b""), "not a shardlib-tokens-v1 file"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_never_trusted_but_rebuilt_with_a_warning(corpus, damage):
    texts, calls = corpus
    good = splits(texts)
    (entry,) = entries()
    harm, says = DAMAGE[damage]
    harm(entry)
    with pytest.warns(
        CorpusCacheWarning, match=rf"tokenized-corpus cache {entry} is unusable \(.*{says}.*\); tokenizing again"
    ):
        rebuilt = splits(texts)
    assert len(calls) == 2
    np.testing.assert_array_equal(rebuilt, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorpusCacheWarning)
        splits(texts)  # the rewritten entry is whole again: read without a warning
    assert len(calls) == 2


@pytest.mark.filterwarnings("error::shardlib.training.token_cache.CorpusCacheWarning")
def test_no_warning_on_a_sound_entry(corpus):
    texts, _ = corpus
    splits(texts)
    splits(texts)


def test_a_cache_that_cannot_be_written_is_a_warning(corpus, tmp_path, monkeypatch):
    texts, calls = corpus
    (tmp_path / "a-file").write_text("in the way")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a-file"))
    for start in (1, 2):
        with pytest.warns(
            CorpusCacheWarning, match="cannot write the tokenized-corpus cache .*; the next start tokenizes"
        ):
            tokens = splits(texts)
        assert len(calls) == start
    np.testing.assert_array_equal(tokens, uncached(texts))
