"""A tiny chat run (an SFT run of the BPE base, a few steps) that the preference tests start from."""

from __future__ import annotations

import pytest

SFT = """
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
    (root / "chat.toml").write_text(SFT.format(base=bpe_run.as_posix()), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)
        run_sft(load_sft_recipe(root / "chat.toml"), root / "run", progress=False, log=lambda *a, **k: None, evaluate_base=False)
    return root / "run"
