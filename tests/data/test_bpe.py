"""Byte-level BPE: trainer vs a naive trainer, tiktoken vs a slow reference encoder."""

from __future__ import annotations

import random
import sys
import unicodedata
from collections import Counter
from functools import lru_cache

import pytest

from adl_cli.data import bpe

BYTE_RANKS = {bytes([i]): i for i in range(256)}


@lru_cache(maxsize=None)
def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@lru_cache(maxsize=None)
def trained() -> dict[bytes, int]:
    return bpe.train_bpe(pydoc_text()[:40_000], 512)


@lru_cache(maxsize=None)
def code_point_pool() -> list[int]:
    """Code points both ``regex`` and tiktoken classify the same way: assigned ones.

    tiktoken's regex tables are Unicode 16; on a Python whose database is newer, keep to
    characters that Unicode 3.2 already had, plus the emoji blocks.
    """
    assigned = [
        c
        for c in range(0x110000)
        if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) not in ("Cn", "Cs")
    ]
    if tuple(int(x) for x in unicodedata.unidata_version.split(".")[:2]) > (16, 0):
        old = unicodedata.ucd_3_2_0
        emoji = range(0x1F300, 0x1FA00)
        assigned = [c for c in assigned if old.category(chr(c)) != "Cn" or c in emoji]
    return assigned


SPACES = [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, 0x2000, 0x2007, 0x200B,
          0x2028, 0x2029, 0x202F, 0x205F, 0x3000, 0xFEFF, 0x1C, 0x1D, 0x1E, 0x1F]


def unicode_strings(n: int, seed: int = 0) -> list[str]:
    """Seeded random strings: any assigned code point, whitespace runs, ASCII, and mixes."""
    rng = random.Random(seed)
    pool = code_point_pool()
    fixed = [
        "",
        "hello world",
        "Don't   you've  we'LL I'M 's",
        "  leading and trailing  \n\n\t ",
        "emoji 😀👍🏽 👨‍👩‍👧 ☃️ flags 🇫🇷",
        "中文字符，日本語のテキスト。한국어 텍스트",
        "combining: e\u0301 a\u0308\u0323 \u0915\u094d\u0937",
        "control:\x00\x01\x07\x1b[0m\x7f\x9f end",
        "mixed\r\n\t \u00a0\u2003\u3000whitespace\x0b\x0c",
        "numbers 3.14159 ١٢٣ ⅷ ½ 10,000,000",
        "x" * 300,
        " " * 50 + "a",
        "<|endoftext|> as plain text",
    ]
    out = list(fixed)
    for _ in range(n):
        length = rng.randrange(1, 60)
        kind = rng.random()
        chars = []
        for _ in range(length):
            r = rng.random()
            if kind < 0.3 or r < 0.25:
                c = rng.choice(pool)
            elif r < 0.45:
                c = rng.choice(SPACES)
            elif r < 0.55:
                c = ord(rng.choice("'sdmtlvre"))
            else:
                c = rng.randrange(0, 0x80)
            chars.append(chr(c))
        out.append("".join(chars))
    return out


def naive_train(text: str, vocab_size: int) -> dict[bytes, int]:
    """Recount every pair after every merge; merge the most frequent, smallest on ties."""
    words = Counter(tuple(bytes([b]) for b in c.encode()) for c in bpe.split_chunks(text))
    ranks = dict(BYTE_RANKS)
    while len(ranks) < vocab_size:
        pairs: Counter = Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += n
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        ranks.setdefault(merged, len(ranks))
        new_words: Counter = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return ranks


# --- training ------------------------------------------------------------------------------


def test_trainer_matches_naive_trainer():
    text = pydoc_text()[5_000:11_000]
    assert bpe.train_bpe(text, 400) == naive_train(text, 400)


def test_ranks_are_bytes_then_merges_in_order():
    ranks = trained()
    assert len(ranks) == 512
    assert sorted(ranks.values()) == list(range(512))
    assert all(ranks[bytes([i])] == i for i in range(256))
    by_rank = sorted(ranks, key=ranks.__getitem__)
    for r in range(256, 512):
        tok = by_rank[r]
        earlier = set(by_rank[:r])
        assert any(tok[:k] in earlier and tok[k:] in earlier for k in range(1, len(tok))), tok


def test_ties_break_on_smallest_byte_pair_and_training_is_deterministic():
    # chunks "ab", " cd", " ef": every pair occurs once; (b" ", b"c") is the smallest.
    ranks = bpe.train_bpe("ab cd ef", 257)
    assert max(ranks, key=ranks.__getitem__) == b" c"
    text = pydoc_text()[:8_000]
    assert bpe.train_bpe(text, 400) == bpe.train_bpe(text, 400)


def test_progress_reports_every_merge():
    seen = []
    bpe.train_bpe(pydoc_text()[:5_000], 300, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 44) for i in range(1, 45)]


@pytest.mark.parametrize("size", [0, 255, -1])
def test_vocab_size_below_256_is_an_error(size):
    with pytest.raises(ValueError, match="at least 256"):
        bpe.train_bpe("some text", size)


def test_vocab_size_larger_than_the_text_allows_is_an_error():
    assert len(bpe.train_bpe("abab", 258)) == 258  # "ab", "abab"
    with pytest.raises(ValueError, match="larger than this text allows"):
        bpe.train_bpe("abab", 259)
    with pytest.raises(ValueError, match="integer"):
        bpe.train_bpe("abab", 300.0)  # type: ignore[arg-type]


def test_vocab_256_is_plain_bytes():
    assert bpe.train_bpe("anything", 256) == BYTE_RANKS


# --- pre-tokenization ----------------------------------------------------------------------


