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


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """About 40 kB of real English text (the first 12 pydoc topics) as a file; read-only."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)[:12])
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


TINY_RECIPE = """
name = "t"
sample_prompt = "The "
sample_tokens = 8

[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32
vocab_multiple = 8

[data]
corpus = "{corpus}"
tokenizer = "bytes"
val_fraction = 0.1

[train]
steps = 6
batch_size = 4
lr = 3e-3
min_lr = 3e-4
warmup = 2
eval_every = 3
eval_batches = 2
checkpoint_every = 3
log_every = 1
seed = 7
"""


@pytest.fixture(scope="session")
def write_tiny_recipe(small_corpus):
    """write_tiny_recipe(folder) -> the path of the tiny recipe written there (for fixtures wider than a test)."""

    def write(folder):
        path = folder / "tiny.toml"
        path.write_text(TINY_RECIPE.format(corpus=small_corpus.as_posix()), encoding="utf-8")
        return path

    return write


@pytest.fixture
def tiny_recipe(tmp_path, write_tiny_recipe):
    """A recipe for a 2-layer, 32-wide GPT on bytes of a small corpus: seconds to train."""
    return write_tiny_recipe(tmp_path)


ROPE_RECIPE = """
name = "ctx"
sample_prompt = "The "
sample_tokens = 2

[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 16
vocab_multiple = 8
position = "rope"

[data]
corpus = "{corpus}"
tokenizer = "bytes"
val_fraction = 0.1

[train]
steps = 8
batch_size = 4
lr = 3e-3
min_lr = 3e-4
warmup = 2
eval_every = 0
eval_batches = 1
checkpoint_every = 0
log_every = 4
seed = 3
"""


@pytest.fixture(scope="session")
def rope_run(tmp_path_factory, small_corpus):
    """A 1-layer RoPE GPT on bytes of the small corpus, trained 8 steps at 16 tokens
    (shared by the context-extension tests; they must not change its files)."""
    return _pretrained(tmp_path_factory, "ctx", ROPE_RECIPE, small_corpus)


def _pretrained(tmp_path_factory, name: str, recipe_text: str, corpus) -> object:
    """Train a recipe (its text, with {corpus}) into a fresh folder's run/, quietly."""
    from adl_cli.methods.pretrain import load_pretrain_recipe, run_pretrain

    root = tmp_path_factory.mktemp(name)
    recipe = root / f"{name}.toml"
    recipe.write_text(recipe_text.format(corpus=corpus.as_posix()), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)  # skip the roof measurement
        run_pretrain(load_pretrain_recipe(recipe), root / "run", progress=False, log=lambda *a: None)
    return root / "run"


BPE_RECIPE = """
name = "bpe-base"
sample_prompt = "The "
sample_tokens = 2

[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 64
vocab_multiple = 8

[data]
corpus = "{corpus}"
tokenizer = "bpe"
vocab_size = 320
val_fraction = 0.1

[train]
steps = 4
batch_size = 4
lr = 3e-3
min_lr = 3e-4
warmup = 1
eval_every = 0
eval_batches = 1
checkpoint_every = 0
log_every = 2
seed = 5
"""


@pytest.fixture(scope="session")
def bpe_run(tmp_path_factory, small_corpus):
    """A 2-layer GPT with a 320-id BPE (numbers in multi-digit pieces), block 64, trained 4 steps:
    the base of the SFT tests (they must not change its files)."""
    return _pretrained(tmp_path_factory, "bpe", BPE_RECIPE, small_corpus)


CHAT_SFT = """
name = "chat"
samples = 0

[init]
from = "{base}"

[data]
tasks = ["addition"]
train_examples = 64
val_examples = 4
eval_examples = 0
eval_examples_during = 0
operand_digits = 2

[train]
steps = 3
batch_size = 4
precision = "fp32"
lr = 1e-3
min_lr = 1e-4
warmup = 1
eval_every = 0
checkpoint_every = 0
log_every = 1
seed = 2
"""


@pytest.fixture(scope="session")
def chat_run(bpe_run, tmp_path_factory):
    """An SFT run (chat template, single digits) of the BPE base: read-only for the tests."""
    from adl_cli.methods.sft import load_sft_recipe, run_sft

    root = tmp_path_factory.mktemp("chat")
    (root / "chat.toml").write_text(CHAT_SFT.format(base=bpe_run.as_posix()), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)
        run_sft(load_sft_recipe(root / "chat.toml"), root / "run", progress=False, log=lambda *a, **k: None, evaluate_base=False)
    return root / "run"


@pytest.fixture
def run():
    """run(args, capsys) -> (exit code, stdout, stderr) of `adl ARGS` through the real entry point."""
    from adl_cli.cli import main

    def _run(args, capsys):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run
