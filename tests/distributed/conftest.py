"""Fixtures of the distributed tests: a tiny corpus and recipe (process bodies and the
launcher are in _dist_workers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

RECIPE = """
name = "dist"
sample_prompt = "The "
sample_tokens = 4

[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 16
vocab_multiple = 8

[data]
corpus = "{corpus}"
tokenizer = "bytes"
val_fraction = 0.1

[train]
steps = 6
batch_size = 4
global_batch_tokens = 128   # 4 x 16 x 2: grad_accum 2 on one process, 1 on two
precision = "fp32"          # the comparisons are exact up to reduction order
lr = 3e-3
min_lr = 3e-4
warmup = 2
eval_every = 0
eval_batches = 2
checkpoint_every = 3
keep_checkpoints = 3
log_every = 1
seed = 11
"""


@pytest.fixture(scope="package")
def dist_recipe(tmp_path_factory, small_corpus) -> Path:
    path = tmp_path_factory.mktemp("dist") / "dist.toml"
    path.write_text(RECIPE.format(corpus=small_corpus.as_posix()), encoding="utf-8")
    from adl_cli.data.tokens import load_tokens
    from adl_cli.methods.pretrain import load_pretrain_recipe

    load_tokens(load_pretrain_recipe(path).data)  # fill the token cache before the processes race for it
    return path
