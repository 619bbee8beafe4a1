"""llm.c token shards: many ``.bin`` files read as one memory-mapped token stream.

File format (Karpathy's llm.c, GPT-2 variant), little-endian:

    header  256 x int32 (1024 bytes): [0] magic 20240520, [1] version 1, [2] token count n,
                                      [3..255] zero
    body    n x uint16 token ids

so a valid file is exactly 1024 + 2 n bytes. ``write_shards`` cuts a token stream into
files of ``shard_tokens`` tokens (the last one shorter), each written to a temporary name
and renamed, named ``{prefix}_train_000000.bin`` ... (llm.c's convention; with
``val_first`` the first file is ``{prefix}_val_000000.bin``, which sorts after the
train files, so a reader that takes its validation split from the stream's tail reads
the val shard). ``ShardedTokens.open`` takes files in name order, checks every header
against its file size, maps the bodies lazily (``np.memmap`` at offset 1024) and exposes
their concatenation: ``len``, integer indexing and slices that may span shard
boundaries (a slice returns a fresh ``np.ndarray``).
"""

from __future__ import annotations

import glob as globlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from adl_cli.errors import AdlError, opt
from adl_cli.fileio import atomic_write

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_VOCAB = 2**16


# ----------------------------------------------------------------------------- writing


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """One shard file, atomically (temporary name, fsync, rename)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= MAX_VOCAB):
        raise AdlError(f"token id {int(tokens.max()) if tokens.max() >= MAX_VOCAB else int(tokens.min())} does not fit llm.c's uint16 shards (ids must be in [0, {MAX_VOCAB}))")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, len(tokens)
    atomic_write(path, (header.tobytes(), tokens.astype(TOKEN_DTYPE, copy=False).tobytes()))


def _chunks(tokens) -> Iterable[np.ndarray]:
    """An array, an iterable of arrays/lists, or an iterable of ints -> 1-D int64 arrays."""
    if isinstance(tokens, np.ndarray):
        yield tokens.reshape(-1)
        return
    loose: list[int] = []
    for item in tokens:
        if isinstance(item, (int, np.integer)):
            loose.append(int(item))
            if len(loose) >= 65536:
                yield np.asarray(loose, dtype=np.int64)
                loose = []
            continue
        if loose:
            yield np.asarray(loose, dtype=np.int64)
            loose = []
        yield np.asarray(item).reshape(-1)
    if loose:
        yield np.asarray(loose, dtype=np.int64)


def write_shards(
    tokens,
    out_dir: Path,
    shard_tokens: int,
    *,
    prefix: str = "tokens",
    vocab_size: int | None = None,
    val_first: bool = False,
) -> list[Path]:
    """Cut ``tokens`` (an array or an iterable of arrays or ints) into llm.c shards in ``out_dir``.

    Returns the paths written, in order. The first shard is the validation shard when
    ``val_first`` (llm.c's layout). Ids must fit uint16: a ``vocab_size`` over 65536 or an
    id outside [0, 65536) is an AdlError before anything of that shard is written.
    """
    if shard_tokens < 1:
        raise AdlError(f"{opt('shard_tokens')} must be >= 1, got {shard_tokens}")
    if vocab_size is not None and vocab_size > MAX_VOCAB:
        raise AdlError(f"a vocabulary of {vocab_size:,} ids does not fit llm.c's uint16 token shards (at most {MAX_VOCAB:,})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    buf: list[np.ndarray] = []
    held = 0

    def flush(n: int) -> None:
        nonlocal buf, held
        arr = np.concatenate(buf) if len(buf) > 1 else buf[0]
        shard, rest = arr[:n], arr[n:]
        i = len(paths)
        split = "val" if val_first and i == 0 else "train"
        path = out_dir / f"{prefix}_{split}_{i:06d}.bin"
        write_shard(path, shard)
        paths.append(path)
        buf, held = ([rest] if len(rest) else []), len(rest)

    for chunk in _chunks(tokens):
        if not chunk.size:
            continue
        buf.append(chunk)
        held += len(chunk)
        while held >= shard_tokens:
            flush(shard_tokens)
    if held:
        flush(held)
    return paths


# ----------------------------------------------------------------------------- reading


def read_header(path: Path) -> int:
    """Validate one shard file's header against its size; returns its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise AdlError(f"cannot read token shard {path}: {e.strerror}") from None
    if len(raw) < HEADER_BYTES:
        raise AdlError(f"token shard {path} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte llm.c header")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != MAGIC:
        raise AdlError(f"token shard {path} has magic number {int(header[0])}, expected {MAGIC}: not an llm.c GPT-2 token file")
    if int(header[1]) != VERSION:
        raise AdlError(f"token shard {path} has format version {int(header[1])}, expected {VERSION} (uint16 tokens)")
    n = int(header[2])
    body = size - HEADER_BYTES
    if n < 0 or body != n * TOKEN_DTYPE.itemsize:
        state = "truncated" if 0 <= body < n * TOKEN_DTYPE.itemsize else "the wrong size"
        raise AdlError(
            f"token shard {path} is {state}: its header says {n:,} tokens ({HEADER_BYTES + max(n, 0) * 2:,} bytes), the file has {size:,} bytes"
        )
    return n


def shard_files(spec: str | os.PathLike) -> list[Path]:
    """The shard files a folder (its *.bin), a glob or a single file names, sorted by name."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.bin"))
        if not files:
            raise AdlError(f"token shard folder {spec} holds no .bin files")
        return files
    if path.is_file():
        return [path]
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in globlib.glob(str(path)) if Path(p).is_file())
        if not files:
            raise AdlError(f"token shard glob {spec} matches no files")
        return files
    raise AdlError(f"token shards not found: {spec} is neither a folder, a file nor a glob")


class ShardedTokens:
    """The concatenation of llm.c shard files, memory-mapped on first touch."""

    def __init__(self, files: list[Path], counts: list[int]):
        self.files = list(files)
        self.counts = list(counts)
        self.offsets = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
        self._maps: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, spec: str | os.PathLike) -> ShardedTokens:
        files = shard_files(spec)
        return cls(files, [read_header(f) for f in files])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shard(self, i: int) -> np.ndarray:
        arr = self._maps.get(i)
        if arr is None:
            if self.counts[i] == 0:
                arr = np.zeros(0, dtype=TOKEN_DTYPE)
            else:
                arr = np.memmap(self.files[i], dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(self.counts[i],))
            self._maps[i] = arr
        return arr

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenation, as one array (copied across shards)."""
        start, stop = max(0, start), min(len(self), stop)
        if stop <= start:
            return np.zeros(0, dtype=TOKEN_DTYPE)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        i, pos = first, start
        while pos < stop:
            lo = pos - int(self.offsets[i])
            hi = min(stop, int(self.offsets[i + 1])) - int(self.offsets[i])
            if hi > lo:
                parts.append(self._shard(i)[lo:hi])
            pos = int(self.offsets[i + 1])
            i += 1
        return np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)

    def view(self, start: int, stop: int) -> ShardedView:
        return ShardedView(self, start, stop)

    def __getitem__(self, key):
        return ShardedView(self, 0, len(self))[key]

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self.files)} files, {len(self):,} tokens)"


