"""Token streams: tokenize a corpus once into a memory-mapped cache, split, sample windows.

Batches are a pure function of (seed, step): step t draws the starts of
``batch_size * grad_accum * world`` random windows from a generator seeded with
(seed, t); micro-batch m on rank r takes slice ``m * world + r``. So the global batch of
a step does not depend on how it is split across processes and accumulation steps, and
the data position to resume from is the step number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adl_cli.data.corpus import corpus_key, load_documents
from adl_cli.data.tokenizer import Tokenizer, make_tokenizer
from adl_cli.fileio import cache_dir
from adl_cli.errors import AdlError
from adl_cli.fileio import atomic_path, atomic_write


@dataclass
class DataSection:
    corpus: str = "pydoc"  # pydoc | stdlib | a file, folder or glob
    tokenizer: str = "bpe"  # bytes | bpe | gpt2 | path/to/ranks.tiktoken
    vocab_size: int = 4096  # for a bpe tokenizer trained on the corpus
    val_fraction: float = 0.1

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass
class TokenData:
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    val_bytes_per_token: float
    corpus: str

    @property
    def n_tokens(self) -> int:
        return len(self.train) + len(self.val)


def _tokenize_to_cache(docs: list[str], tok: Tokenizer, path: Path) -> None:
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    parts = []
    for ids in tok.encode_batch(docs):
        parts.append(ids.astype(dtype))
        parts.append(np.array([tok.eot_id], dtype=dtype))
    arr = np.concatenate(parts) if parts else np.zeros(0, dtype)
    atomic_write(path.with_suffix(".json"), json.dumps({"dtype": np.dtype(dtype).name, "n": int(len(arr))}))
    with atomic_path(path) as tmp:
        arr.tofile(tmp)


def _tokenizer_key(tok: Tokenizer) -> str:
    if tok.ranks_path is not None:
        import hashlib

        return tok.kind + "-" + hashlib.sha256(Path(tok.ranks_path).read_bytes()).hexdigest()[:12]
    return tok.kind


def load_tokens(section: DataSection, *, progress=None, tokenizer: Tokenizer | None = None) -> TokenData:
    """Tokenize (or reuse the cache of) ``section.corpus`` and split train/val."""
    if section.corpus.startswith("shards:"):
        return load_shard_tokens(section, tokenizer)
    docs = load_documents(section.corpus)
    key = corpus_key(docs)
    if tokenizer is None:
        text = "\n\n".join(docs) if section.tokenizer == "bpe" else None
        tokenizer = make_tokenizer(section.tokenizer, text=text, corpus_key=key, vocab_size=section.vocab_size, progress=progress)
    path = cache_dir() / "tokens" / f"{key}-{_tokenizer_key(tokenizer)}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or not path.with_suffix(".json").exists():
        _tokenize_to_cache(docs, tokenizer, path)
    meta = json.loads(path.with_suffix(".json").read_text())
    tokens = np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["n"],))
    n_val = max(1, int(len(tokens) * section.val_fraction))
    train, val = tokens[:-n_val], tokens[-n_val:]
    sample = val[: min(len(val), 200_000)]
    bpt = tokenizer.token_bytes(sample) / max(1, len(sample))
    return TokenData(tokenizer, train, val, bpt, section.corpus)


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
    """batch_fn(step, micro, rank, world) -> (x, y) for the trainer."""

    def __init__(self, tokens, block: int, batch_size: int, grad_accum: int, seed: int):
        self.tokens, self.block, self.batch_size, self.grad_accum, self.seed = tokens, block, batch_size, grad_accum, seed
        window_starts(len(tokens), block, 1, seed, 0)  # fail early on a too-small split

    def __call__(self, step: int, micro: int, rank: int, world: int):
        slices = self.grad_accum * world
        starts = window_starts(len(self.tokens), self.block, self.batch_size * slices, self.seed, step)
        i = micro * world + rank
        return windows(self.tokens, starts[i * self.batch_size : (i + 1) * self.batch_size], self.block)


def eval_windows(tokens, block: int, batch_size: int, n_batches: int, seed: int, rank: int = 0, world: int = 1):
    """The same fixed evaluation batches every time (rank r takes every world-th one)."""
    for i in range(rank, n_batches, world):
        starts = window_starts(len(tokens), block, batch_size, seed + 1_000_003, i)
        yield windows(tokens, starts, block)
