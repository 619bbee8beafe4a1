"""Atomic file writes: write under a temporary name in the same folder, fsync, rename.

A crash at any point leaves either the old file or the new one, never a torn one. Every
file adl writes that a later run reads (checkpoints, token caches, shards, tokenizers,
metrics rewrites) goes through here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0o666 less the umask (mkstemp gives 0o600)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (POSIX needs the folder's entry flushed too)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A fresh folder beside its final place, with the umask's mode (mkdtemp gives 0o700)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, dir_mode())
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str | Iterable[bytes]) -> None:
    """Write bytes, text (UTF-8) or an iterable of byte chunks to ``path`` atomically."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if isinstance(data, bytes):
        data = (data,)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for chunk in data:
            f.write(chunk)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a file's bytes to ``dst`` atomically (the umask's mode, not the source's)."""
    import shutil

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def cache_dir() -> Path:
    """adl's cache (tokenized corpora, trained tokenizers): $ADL_CACHE or ~/.cache/adl."""
    root = os.environ.get("ADL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "adl")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
