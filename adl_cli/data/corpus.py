"""Built-in corpora and user text, offline.

- ``pydoc``: the English reference text that ships with every Python install
  (``pydoc_data.topics``, about 465k characters: the language reference's topics).
- ``stdlib``: the standard library's own ``.py`` source files (site-packages, tests and
  ``pydoc_data`` excluded: ``pydoc_data/topics.py`` holds the pydoc text word for word, so
  training on it would leak pydoc's held-out topics).
- ``stdlib-tests``: the standard library's test suite (``Lib/test``'s ``.py`` files, about 17 MB
  on CPython 3.11): more Python for runs that need more unique tokens (``adl scaling``'s
  largest); some installs (Debian's ``python3``) leave it out.
- anything else: a text file, a folder (its text files, recursively) or a glob.
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from pathlib import Path

from adl_cli.errors import AdlError

BUILTIN = ("pydoc", "stdlib", "stdlib-tests")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".tex", ".html", ".xml", ""}


def _pydoc_docs() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics)]


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "pydoc_data"}
    return sorted(p for p in root.rglob("*.py") if not (skip & set(p.relative_to(root).parts)))


def _stdlib_test_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"]) / "test"
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts) if root.is_dir() else []
    if len(files) < 100:  # Debian keeps test/support and a few others; the suite is the python3-test package
        raise AdlError(f"this Python install has no test suite in {root} (corpus 'stdlib-tests'); "
                       "Debian and Ubuntu ship it as python3.X-test, or use another corpus")
    return files


def _read(files: list[Path]) -> list[str]:
    parts = []
    for p in files:
        try:
            parts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            parts.append(p.read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise AdlError(f"cannot read corpus file {p}: {e.strerror}") from None
    return parts


def corpus_files(spec: str) -> list[Path]:
    """The files a user corpus spec names (a file, a folder or a glob)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise AdlError(f"corpus folder {spec} holds no text files")
        return files
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise AdlError(f"corpus glob {spec} matches no files")
        return files
    raise AdlError(f"corpus not found: '{spec}' is neither a built-in corpus ({', '.join(BUILTIN)}) nor an existing file, folder or glob")


