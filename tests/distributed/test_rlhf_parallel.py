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


RL = """
name = "rl-dist"
[init]
from = "{base}"
[data]
tasks = ["addition"]
operand_digits = 2
eval_examples = 4
[{method}]
{group} = 2
max_new_tokens = 4
eval_prompts = 2
{extra}
[train]
steps = 3
batch_size = 2
precision = "fp32"
lr = 1e-3
min_lr = 1e-4
warmup = 1
eval_every = 0
checkpoint_every = 2
log_every = 1
seed = 5
"""


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_ppo_and_grpo_run_on_two_processes(chat_run, tmp_path, method):
    """Each rank samples answers to its own problems; the step's completions count both ranks; the
    adaptive KL coefficient moves (on the KL averaged over the ranks)."""
    import torch

    from _dist_workers import rl_scenario
    from adl_cli.runs import load_run

    extra = "kl_target = 0.5\nkl_horizon = 50" if method == "ppo" else ""
    recipe = tmp_path / "r.toml"
    recipe.write_text(RL.format(base=chat_run.as_posix(), method=method, group="samples" if method == "ppo" else "group", extra=extra),
                      encoding="utf-8")
    launch(rl_scenario, (2, 29651 if method == "ppo" else 29652, method, str(recipe), str(tmp_path / "run")))
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 3 and s["completions"] == 3 * 2 * 2 * 2
    tuned, base = load_run(tmp_path / "run").model.state_dict(), load_run(chat_run).model.state_dict()
    assert any(not torch.equal(v, tuned[k]) for k, v in base.items())
    if method == "ppo":
        rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        betas = [r["kl_coef"] for r in rows if "kl_coef" in r]
        assert len(betas) == 3 and betas[0] == pytest.approx(0.05) and betas[1] != betas[0]