class ShardedView:
    """Tokens [start, stop) of a ShardedTokens, without copying; slicing returns np.ndarray."""

    def __init__(self, base: ShardedTokens, start: int, stop: int):
        n = len(base)
        start, stop = max(0, min(start, n)), max(0, min(stop, n))
        self.base, self.start, self.stop = base, start, max(start, stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            lo, hi, step = key.indices(n)
            if step != 1:  # rare: read the whole view, let numpy stride it
                return self.base.read(self.start, self.stop)[key]
            return self.base.read(self.start + lo, self.start + max(lo, hi))
        i = int(key)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token index {key} out of range for {n} tokens")
        return self.base.read(self.start + i, self.start + i + 1)[0]

    def __array__(self, dtype=None, copy=None):
        arr = self.base.read(self.start, self.stop)
        return arr if dtype is None else arr.astype(dtype)

    def view(self, start: int, stop: int) -> ShardedView:
        return ShardedView(self.base, self.start + start, self.start + min(stop, len(self)))


# ----------------------------------------------------------------------------- corpus -> shards


def tokenizer_fingerprint(tok) -> dict:
    """What identifies a tokenizer's ids: kind, size, end-of-text id and, for a ranks file, its hash."""
    import hashlib

    out = {"tokenizer": tok.kind, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}
    if tok.ranks_path is not None:
        out["ranks_sha256"] = hashlib.sha256(Path(tok.ranks_path).read_bytes()).hexdigest()
    return out


def check_shard_tokenizer(files: list[Path], tok) -> None:
    """Shards written by `adl data shard` record their tokenizer (shards.json beside them);
    training on them with another tokenizer would feed ids that mean other text."""
    import json

    manifest = Path(files[0]).parent / "shards.json"
    if not manifest.exists():
        return  # foreign shards (llm.c's own): nothing recorded to check
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdlError(f"cannot read {manifest}: {e}") from None
    mine = tokenizer_fingerprint(tok)
    for key in ("vocab_size", "eot_id", "ranks_sha256"):
        if key in meta and meta[key] != mine.get(key):
            hint = f" (data.tokenizer = \"{manifest.parent / meta['tokenizer_file']}\")" if meta.get("tokenizer_file") else f" (data.tokenizer = \"{meta.get('tokenizer')}\")"
            raise AdlError(f"the shards in {manifest.parent} were tokenized with {meta.get('tokenizer')} ({meta.get('vocab_size')} ids), "
                           f"the recipe's tokenizer is {tok.describe()} ({key} differs); train with the shards' own tokenizer{hint}")


def _safe_prefix(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-." else "-" for c in name).strip("-.")
    return cleaned or "tokens"


def shard_corpus(
    corpus: str,
    tokenizer: str,
    out_dir: Path,
    shard_tokens: int,
    *,
    vocab_size: int = 4096,
    val_shard: bool = False,
    val_fraction: float = 0.1,
    prefix: str | None = None,
    dedup: bool = True,
    progress=None,
    force: bool = False,
) -> dict:
    """Tokenize a corpus (documents separated by <|endoftext|>, as for training) into shards.

    Writes the shards, ``shards.json`` (tokenizer, files, counts) and, for a BPE or ranks
    file tokenizer, ``tokenizer.tiktoken``, so a recipe can say
    ``data.corpus = "shards:DIR/*.bin"`` and ``data.tokenizer = "DIR/tokenizer.tiktoken"``.
    Shards of an earlier run with the same prefix that this run did not rewrite are
    removed afterwards, so the folder's glob never mixes two runs. Returns the manifest.
    """
    import json
    from adl_cli.fileio import atomic_copy

    from adl_cli.data.corpus import dedup_paragraphs, load_documents, split_documents, split_key, train_side
    from adl_cli.data.tokenizer import make_tokenizer
    from adl_cli.fileio import atomic_write as atomic_write_text

    if shard_tokens < 1:
        raise AdlError(f"{opt('shard_tokens')} must be >= 1, got {shard_tokens}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise AdlError(f"{opt('out')} {out_dir} is a file, not a folder")
    existing = sorted(out_dir.glob("*.bin")) + [p for p in (out_dir / "shards.json", out_dir / "tokenizer.tiktoken") if p.exists()] if out_dir.is_dir() else []
    if existing and not force:
        raise AdlError(f"{opt('out')} {out_dir} already holds shards ({existing[0].name}{' and more' if len(existing) > 1 else ''}); choose another folder or pass {opt('force')} to replace them")
    if tokenizer == "bpe" and vocab_size > MAX_VOCAB:
        raise AdlError(f"{opt('vocab_size')} {vocab_size:,} does not fit llm.c's uint16 token shards (at most {MAX_VOCAB:,} ids)")
    docs = load_documents(corpus)
    # A BPE learns from the documents training will see (all but the last val_fraction, held out as
    # in load_tokens), so the tokenizer never saw the text it is validated on.
    train_docs, val_docs = split_documents(docs, val_fraction)
    text = (lambda: "\n\n".join(train_side(train_docs, [], val_docs, dedup)[0])) if tokenizer == "bpe" else None
    key = split_key(train_docs, [], val_docs, dedup)  # as load_tokens names the same split: one tokenizer cache
    if dedup:  # the training side without repeated paragraphs, as training reads it (the held-out tail stays whole)
        docs = dedup_paragraphs(train_docs)[0] + val_docs
    tok = make_tokenizer(tokenizer, text=text, corpus_key=key, vocab_size=vocab_size, progress=progress)
    if tok.vocab_size > MAX_VOCAB:
        raise AdlError(f"the tokenizer {tok.describe()} does not fit llm.c's uint16 token shards (at most {MAX_VOCAB:,} ids)")
    prefix = _safe_prefix(prefix or Path(corpus).stem or corpus)
    eot = np.array([tok.eot_id], dtype=np.int64)

    def stream():
        for i in range(0, len(docs), 256):
            for ids in tok.encode_batch(docs[i : i + 256]):
                yield ids
                yield eot

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_shards(stream(), out_dir, shard_tokens, prefix=prefix, vocab_size=tok.vocab_size, val_first=val_shard)
    written = {p.name for p in paths}
    for old in existing:  # --force: nothing of the replaced set may stay behind (shards nor tokenizer)
        if old.suffix == ".bin" and old.name not in written:
            old.unlink()
    if tok.ranks_path is None and (out_dir / "tokenizer.tiktoken").exists():
        (out_dir / "tokenizer.tiktoken").unlink()
    manifest = {
        "format": "llm.c token shards: 256 x int32 header (magic 20240520, version 1, count), uint16 tokens",
        "corpus": corpus,
        **tokenizer_fingerprint(tok),
        "tokens": 0,
        "shards": [],
    }
    if tok.ranks_path is not None:
        target = out_dir / "tokenizer.tiktoken"
        if Path(tok.ranks_path).resolve() != target.resolve():
            atomic_copy(tok.ranks_path, target)
        manifest["tokenizer_file"] = target.name
    for p in paths:
        n = read_header(p)
        manifest["shards"].append({"file": p.name, "split": "val" if "_val_" in p.name else "train", "tokens": n})
        manifest["tokens"] += n
    atomic_write_text(out_dir / "shards.json", json.dumps(manifest, indent=1))
    return manifest
