"""Token streams: tokenize a corpus once into a memory-mapped cache, split, sample windows.

Batches are a pure function of (seed, step): step t draws the starts of
``batch_size * grad_accum * world`` random windows from a generator seeded with
(seed, t); micro-batch m on rank r takes slice ``m * world + r``. So the global batch of
a step does not depend on how it is split across processes and accumulation steps, and
the data position to resume from is the step number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adl_cli.data.corpus import corpus_key, load_documents, split_documents, split_key, train_side
from adl_cli.data.tokenizer import Tokenizer, make_tokenizer
from adl_cli.errors import AdlError
from adl_cli.fileio import atomic_path, atomic_write, cache_dir


@dataclass
class DataSection:
    corpus: str = "pydoc"  # pydoc | stdlib | a file, folder or glob; its last val_fraction is held out
    tokenizer: str = "bpe"  # bytes | bpe | gpt2 | path/to/ranks.tiktoken
    vocab_size: int = 4096  # for a bpe tokenizer trained on the training text
    val_fraction: float = 0.1
    extra_train: list[str] = field(default_factory=list)  # more corpora for the training stream only (never validated on)
    align: str = "random"  # random | document: training windows start anywhere, or only where a document starts
    tokenizer_text: str = "train"  # train | corpus: a bpe learns from all training text, or from the corpus's own training side only
    dedup: bool = True  # leave out repeats of training paragraphs (64 bytes or more): each is trained on once per epoch
    corpus_repeat: int = 1  # the corpus's own training text comes this many times per pass over extra_train (a mixture weight)

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.align not in ("random", "document"):
            raise ValueError(f"data.align must be 'random' or 'document', got '{self.align}'")
        if not isinstance(self.corpus_repeat, int) or self.corpus_repeat < 1:
            raise ValueError(f"data.corpus_repeat must be a whole number >= 1, got {self.corpus_repeat}")
        if self.tokenizer_text not in ("train", "corpus"):
            raise ValueError(f"data.tokenizer_text must be 'train' or 'corpus', got '{self.tokenizer_text}'")


@dataclass
class TokenData:
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    val_bytes_per_token: float
    corpus: str
    own_train: int = -1  # tokens at the start of ``train`` from the corpus itself (the rest: data.extra_train); -1: all

    @property
    def corpus_train(self):
        """The training tokens that come from the corpus itself (its split's other side), without the extras."""
        return self.train if self.own_train < 0 else self.train[: self.own_train]

    @property
    def n_tokens(self) -> int:
        return len(self.train) + len(self.val)


def _tokenize_to_cache(docs: list[str], tok: Tokenizer, path: Path, own: int | None = None) -> None:
    """Tokens of ``docs``, each followed by <|endoftext|>; the meta file records how many tokens the
    first ``own`` documents make (the corpus's own training text, before the extras)."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    parts = []
    own_tokens = 0
    for i, ids in enumerate(tok.encode_batch(docs)):
        parts.append(ids.astype(dtype))
        parts.append(np.array([tok.eot_id], dtype=dtype))
        if own is not None and i < own:
            own_tokens += len(ids) + 1
    arr = np.concatenate(parts) if parts else np.zeros(0, dtype)
    meta = {"dtype": np.dtype(dtype).name, "n": int(len(arr))}
    if own is not None:
        meta["own"] = own_tokens
    atomic_write(path.with_suffix(".json"), json.dumps(meta))
    with atomic_path(path) as tmp:
        arr.tofile(tmp)


def _tokenizer_key(tok: Tokenizer) -> str:
    if tok.ranks_path is not None:
        import hashlib

        return tok.kind + "-" + hashlib.sha256(Path(tok.ranks_path).read_bytes()).hexdigest()[:12]
    return tok.kind


def split_texts(section: DataSection) -> tuple[list[str], list[str], list[str]]:
    """(the corpus's training documents, the extra_train documents, held-out documents): the
    corpus's last val_fraction, cut at a document boundary, is held out; ``extra_train`` corpora
    join the training side only."""
    train, val = split_documents(load_documents(section.corpus), section.val_fraction)
    extra: list[str] = []
    for spec in section.extra_train:
        if spec == section.corpus:
            raise AdlError(f"data.extra_train names the corpus itself ('{spec}'): its held-out part would be trained on")
        extra += load_documents(spec)
    return train, extra, val


def _cached_stream(key: str, docs, tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """(the token stream of ``docs``, the tokens of its own part): ``docs`` is a list, or a function
    giving (documents, how many of them are the corpus's own) when the cache is empty."""
    path = cache_dir() / "tokens" / f"{key}-{_tokenizer_key(tokenizer)}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or not path.with_suffix(".json").exists():
        if callable(docs):
            listed, own = docs()
            _tokenize_to_cache(listed, tokenizer, path, own)
        else:
            _tokenize_to_cache(docs, tokenizer, path)
    meta = json.loads(path.with_suffix(".json").read_text())
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["n"],)), int(meta.get("own", -1))


def load_tokens(section: DataSection, *, progress=None, tokenizer: Tokenizer | None = None) -> TokenData:
    """Tokenize (or reuse the caches of) the training and held-out documents. The training side
    loses every paragraph that quotes the held-out text (``drop_overlaps``), and a BPE tokenizer
    is trained on it alone. Both are cached under a hash of the raw split, so the (seconds of)
    overlap search runs once per corpus."""
    if section.corpus.startswith("shards:"):
        if section.extra_train:
            raise AdlError("data.extra_train adds text to a corpus; token shards are already tokenized: write the extra text into the shards (adl data shard)")
        return load_shard_tokens(section, tokenizer)
    own_raw, extra_raw, val_docs = split_texts(section)
    key = split_key(own_raw, extra_raw, val_docs, section.dedup, section.corpus_repeat)
    cleaned: list[tuple[list[str], int]] = []

    def train_docs() -> tuple[list[str], int]:
        if not cleaned:
            cleaned.append(train_side(own_raw, extra_raw, val_docs, section.dedup, section.corpus_repeat))
        return cleaned[0]

    if tokenizer is None:
        own_only = section.tokenizer_text == "corpus" and bool(section.extra_train)

        def bpe_text() -> str:  # training text only: the whole stream, or the corpus's own side (without extra_train)
            docs, n_own = train_docs()
            return "\n\n".join(docs[:n_own] if own_only else docs)

        text = bpe_text if section.tokenizer == "bpe" else None
        bpe_key = key + ("-own" if own_only else "")
        tokenizer = make_tokenizer(section.tokenizer, text=text, corpus_key=bpe_key, vocab_size=section.vocab_size, progress=progress)
    train, own = _cached_stream(key + "-train", train_docs, tokenizer)
    val, _ = _cached_stream(corpus_key(val_docs) + "-val", val_docs, tokenizer)
    sample = val[: min(len(val), 200_000)]
    bpt = tokenizer.token_bytes(sample) / max(1, len(sample))
    return TokenData(tokenizer, train, val, bpt, section.corpus, own_train=own)


def load_shard_tokens(section: DataSection, tokenizer: Tokenizer | None) -> TokenData:
    """llm.c-style token shards ('shards:PATH/*.bin'). With llm.c's ``*_val_*`` files among them
    the val split is those files and training reads only the others; else it is the stream's tail."""
    try:
        from adl_cli.data.shards import ShardedTokens
    except ImportError:
        raise AdlError("token shards are not supported in this build") from None
    from adl_cli.data.shards import check_shard_tokenizer, read_header, shard_files

    files = shard_files(section.corpus.removeprefix("shards:"))
    counts = {f: read_header(f) for f in files}  # every header checked before anything else
    if tokenizer is None:
        if section.tokenizer == "bpe":
            raise AdlError("data.tokenizer = \"bpe\" trains a tokenizer on text; token shards need the tokenizer they were written with "
                           "(e.g. data.tokenizer = \"DIR/tokenizer.tiktoken\" beside the shards, or \"bytes\")")
        tokenizer = make_tokenizer(section.tokenizer, vocab_size=section.vocab_size)
    check_shard_tokenizer(files, tokenizer)
    val_files = [f for f in files if "_val_" in f.name]
    train_files = [f for f in files if "_val_" not in f.name]
    if val_files and train_files:  # llm.c's layout: validate on the val shard(s) only, train on the rest
        train = ShardedTokens(train_files, [counts[f] for f in train_files])
        val = ShardedTokens(val_files, [counts[f] for f in val_files])
        train, val = train.view(0, len(train)), val.view(0, len(val))
    else:
        tokens = ShardedTokens(files, [counts[f] for f in files])
        n_val = max(1, int(len(tokens) * section.val_fraction))
        train, val = tokens.view(0, len(tokens) - n_val), tokens.view(len(tokens) - n_val, len(tokens))
    sample = val[0 : min(len(val), 200_000)]
    bpt = tokenizer.token_bytes(sample) / max(1, len(sample))
    return TokenData(tokenizer, train, val, bpt, section.corpus)


def window_starts(n_tokens: int, block: int, count: int, seed: int, step: int) -> np.ndarray:
    hi = n_tokens - block - 1
    if hi <= 0:
        raise AdlError(f"the data split has {n_tokens} tokens, too few for windows of {block} + 1; use a bigger corpus or a smaller model.block_size")
    return np.random.default_rng([seed, step]).integers(0, hi + 1, size=count)


def windows(tokens, starts: np.ndarray, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = np.stack([np.asarray(tokens[s : s + block + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(chunk)
    return t[:, :-1], t[:, 1:]


class WindowBatches:
    """batch_fn(step, micro, rank, world) -> (x, y) for the trainer: random windows of the stream,
    a pure function of (seed, step).

    ``align = "document"``: windows start only where a document starts (after <|endoftext|>), so
    the model always reads a document from its beginning. Warm-ups (modded-nanogpt; Li et al.,
    "The Stability-Efficiency Dilemma", 2022, for the sequence length): over the first
    ``seq_warmup`` steps the window grows linearly from ``seq_start`` to ``block`` tokens (in
    steps of 16), over the first ``batch_warmup`` steps the rows from ``batch_start`` to
    ``batch_size``; the trainer then counts each batch's own tokens (``units``)."""

    def __init__(self, tokens, block: int, batch_size: int, grad_accum: int, seed: int, *, align: str = "random", eot_id: int | None = None,
                 seq_warmup: int = 0, seq_start: int = 0, batch_warmup: int = 0, batch_start: int = 0):
        self.tokens, self.block, self.batch_size, self.grad_accum, self.seed = tokens, block, batch_size, grad_accum, seed
        self.seq_warmup, self.seq_start = seq_warmup, max(1, min(seq_start or block, block))
        self.batch_warmup, self.batch_start = batch_warmup, max(1, min(batch_start or batch_size, batch_size))
        window_starts(len(tokens), block, 1, seed, 0)  # fail early on a too-small split
        self.doc_starts = None
        if align == "document":
            if eot_id is None:
                raise ValueError("document-aligned batches need the tokenizer's end-of-text id")
            ends = np.flatnonzero(np.asarray(tokens) == eot_id) + 1
            starts = np.concatenate(([0], ends))
            self.doc_starts = starts[starts <= len(tokens) - block - 1]
            if len(self.doc_starts) == 0:
                raise AdlError(f"data.align = 'document': no document start leaves a window of {block} + 1 tokens")
        elif align != "random":
            raise ValueError(f"align must be 'random' or 'document', got {align!r}")

    @property
    def varies(self) -> bool:
        """Whether batches change shape over the run (the trainer then counts tokens per batch)."""
        return bool(self.seq_warmup or self.batch_warmup)

    def shape_at(self, step: int) -> tuple[int, int]:
        """(rows, tokens per row) of step's micro-batches."""
        rows, length = self.batch_size, self.block
        if self.batch_warmup and step < self.batch_warmup:
            rows = self.batch_start + (self.batch_size - self.batch_start) * step // self.batch_warmup
        if self.seq_warmup and step < self.seq_warmup:
            grown = self.seq_start + (self.block - self.seq_start) * step // self.seq_warmup
            length = max(self.seq_start, min(self.block, grown - grown % 16 if grown >= 16 else grown))
        return rows, length

    def __call__(self, step: int, micro: int, rank: int, world: int):
        rows, length = self.shape_at(step)
        slices = self.grad_accum * world
        if self.doc_starts is not None:
            pick = np.random.default_rng([self.seed, step]).integers(0, len(self.doc_starts), size=rows * slices)
            starts = self.doc_starts[pick]
        else:
            starts = window_starts(len(self.tokens), length, rows * slices, self.seed, step)
        i = micro * world + rank
        return windows(self.tokens, starts[i * rows : (i + 1) * rows], length)


def split_windows(tokens, block: int, batch_size: int, max_batches: int | None = None, score_last: int | None = None):
    """Consecutive windows over a split, each token scored once: batches of (x, y) where y is -100
    where a token was already scored (the last window is end-aligned and overlaps the one before).
    ``max_batches`` stops early (the first that many batches); None covers the whole split.

    ``score_last`` = m < block: only each window's last m positions are scored and windows advance
    by m, so every scored token has at least block - m tokens of context (a Perceiver AR's
    evaluation, and the same tokens for any model it is compared with); the split's first
    block - m targets are never scored."""
    n = len(tokens)
    if n < block + 1:
        raise AdlError(f"the split has {n} tokens, too few for a window of {block} + 1")
    stride = block if score_last is None else int(score_last)
    if not 1 <= stride <= block:
        raise ValueError(f"score_last must be in [1, {block}], got {score_last}")
    starts = list(range(0, n - block, stride))
    last = n - block - 1
    if starts[-1] + block < n - 1:
        starts.append(last)
    for b in range(0, len(starts), batch_size):
        if max_batches is not None and b // batch_size >= max_batches:
            return
        chunk = starts[b:b + batch_size]
        x, y = windows(tokens, np.asarray(chunk), block)
        y = y.clone()  # y and x share memory
        y[:, : block - stride] = -100
        for row, s in enumerate(chunk):
            if s == last and len(starts) > 1:
                seen = starts[-2] + block  # the last target position the previous window scored
                y[row, : seen - s] = -100
        yield x, y