def load_documents(spec: str) -> list[str]:
    """The corpus as a list of documents (topics, files); training separates them with <|endoftext|>."""
    if spec == "pydoc":
        return _pydoc_docs()
    if spec == "stdlib":
        return _read(_stdlib_files())
    if spec == "stdlib-tests":
        return _read(_stdlib_test_files())
    docs = _read(corpus_files(spec))
    if not any(d.strip() for d in docs):
        raise AdlError(f"corpus {spec} is empty")
    return docs


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val): the last ``val_fraction`` of the text, held out whole. The cut moves to the
    nearest document boundary, so no document is in both; a corpus of one document is cut at a
    line break instead."""
    sizes = [len(d) for d in docs]
    total = sum(sizes)
    target = total * (1.0 - val_fraction)
    if len(docs) > 1:
        ends, run = [], 0
        for n in sizes:
            run += n
            ends.append(run)
        k = min(range(len(docs) - 1), key=lambda i: abs(ends[i] - target))  # train = docs[: k + 1], never empty, val never empty
        return docs[: k + 1], docs[k + 1:]
    text = docs[0] if docs else ""
    cut = text.find("\n", int(target))
    if cut < 0 or cut >= len(text) - 1:
        cut = int(target)
    return [text[:cut]], [text[cut:]]


def window_hashes(text: str, width: int = 64):
    """A 64-bit polynomial hash of every ``width``-byte window of the UTF-8 text (numpy, wrapping
    uint64 arithmetic): the same bytes anywhere give the same hash."""
    import numpy as np

    b = np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8).astype(np.uint64)
    if len(b) < width:
        return np.zeros(0, np.uint64)
    base = np.uint64(1_000_003)
    inv = np.uint64(pow(1_000_003, -1, 2**64))
    one = np.ones(1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        powers = np.concatenate((one, np.cumprod(np.full(len(b) - 1, base, dtype=np.uint64))))  # base^k (mod 2^64)
        prefix = np.concatenate((np.zeros(1, np.uint64), np.cumsum(b * powers, dtype=np.uint64)))
        window = prefix[width:] - prefix[:-width]  # sum_j b[i+j] base^(i+j)
        inv_pow = np.concatenate((one, np.cumprod(np.full(len(window) - 1, inv, dtype=np.uint64))))  # base^-i
        return window * inv_pow  # sum_j b[i+j] base^j


def shared_windows(train: list[str], val: list[str], width: int = 64) -> tuple[int, int]:
    """(how many of val's ``width``-byte windows occur anywhere in the training text, how many
    there are): the leak check."""
    import numpy as np

    v = np.concatenate([window_hashes(t, width) for t in val] or [np.zeros(0, np.uint64)])
    t = np.concatenate([window_hashes(x, width) for x in train] or [np.zeros(0, np.uint64)])
    return int(np.isin(v, t).sum()), int(len(v))


def drop_overlaps(train: list[str], val: list[str], width: int = 64) -> tuple[list[str], int]:
    """The training documents without every paragraph that shares a ``width``-byte window with
    the held-out text (pydoc repeats a topic inside another: "compound" holds "while" and "with"),
    and how many paragraphs went. Held-out text is never trained on, whole or quoted."""
    import numpy as np

    v = np.unique(np.concatenate([window_hashes(t, width) for t in val] or [np.zeros(0, np.uint64)]))
    out, dropped = [], 0
    for doc in train:
        hits = np.isin(window_hashes(doc, width), v)
        if not hits.any():
            out.append(doc)
            continue
        data = doc.encode("utf-8", errors="surrogatepass")
        bad = np.zeros(len(data) + 1, dtype=np.int64)  # bytes covered by a shared window
        starts = np.flatnonzero(hits)
        np.add.at(bad, starts, 1)
        np.add.at(bad, starts + width, -1)
        covered = np.cumsum(bad)[: len(data)] > 0
        keep, pos = [], 0
        for para in data.split(b"\n\n"):
            end = pos + len(para)
            if covered[pos:end].any():
                dropped += 1
            else:
                keep.append(para)
            pos = end + 2
        text = b"\n\n".join(keep).decode("utf-8", errors="surrogatepass")
        if text.strip():
            out.append(text)
    return out, dropped


def dedup_paragraphs(docs: list[str], *, seen: set | None = None, min_bytes: int = 64) -> tuple[list[str], int]:
    """The documents with every repeat of a paragraph of ``min_bytes`` or more left out (the first
    occurrence stays; shorter ones such as a lone \"\"\" are code structure, not content), and how
    many went. Pass one ``seen`` set to several calls to deduplicate across them. Exact repeats
    are trained on several times per epoch and memorised first (Lee et al. 2022, "Deduplicating
    training data makes language models better"): pydoc's topics quote one another (a fifth of
    their text), the stdlib's codecs repeat one template."""
    seen = set() if seen is None else seen
    out, dropped = [], 0
    for doc in docs:
        keep = []
        for para in doc.split("\n\n"):
            body = para.strip().encode("utf-8", errors="surrogatepass")
            if len(body) >= min_bytes:
                digest = hashlib.blake2b(body, digest_size=16).digest()
                if digest in seen:
                    dropped += 1
                    continue
                seen.add(digest)
            keep.append(para)
        text = "\n\n".join(keep)
        if text.strip():
            out.append(text)
    return out, dropped


def split_key(own: list[str], extra: list[str], val: list[str], dedup: bool, repeat: int = 1) -> str:
    """The cache key of a training/held-out split: the tokenizer and token caches of one split
    (whoever builds them: training or ``adl data shard``) share it."""
    marks = (["\x00dedup\x00"] if dedup else []) + ([f"\x00repeat {repeat}\x00"] if repeat != 1 else [])
    return corpus_key([*own, "\x00extra:\x00", *extra, "\x00held out:\x00", *val] + marks)


def train_side(own: list[str], extra: list[str], val: list[str], dedup: bool, repeat: int = 1) -> tuple[list[str], int]:
    """(the documents training reads, how many of them are the corpus's own): every paragraph
    that quotes the held-out text left out (``drop_overlaps``), then, with ``dedup``, every
    repeated paragraph (``dedup_paragraphs``, across the corpus and its extras); the corpus's own
    documents come ``repeat`` times (a mixture weight: the kind of text validated on, read more
    often than the extras)."""
    own, _ = drop_overlaps(own, val)
    extra, _ = drop_overlaps(extra, val)
    if dedup:
        seen: set = set()
        own, _ = dedup_paragraphs(own, seen=seen)
        extra, _ = dedup_paragraphs(extra, seen=seen)
    if not own + extra:
        raise AdlError("no training text is left once the paragraphs that quote the held-out split are left out: the corpus repeats "
                       "its held-out text; give it more documents, or a smaller data.val_fraction")
    return own * repeat + extra, len(own) * repeat


def corpus_key(docs: list[str]) -> str:
    """A short content hash: caches keyed by it stay valid exactly as long as the text does."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", errors="surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]
