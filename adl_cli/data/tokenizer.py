"""Tokenizers, all backed by tiktoken's fast encoder (or plain bytes).

- ``bytes``: UTF-8 bytes, 256 ids plus <|endoftext|> = 256.
- ``bpe``: byte-level BPE that adl trains on the corpus (``adl_cli.data.bpe``), saved in
  tiktoken's file format and loaded into ``tiktoken.Encoding``.
- ``gpt2``: tiktoken's GPT-2 encoding, only when its files are already in tiktoken's cache
  (nothing is downloaded); otherwise a clear error says how to provide them.
- a path to a ``.tiktoken`` ranks file.

A run folder stores ``tokenizer.json`` (kind, pattern, specials) and, for BPE, the ranks
file ``tokenizer.tiktoken``, so generation reproduces training's ids.

Special tokens beyond ``<|endoftext|>`` (a chat template's markers, ``with_specials``) get the
ids after the last one; ``encode`` never produces them from text (it encodes ordinary text
only), so a user's message cannot forge a marker. ``with_single_digits`` changes the
pre-tokenisation pattern so every digit is its own piece (arithmetic aligns digit by digit).
"""

from __future__ import annotations

import json
from adl_cli.fileio import atomic_copy
from pathlib import Path

import numpy as np

from adl_cli.errors import AdlError

EOT = "<|endoftext|>"


def single_digit_pattern(pattern: str) -> str:
    """A pre-tokenisation pattern whose numbers split into one piece per digit: GPT-2's
    `` ?\\p{N}+`` alternative becomes ``\\p{N}`` (the space before a number is its own piece)."""
    out = pattern.replace(r" ?\p{N}+", r"\p{N}")
    if out == pattern and r"\p{N}" not in pattern:
        raise ValueError("the tokenizer's pattern has no number alternative to split into digits")
    return out


class Tokenizer:
    """encode/decode plus the metadata a run folder needs."""

    def __init__(self, kind: str, encoding=None, ranks_path: Path | None = None, pattern: str | None = None,
                 specials: dict[str, int] | None = None, chat: dict | None = None):
        self.kind = kind
        self.encoding = encoding
        self.ranks_path = ranks_path
        self.pattern = pattern
        self.specials = dict(specials or {})  # special tokens beyond <|endoftext|>: text -> id
        self.chat = chat  # a chat template's description (adl_cli.data.chat), stored beside the tokenizer
        if self.specials and encoding is not None:
            self.encoding = _with_special_tokens(encoding, self.specials, pattern)
        elif pattern and encoding is not None and pattern != encoding._pat_str:
            self.encoding = _with_special_tokens(encoding, {}, pattern)

    @property
    def vocab_size(self) -> int:
        if self.encoding is None:
            return 257 + len(self.specials)
        return self.encoding.n_vocab

    def special_id(self, text: str) -> int:
        """The id of a special token (``<|endoftext|>`` or one added with ``with_specials``)."""
        if text == EOT:
            return self.eot_id
        if text not in self.specials:
            raise KeyError(text)
        return self.specials[text]

    def with_specials(self, names: list[str]) -> Tokenizer:
        """This tokenizer with special tokens ``names`` appended (ids vocab_size, vocab_size + 1, ...);
        names it already has keep their ids."""
        specials = dict(self.specials)
        taken = {EOT, *specials}
        nxt = self.vocab_size
        for name in names:
            if not name or not name.strip():
                raise ValueError("a special token cannot be empty or blank")
            if name in taken:
                continue
            specials[name] = nxt
            taken.add(name)
            nxt += 1
        return Tokenizer(self.kind, self.encoding, self.ranks_path, self.pattern, specials, self.chat)

    def with_single_digits(self) -> Tokenizer:
        """This tokenizer with numbers pre-split into single digits (bytes already are)."""
        if self.encoding is None:
            return self
        pattern = single_digit_pattern(self.pattern or self.encoding._pat_str)
        return Tokenizer(self.kind, self.encoding, self.ranks_path, pattern, self.specials, self.chat)

    @property
    def single_digits(self) -> bool:
        return self.encoding is None or r" ?\p{N}+" not in (self.pattern or self.encoding._pat_str)

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
        if sum(map(len, texts)) < 2000 * len(texts):  # short texts: tiktoken's thread pool costs more than it saves
            return [np.asarray(self.encoding.encode_ordinary(t), dtype=np.int64) for t in texts]
        return [np.asarray(ids, dtype=np.int64) for ids in self.encoding.encode_ordinary_batch(texts)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.encoding is None:
            if not self.specials:
                return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
            names = {v: k.encode() for k, v in self.specials.items()}
            return b"".join(bytes([i]) if i < 256 else names.get(i, b"") for i in ids).decode("utf-8", errors="replace")
        return self.encoding.decode([i for i in ids if i < self.encoding.n_vocab], errors="replace")

    @property
    def special_ids(self) -> set[int]:
        if self.encoding is None:
            return {256, *self.specials.values()}
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
        elif self.kind == "gpt2" and self.pattern:
            meta["pattern"] = self.pattern
        if self.specials:
            meta["specials"] = self.specials
        if self.chat:
            meta["chat"] = self.chat
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
            tok = cls("bytes")
        elif kind == "gpt2":
            tok = gpt2_tokenizer()
        elif kind in ("bpe", "file"):
            tok = from_ranks_file(run_dir / meta.get("ranks", "tokenizer.tiktoken"), kind=kind, pattern=meta.get("pattern"))
        else:
            raise AdlError(f"{path}: unknown tokenizer kind {kind!r}")
        specials = meta.get("specials") or {}
        if not isinstance(specials, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in specials.items()):
            raise AdlError(f"{path}: 'specials' must map token text to an id")
        if specials or meta.get("chat") or (kind == "gpt2" and meta.get("pattern")):
            tok = cls(tok.kind, tok.encoding, tok.ranks_path, meta.get("pattern") or tok.pattern, specials, meta.get("chat"))
            if specials and sorted(specials.values()) != list(range(tok.vocab_size - len(specials), tok.vocab_size)):
                raise AdlError(f"{path}: the special tokens' ids {sorted(specials.values())} do not follow the base vocabulary")
        return tok


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


def _with_special_tokens(encoding, specials: dict[str, int], pattern: str | None):
    """A tiktoken Encoding like ``encoding`` with more special tokens (and another pattern)."""
    import tiktoken

    base = {k: v for k, v in encoding._special_tokens.items()}
    return tiktoken.Encoding(encoding.name, pat_str=pattern or encoding._pat_str, mergeable_ranks=encoding._mergeable_ranks,
                             special_tokens={**base, **specials})


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
