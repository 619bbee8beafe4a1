"""Built-in corpora and user text, offline.

- ``pydoc``: the English reference text that ships with every Python install
  (``pydoc_data.topics``, about 465k characters: the language reference's topics).
- ``stdlib``: the standard library's own ``.py`` source files (site-packages excluded).
- anything else: a text file, a folder (its text files, recursively) or a glob.
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from pathlib import Path

from adl_cli.errors import AdlError

BUILTIN = ("pydoc", "stdlib")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".tex", ".html", ".xml", ""}


def _pydoc_docs() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics)]


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not (skip & set(p.relative_to(root).parts)))


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
    docs = _read(corpus_files(spec))
    if not any(d.strip() for d in docs):
        raise AdlError(f"corpus {spec} is empty")
    return docs


def corpus_key(docs: list[str]) -> str:
    """A short content hash: caches keyed by it stay valid exactly as long as the text does."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", errors="surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]
