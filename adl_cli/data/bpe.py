"""Byte-level BPE: trained by adl, stored in tiktoken's file format, encoded by tiktoken.

Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with
Subword Units"), on bytes as in GPT-2 (Radford et al. 2019):

    vocab_0 = the 256 single bytes (rank = byte value)
    split the text into chunks with a regex (words, numbers, punctuation, whitespace);
    repeat until |vocab| = V:
        (a, b) = the adjacent token pair that occurs most often inside the chunks
        vocab += a + b  (next rank);  replace every adjacent (a, b) by a + b

Encoding a chunk replays the merges by rank: while some adjacent pair's concatenation is a
token, merge the leftmost pair with the lowest rank. tiktoken's Rust core does exactly
that, so adl only trains; ``make_encoding`` hands the ranks to ``tiktoken.Encoding``.

Training is incremental: each unique chunk is a word with a count; pair counts and an
index pair -> words are kept up to date, so a merge touches only the words that hold the
pair, and a lazy max-heap picks the next pair (ties: the lexicographically smallest pair
of byte strings), which makes training deterministic.

Training splits text with the ``regex`` module (a dependency of tiktoken, and what
tiktoken's own Python fallback ``Encoding._encode_only_native_bpe`` splits with); encoding
splits with tiktoken's Rust regex. The two give the same chunks on every code point that
Unicode 16 (tiktoken's tables) assigns; they can differ only on characters newer than that,
which ``regex`` may know and tiktoken does not. The tests check the agreement, and a
difference would only change which merges are learned, never the encoder's correctness.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import regex
import tiktoken

from adl_cli.errors import AdlError
from adl_cli.fileio import atomic_write

# GPT-2 style pre-tokenization: English contractions (any case), an optional space then
# letters, numbers or other symbols, whitespace that is not followed by a word (so the
# word keeps its leading space), and any remaining whitespace.
GPT2_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)"
    r"| ?\p{L}+"
    r"| ?\p{N}+"
    r"| ?[^\s\p{L}\p{N}]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

ENDOFTEXT = "<|endoftext|>"


class BpeError(AdlError, ValueError):
    """Bad BPE input (vocabulary size, ranks file): a ValueError the CLI prints cleanly."""


def _clean(text: str) -> str:
    """Replace lone surrogates the way tiktoken does, so training sees what encoding sees."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def split_chunks(text: str, pattern: str = GPT2_PATTERN) -> list[str]:
    """The pre-tokenization chunks of ``text`` (BPE never merges across them)."""
    return regex.findall(pattern, _clean(text))


