"""llm.c token shards: write, read back across boundaries, foreign files, corrupt headers."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from adl_cli.data.shards import HEADER_BYTES, ShardedTokens, read_header, shard_corpus, write_shards
from adl_cli.errors import AdlError


def independent_shard(path, tokens, magic=20240520, version=1, count=None):
    """A shard written straight from the spec: 256 little-endian int32, then uint16 tokens."""
    header = struct.pack("<256i", magic, version, len(tokens) if count is None else count, *([0] * 253))
    with open(path, "wb") as f:
        f.write(header)
        np.asarray(tokens, dtype="<u2").tofile(f)


def test_round_trip_and_slices_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 65536, size=1000)
    paths = write_shards(ref, tmp_path, 300, prefix="t")
    assert [p.name for p in paths] == [f"t_train_{i:06d}.bin" for i in range(4)]
    assert [read_header(p) for p in paths] == [300, 300, 300, 100]
    assert paths[0].stat().st_size == HEADER_BYTES + 600
    toks = ShardedTokens.open(tmp_path)
    assert len(toks) == 1000 and np.array_equal(toks[:], ref)
    for a, b in [(0, 1000), (299, 301), (250, 950), (600, 600), (-5, None), (990, 2000)]:
        assert np.array_equal(toks[a:b], ref[a:b]), (a, b)
    assert toks[300] == ref[300] and toks[-1] == ref[-1] and np.array_equal(toks[::7], ref[::7])
    v = toks.view(250, 950)
    assert len(v) == 700 and np.array_equal(v[40:120], ref[290:370]) and np.array_equal(np.asarray(v), ref[250:950])
    assert np.array_equal(v.view(10, 20)[:], ref[260:270])
    with pytest.raises(IndexError):
        v[700]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_streamed_chunks_ints_and_val_first(tmp_path):
    chunks = [np.arange(5), [5, 6, 7], np.arange(8, 20)]
    paths = write_shards(iter(chunks), tmp_path / "a", 7, val_first=True)
    assert [p.name for p in paths] == ["tokens_val_000000.bin", "tokens_train_000001.bin", "tokens_train_000002.bin"]
    assert np.array_equal(ShardedTokens.open(tmp_path / "a" / "*_train_*.bin")[:], np.arange(7, 20))
    write_shards((i for i in range(10)), tmp_path / "b", 4)
    assert np.array_equal(ShardedTokens.open(tmp_path / "b")[:], np.arange(10))


def test_reads_an_independently_written_shard(tmp_path):
    independent_shard(tmp_path / "x_000.bin", [1, 2, 65535])
    independent_shard(tmp_path / "x_001.bin", [7] * 5)
    toks = ShardedTokens.open(str(tmp_path / "x_*.bin"))
    assert toks[:].tolist() == [1, 2, 65535, 7, 7, 7, 7, 7]
    assert toks[2:4].dtype == np.uint16


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(magic=20240801), "magic number 20240801"),
        (dict(version=2), "version 2"),
        (dict(count=9), "truncated"),
        (dict(count=3), "the wrong size"),
    ],
)
def test_bad_headers_name_the_file(tmp_path, kw, words):
    path = tmp_path / "bad.bin"
    independent_shard(path, [1, 2, 3, 4], **kw)
    with pytest.raises(AdlError, match=words) as e:
        ShardedTokens.open(tmp_path)
    assert "bad.bin" in str(e.value)


def test_truncated_file_and_missing(tmp_path):
    write_shards(np.arange(100), tmp_path, 100, prefix="t")
    path = tmp_path / "t_train_000000.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(AdlError, match="t_train_000000.bin is truncated"):
        ShardedTokens.open(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AdlError, match="shorter than the 1024-byte"):
        ShardedTokens.open(tmp_path)
    with pytest.raises(AdlError, match="matches no files"):
        ShardedTokens.open(tmp_path / "none*.bin")


def test_ids_must_fit_uint16(tmp_path):
    with pytest.raises(AdlError, match="does not fit"):
        write_shards(np.arange(3), tmp_path, 10, vocab_size=100_000)
    with pytest.raises(AdlError, match="65536"):
        write_shards(np.array([1, 65536]), tmp_path, 10)
    assert not list(tmp_path.glob("*.bin"))


def test_shard_corpus_feeds_training_data(tmp_path, small_corpus):
    from adl_cli.data.tokens import DataSection, WindowBatches, load_tokens

    out = tmp_path / "shards"
    (out).mkdir()
    (out / "c_train_000099.bin").write_bytes(b"stale")  # left by an earlier run: refused, then removed with force
    with pytest.raises(AdlError, match="already holds shards"):
        shard_corpus(str(small_corpus), "bpe", out, 4000, vocab_size=300, prefix="c")
    assert (out / "c_train_000099.bin").read_bytes() == b"stale"
    m = shard_corpus(str(small_corpus), "bpe", out, 4000, vocab_size=300, prefix="c", force=True)
    assert m["tokenizer"] == "bpe" and (out / "tokenizer.tiktoken").exists() and not (out / "c_train_000099.bin").exists()
    assert json.loads((out / "shards.json").read_text())["tokens"] == m["tokens"] == sum(s["tokens"] for s in m["shards"])
    section = DataSection(corpus=f"shards:{out}/*.bin", tokenizer=str(out / "tokenizer.tiktoken"))
    data = load_tokens(section)
    plain = load_tokens(DataSection(corpus=str(small_corpus), tokenizer="bpe", vocab_size=300))
    assert data.tokenizer.vocab_size == 300 and len(data.train) + len(data.val) == m["tokens"]
    assert np.array_equal(data.train[0:5000], plain.train[0:5000])  # same ids as the in-memory path
    x, y = WindowBatches(data.train, 16, 3, 1, seed=0)(0, 0, 0, 1)
    assert x.shape == (3, 16) and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())
    assert data.tokenizer.decode(data.train[0:200]) == plain.tokenizer.decode(plain.train[0:200])


def test_llmc_val_shard_is_validated_on_only_and_the_tokenizer_must_match(small_corpus, tmp_path):
    from adl_cli.data.tokens import DataSection, load_tokens

    out = tmp_path / "shards"
    m = shard_corpus(str(small_corpus), "bpe", out, 3000, vocab_size=300, prefix="c", val_shard=True)
    n_val = next(s["tokens"] for s in m["shards"] if s["split"] == "val")
    data = load_tokens(DataSection(corpus=f"shards:{out}/*.bin", tokenizer=str(out / "tokenizer.tiktoken")))
    assert len(data.val) == n_val and len(data.train) == m["tokens"] - n_val
    first_val = read_header(out / "c_val_000000.bin")
    assert first_val == n_val
    val_file = np.fromfile(out / "c_val_000000.bin", dtype="<u2", offset=1024)
    assert np.array_equal(np.asarray(data.val[0:len(data.val)]), val_file)  # the val split is the val shard, none of it trained on
    with pytest.raises(AdlError, match="tokenized with bpe"):
        load_tokens(DataSection(corpus=f"shards:{out}/*.bin", tokenizer="bytes"))