def tiktoken_chunks(text: str) -> list[bytes]:
    """How tiktoken splits ``text``: give it every ``regex`` chunk as a whole token."""
    chunks = [c.encode() for c in bpe.split_chunks(text)]
    ranks = dict(BYTE_RANKS)
    for c in chunks:
        ranks.setdefault(c, len(ranks))
    enc = bpe.make_encoding("split-probe", ranks, special_tokens={})
    return [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(text)]


def test_training_split_agrees_with_tiktoken_split():
    texts = unicode_strings(400, seed=1) + [pydoc_text()[:20_000]]
    for text in texts:
        assert tiktoken_chunks(text) == [c.encode() for c in bpe.split_chunks(text)], text


def test_pattern_splits_like_gpt2():
    assert bpe.split_chunks("I'm here, they'RE   42 items!\n\n  x") == [
        "I", "'m", " here", ",", " they", "'RE", "  ", " 42", " items", "!", "\n\n ", " x",
    ]


@pytest.mark.slow
def test_split_agrees_on_every_assigned_code_point():
    pool = code_point_pool()
    for i in range(0, len(pool), 8192):
        text = "".join(f"a{chr(c)}a 1{chr(c)}1 !{chr(c)}! {chr(c)} {chr(c)*2}\n" for c in pool[i : i + 8192])
        assert tiktoken_chunks(text) == [c.encode() for c in bpe.split_chunks(text)]


# --- encoding ------------------------------------------------------------------------------


def test_tiktoken_matches_reference_encoder_on_held_out_text():
    ranks = trained()
    enc = bpe.make_encoding("t", ranks)
    held_out = pydoc_text()[200_000:215_000]
    ids = enc.encode_ordinary(held_out)
    assert ids == bpe.reference_encode(held_out, ranks, bpe.GPT2_PATTERN)
    assert len(ids) < 0.6 * len(held_out.encode())  # the merges compress (about 2x)


def test_tiktoken_matches_reference_encoder_on_unicode():
    ranks = trained()
    enc = bpe.make_encoding("t", ranks)
    for text in unicode_strings(300, seed=2):
        assert enc.encode_ordinary(text) == bpe.reference_encode(text, ranks), text


def test_decode_encode_round_trip_on_arbitrary_unicode():
    enc = bpe.make_encoding("t", trained())
    for text in unicode_strings(500, seed=3):
        ids = enc.encode_ordinary(text)
        assert all(0 <= i < 512 for i in ids)
        assert enc.decode(ids) == text
        assert b"".join(enc.decode_single_token_bytes(i) for i in ids) == text.encode()


def test_special_token():
    enc = bpe.make_encoding("t", trained())
    assert enc.n_vocab == 513 and enc.eot_token == 512
    ids = enc.encode("a<|endoftext|>b", allowed_special="all")
    assert ids[1] == 512 and enc.decode(ids) == "a<|endoftext|>b"
    custom = bpe.make_encoding("u", trained(), special_tokens={"<|pad|>": 512, "<|eos|>": 513})
    assert custom.encode("<|eos|>", allowed_special="all") == [513]


# --- files ---------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    ranks = trained()
    path = tmp_path / "run" / "tokenizer.tiktoken"
    bpe.save_ranks(ranks, path)
    loaded = bpe.load_ranks(path)
    assert loaded == ranks
    lines = path.read_text().splitlines()
    assert len(lines) == 512 and lines[65] == "QQ== 65"  # base64 token, space, rank
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.tiktoken"]  # no temp left
    text = pydoc_text()[300_000:305_000]
    a, b = bpe.make_encoding("a", ranks), bpe.make_encoding("b", loaded)
    assert a.encode_ordinary(text) == b.encode_ordinary(text)


def test_rewritten_file_is_read_afresh(tmp_path):
    path = tmp_path / "tok.tiktoken"
    bpe.save_ranks(BYTE_RANKS, path)
    assert bpe.load_ranks(path) == BYTE_RANKS
    bpe.save_ranks(trained(), path)
    assert bpe.load_ranks(path) == trained()


@pytest.mark.parametrize(
    "extra, message",
    [
        ("QUI=\n", "expected"),
        ("QUI= 1 2\n", "expected"),
        ("QU!= 300\n", "not valid base64"),
        ("QUI= x\n", "not a non-negative integer"),
        ("QUI= -3\n", "not a non-negative integer"),
        ("QQ== 300\n", "appears twice"),
        ("QUI= 0\n", "appears twice"),
    ],
)
def test_malformed_file_is_a_value_error_naming_the_path(tmp_path, extra, message):
    path = tmp_path / "bad.tiktoken"
    bpe.save_ranks(BYTE_RANKS, path)
    path.write_text(path.read_text() + extra)
    with pytest.raises(ValueError, match=message) as err:
        bpe.load_ranks(path)
    assert str(path) in str(err.value)


def test_missing_empty_or_partial_file(tmp_path):
    with pytest.raises(ValueError, match="not found") as err:
        bpe.load_ranks(tmp_path / "nope.tiktoken")
    assert "nope.tiktoken" in str(err.value)
    empty = tmp_path / "empty.tiktoken"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        bpe.load_ranks(empty)
    partial = tmp_path / "partial.tiktoken"
    bpe.save_ranks({bytes([i]): i for i in range(200)}, partial)
    with pytest.raises(ValueError, match="single bytes"):
        bpe.load_ranks(partial)
    binary = tmp_path / "binary.tiktoken"
    binary.write_bytes(b"\xff\xfe\x00garbage 1\n")
    with pytest.raises(ValueError, match=str(binary.name)):
        bpe.load_ranks(binary)


def test_errors_are_adl_errors():
    from adl_cli.errors import AdlError

    with pytest.raises(AdlError):
        bpe.train_bpe("x", 10)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