def _merge(ids: list[int], a: int, b: int, c: int) -> list[int]:
    """Replace each adjacent (a, b), scanning left to right without overlap, by c."""
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(c)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(
    text: str,
    vocab_size: int,
    *,
    pattern: str = GPT2_PATTERN,
    progress: Callable[[int, int], None] | None = None,
) -> dict[bytes, int]:
    """Learn ``vocab_size - 256`` merges from ``text``; return tiktoken's mergeable ranks.

    Ranks 0..255 are the single bytes in byte order; each merge takes the next rank.
    ``progress(done, total)`` is called after each merge: tokens added so far, out of
    ``total = vocab_size - 256``.
    Special tokens are not counted in ``vocab_size``.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise BpeError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < 256:
        raise BpeError(f"vocab_size must be at least 256 (the single bytes), got {vocab_size}")

    counts = Counter(split_chunks(text, pattern))
    vocab: list[bytes] = [bytes([i]) for i in range(256)]
    ranks: dict[bytes, int] = {tok: i for i, tok in enumerate(vocab)}
    words: list[list[int]] = []
    freqs: list[int] = []
    for chunk, n in counts.items():
        ids = list(chunk.encode("utf-8"))
        if len(ids) > 1:  # a one-byte chunk holds no pair
            words.append(ids)
            freqs.append(n)

    pair_count: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}  # may keep words that lost the pair
    for w, ids in enumerate(words):
        f = freqs[w]
        for p in zip(ids, ids[1:]):
            pair_count[p] = pair_count.get(p, 0) + f
            s = where.get(p)
            if s is None:
                where[p] = {w}
            else:
                s.add(w)
    heap = [(-n, vocab[a], vocab[b], a, b) for (a, b), n in pair_count.items()]
    heapq.heapify(heap)

    total = vocab_size - 256
    while len(vocab) < vocab_size:
        # Pop the best pair; entries are lazy: a stale one is re-pushed with its true count
        # (counts of a pair only fall, except for pairs with the newest token, which are
        # pushed afresh after each merge).
        best = None
        while heap:
            neg, _, _, a, b = heapq.heappop(heap)
            n = pair_count.get((a, b), 0)
            if n == -neg:
                best = (a, b)
                break
            if n > 0:
                heapq.heappush(heap, (-n, vocab[a], vocab[b], a, b))
        if best is None:
            raise BpeError(
                f"vocab_size {vocab_size} is larger than this text allows: every chunk is "
                f"a single token at {len(vocab)} tokens; use a smaller vocab_size or more text"
            )
        a, b = best
        merged = vocab[a] + vocab[b]
        c = ranks.get(merged)
        if c is None:  # a new token (the usual case); else the same bytes by another split
            c = len(vocab)
            vocab.append(merged)
            ranks[merged] = c
        touched: set[tuple[int, int]] = set()
        for w in where.pop(best):
            old = words[w]
            new = _merge(old, a, b, c)
            if len(new) == len(old):
                continue
            f = freqs[w]
            for p in zip(old, old[1:]):
                pair_count[p] -= f
            for p in zip(new, new[1:]):
                pair_count[p] = pair_count.get(p, 0) + f
                if c in p:
                    touched.add(p)
                    s = where.get(p)
                    if s is None:
                        where[p] = {w}
                    else:
                        s.add(w)
            words[w] = new
        pair_count.pop(best, None)
        for p in touched:
            n = pair_count.get(p, 0)
            if n > 0:
                heapq.heappush(heap, (-n, vocab[p[0]], vocab[p[1]], p[0], p[1]))
        if progress is not None:
            progress(len(vocab) - 256, total)
    return ranks


def save_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write ranks in tiktoken's format (base64 token, space, rank; one per line), atomically."""
    lines = [
        f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    atomic_write(path, "".join(lines))


def load_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken ranks file; BpeError (a ValueError) naming the path if it is malformed.

    Our own parser: ``tiktoken.load.load_tiktoken_bpe`` keeps a copy of every file it reads
    in a cache keyed by the path, so it would return stale ranks for a rewritten file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BpeError(f"{path}: tokenizer ranks file not found") from None
    except OSError as e:
        raise BpeError(f"{path}: cannot read tokenizer ranks file ({e.strerror})") from None
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        shown = line.decode("ascii", "replace")
        parts = shown.split()
        where = f"{path}:{lineno}"
        if len(parts) != 2:
            raise BpeError(f"{where}: expected '<base64 token> <rank>', got {shown[:80]!r}")
        try:
            tok = base64.b64decode(parts[0].encode("ascii"), validate=True)
        except (binascii.Error, ValueError):
            raise BpeError(f"{where}: token {parts[0][:80]!r} is not valid base64") from None
        if not parts[1].isdigit():
            raise BpeError(f"{where}: rank {parts[1][:80]!r} is not a non-negative integer")
        rank = int(parts[1])
        if not tok:
            raise BpeError(f"{where}: empty token")
        if tok in ranks:
            raise BpeError(f"{where}: token {tok!r} appears twice")
        if rank in seen:
            raise BpeError(f"{where}: rank {rank} appears twice")
        ranks[tok] = rank
        seen.add(rank)
    if not ranks:
        raise BpeError(f"{path}: tokenizer ranks file is empty")
    missing = [i for i in range(256) if bytes([i]) not in ranks]
    if missing:
        raise BpeError(
            f"{path}: not a byte-level BPE: {len(missing)} of the 256 single bytes have no "
            f"rank (first missing: {missing[0]})"
        )
    return ranks


def make_encoding(
    name: str,
    ranks: dict[bytes, int],
    *,
    pattern: str = GPT2_PATTERN,
    special_tokens: dict[str, int] | None = None,
) -> tiktoken.Encoding:
    """A tiktoken Encoding from trained ranks; by default ``<|endoftext|>`` = len(ranks)."""
    if special_tokens is None:
        special_tokens = {ENDOFTEXT: len(ranks)}
    return tiktoken.Encoding(
        name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens
    )


def _encode_chunk(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    if piece in ranks:  # as tiktoken: a chunk that is a token is that token
        return [ranks[piece]]
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_i, best_rank = -1, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best_rank is None or r < best_rank):
                best_i, best_rank = i, r
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


def reference_encode(text: str, ranks: dict[bytes, int], pattern: str = GPT2_PATTERN) -> list[int]:
    """Slow, obvious BPE: per chunk, merge the leftmost adjacent pair of lowest rank until none."""
    ids: list[int] = []
    for chunk in split_chunks(text, pattern):
        ids.extend(_encode_chunk(chunk.encode("utf-8"), ranks))
    return ids
