"""Tokenizers, all backed by tiktoken's fast encoder (or plain bytes).

- ``bytes``: UTF-8 bytes, 256 ids plus <|endoftext|> = 256.
- ``bpe``: byte-level BPE that adl trains on the corpus (``adl_cli.data.bpe``), saved in
  tiktoken's file format and loaded into ``tiktoken.Encoding``.
- ``gpt2``: tiktoken's GPT-2 encoding, only when its files are already in tiktoken's cache
  (nothing is downloaded); otherwise a clear error says how to provide them.
- a path to a ``.tiktoken`` ranks file.

A run folder stores ``tokenizer.json`` (kind, pattern, specials) and, for BPE, the ranks
file ``tokenizer.tiktoken``, so generation reproduces training's ids.
"""

from __future__ import annotations

import json
from adl_cli.fileio import atomic_copy
from pathlib import Path

import numpy as np

from adl_cli.errors import AdlError

EOT = "<|endoftext|>"


class Tokenizer:
    """encode/decode plus the metadata a run folder needs."""

    def __init__(self, kind: str, encoding=None, ranks_path: Path | None = None, pattern: str | None = None):
        self.kind = kind
        self.encoding = encoding
        self.ranks_path = ranks_path
        self.pattern = pattern

    @property
    def vocab_size(self) -> int:
        return 257 if self.encoding is None else self.encoding.n_vocab

    @property
    def eot_id(self) -> int:
        return 256 if self.encoding is None else self.encoding.eot_token

    def encode(self, text: str) -> np.ndarray:
        if self.encoding is None:
            return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)
        return np.asarray(self.encoding.encode_ordinary(text), dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if self.encoding is None:
            return [self.encode(t) for t in texts]
        return [np.asarray(ids, dtype=np.int64) for ids in self.encoding.encode_ordinary_batch(texts)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.encoding is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.encoding.decode([i for i in ids if i < self.encoding.n_vocab], errors="replace")

    @property
    def special_ids(self) -> set[int]:
        if self.encoding is None:
            return {256}
        return {self.encoding.encode_single_token(t) for t in self.encoding.special_tokens_set}

    def token_bytes(self, ids) -> int:
        """Number of UTF-8 bytes of text the ids stand for (bits per byte needs it).

        Special tokens such as <|endoftext|> stand for no text: they count 0 bytes whatever
        the tokenizer (their literal spelling is not in the corpus)."""
        special = self.special_ids
        return len(self.decode([i for i in ids if int(i) not in special]).encode("utf-8"))

    def describe(self) -> str:
        return f"{self.kind} ({self.vocab_size} ids)"

    # -------------------------------------------------------------- run folders

    def save(self, run_dir: Path) -> None:
        from adl_cli.fileio import atomic_write as atomic_write_text

        run_dir = Path(run_dir)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id}
        if self.kind in ("bpe", "file"):
            target = run_dir / "tokenizer.tiktoken"
            if self.ranks_path and Path(self.ranks_path).resolve() != target.resolve():
                atomic_copy(self.ranks_path, target)
            meta["ranks"] = "tokenizer.tiktoken"
            meta["pattern"] = self.pattern
        atomic_write_text(run_dir / "tokenizer.json", json.dumps(meta, indent=1))

    @classmethod
    def load(cls, run_dir: Path) -> Tokenizer:
        run_dir = Path(run_dir)
        path = run_dir / "tokenizer.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise AdlError(f"{run_dir} has no tokenizer.json: is it an adl run folder?") from None
        except ValueError as e:
            raise AdlError(f"cannot read {path}: {e}") from None
        kind = meta.get("kind")
        if kind == "bytes":
            return cls("bytes")
        if kind == "gpt2":
            return gpt2_tokenizer()
        if kind in ("bpe", "file"):
            return from_ranks_file(run_dir / meta.get("ranks", "tokenizer.tiktoken"), kind=kind, pattern=meta.get("pattern"))
        raise AdlError(f"{path}: unknown tokenizer kind {kind!r}")


def from_ranks_file(path: Path, *, kind: str = "file", pattern: str | None = None) -> Tokenizer:
    from adl_cli.data import bpe

    path = Path(path)
    if not path.exists():
        raise AdlError(f"tokenizer file not found: {path}")
    try:
        ranks = bpe.load_ranks(path)
    except ValueError as e:
        raise AdlError(str(e)) from None
    pattern = pattern or bpe.GPT2_PATTERN
    enc = bpe.make_encoding(path.stem, ranks, pattern=pattern)
    return Tokenizer(kind, enc, ranks_path=path, pattern=pattern)


class _NotCached(Exception):
    pass


def gpt2_tokenizer() -> Tokenizer:
    """tiktoken's gpt2 encoding from its local cache only: reading from the network is blocked."""
    import tiktoken
    import tiktoken.load as tl

    def offline(blobpath: str) -> bytes:
        raise _NotCached(blobpath)

    real = tl.read_file
    tl.read_file = offline
    try:
        enc = tiktoken.get_encoding("gpt2")
    except _NotCached:
        raise AdlError(
            "the gpt2 tokenizer is not in tiktoken's cache and adl never downloads. On a machine with internet run "
            "`python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` with TIKTOKEN_CACHE_DIR set to a folder, "
            "copy that folder here and set TIKTOKEN_CACHE_DIR to it; or use data.tokenizer = \"bpe\" (trained locally) or \"bytes\""
        ) from None
    finally:
        tl.read_file = real
    return Tokenizer("gpt2", enc)


def bpe_tokenizer(text, corpus_key: str, vocab_size: int, *, progress=None) -> Tokenizer:
    """A BPE tokenizer trained on ``text`` (a string, or a function giving it, called only when the
    cache of this corpus hash and vocab size is empty)."""
    from adl_cli.data import bpe
    from adl_cli.fileio import cache_dir

    if vocab_size < 257:
        raise AdlError(f"data.vocab_size must be > 256 for a BPE tokenizer, got {vocab_size}")
    path = cache_dir() / "tokenizers" / f"bpe-{corpus_key}-{vocab_size}.tiktoken"
    if not path.exists():
        try:
            ranks = bpe.train_bpe(text() if callable(text) else text, vocab_size - 1, progress=progress)  # one id stays for <|endoftext|>
        except ValueError as e:
            raise AdlError(str(e)) from None
        bpe.save_ranks(ranks, path)
    return from_ranks_file(path, kind="bpe", pattern=bpe.GPT2_PATTERN)


def make_tokenizer(spec: str, *, text=None, corpus_key: str = "", vocab_size: int = 4096, progress=None) -> Tokenizer:
    """bytes | bpe | gpt2 | a path to a .tiktoken file."""
    if spec == "bytes":
        return Tokenizer("bytes")
    if spec == "gpt2":
        return gpt2_tokenizer()
    if spec == "bpe":
        if text is None:
            raise AdlError("a bpe tokenizer is trained on the corpus: give a corpus")
        return bpe_tokenizer(text, corpus_key, vocab_size, progress=progress)
    path = Path(spec).expanduser()
    if path.suffix == ".tiktoken" or path.exists():
        return from_ranks_file(path)
    raise AdlError(f"unknown tokenizer '{spec}': use bytes, bpe, gpt2 or a path to a .tiktoken file")
