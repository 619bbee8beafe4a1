"""adl sft on two processes (DDP through accelerate, gloo) trains what one process trains with the
same global batch: packed rows sliced per rank, micro-batches weighed by the targets they train."""

from __future__ import annotations

import json

import pytest

from _dist_workers import launch, losses, sft_scenario

pytestmark = pytest.mark.dist

RECIPE = """
name = "sft-dist"
samples = 1

[init]
from = "{base}"

[data]
tasks = ["addition", "sort"]
train_examples = 48
val_examples = 4
eval_examples = 4
eval_examples_during = 0
operand_digits = 2

[train]
steps = 4
batch_size = 2
grad_accum = {accum}
precision = "fp32"
lr = 1e-3
min_lr = 1e-4
warmup = 1
weight_decay = 0.0
eval_every = 0
checkpoint_every = 0
log_every = 1
seed = 5
"""


def test_two_processes_train_what_one_trains_with_the_same_global_batch(bpe_run, tmp_path, monkeypatch):
    from adl_cli.methods.sft import load_sft_recipe, run_sft

    for accum in (1, 2):
        (tmp_path / f"r{accum}.toml").write_text(RECIPE.format(base=bpe_run.as_posix(), accum=accum), encoding="utf-8")
    launch(sft_scenario, (2, 29641, str(tmp_path / "r1.toml"), str(tmp_path / "ddp")))
    monkeypatch.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)
    run_sft(load_sft_recipe(tmp_path / "r2.toml"), tmp_path / "single", progress=False, log=lambda *a, **k: None, evaluate_base=False)
    two, one = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), (step, two[step], one[step])
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tasks"]["addition"]["sft"]["n"] == 4
    assert summary["tokens_seen"] == json.loads((tmp_path / "single" / "summary.json").read_text())["tokens_seen"]
