"""Shared test set-up: a private adl cache per test session and small thread pools.

The tests use tiny shapes, where torch's thread pool costs more than it gives (and on a
shared 2-core machine contention makes it far worse), so they run single-threaded.
"""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _adl_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("adl-cache")
    old = os.environ.get("ADL_CACHE")
    os.environ["ADL_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ADL_CACHE", None)
    else:
        os.environ["ADL_CACHE"] = old


@pytest.fixture
def small_corpus(tmp_path):
    """A few kilobytes of real English text (the first pydoc topics) as a file."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)[:12])
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path
