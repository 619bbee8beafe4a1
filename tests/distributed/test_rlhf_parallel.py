"""adl rlhf dpo on two processes (DDP through accelerate, gloo) trains what one process trains
with the same global batch of pairs, each rank reading its slice."""

from __future__ import annotations

import json

import pytest

from _dist_workers import dpo_scenario, launch, losses

pytestmark = pytest.mark.dist

RECIPE = """
name = "dpo-dist"

[init]
from = "{base}"

[data]
sets = ["arithmetic", "format"]
train_pairs = 16
val_pairs = 4
operand_digits = 2

[dpo]
beta = 0.5
kl_prompts = 0
match_prompts = 0

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


def test_two_processes_train_what_one_trains_with_the_same_global_batch(chat_run, tmp_path, monkeypatch):
    from adl_cli.methods.rlhf.dpo import load_dpo_recipe, run_dpo

    for accum in (1, 2):
        (tmp_path / f"r{accum}.toml").write_text(RECIPE.format(base=chat_run.as_posix(), accum=accum), encoding="utf-8")
    launch(dpo_scenario, (2, 29643, str(tmp_path / "r1.toml"), str(tmp_path / "ddp")))
    monkeypatch.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)
    run_dpo(load_dpo_recipe(tmp_path / "r2.toml"), tmp_path / "single", progress=False, log=lambda *a, **k: None, evaluate_base=False)
    two, one = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), (step, two[step], one[step])
    s2, s1 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ddp", "single"))
    assert s2["world_size"] == 2 and s2["pairs_seen"] == s1["pairs_seen"] == 4 * 4
    assert s2["heldout"]["val_accuracy"] == pytest.approx(s1["heldout"]["val_accuracy"])
