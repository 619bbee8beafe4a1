"""DDP and FSDP on 2 CPU processes (gloo) against one process with the same global batch.

The recipe fixes train.global_batch_tokens, so the same recipe runs with grad_accum 2 on
one process and grad_accum 1 on two: the same global batch every step (WindowBatches
slices it by micro-step and rank), so the loss curves must agree to rounding."""

from __future__ import annotations

import json
import math
import shutil

import _dist_workers as workers
import pytest
import torch
from _dist_workers import launch, losses

from adl_cli.engine import checkpoint as ckpt
from adl_cli.methods.pretrain import load_pretrain_recipe, run_pretrain

pytestmark = pytest.mark.dist
RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _no_peak_measurement():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("adl_cli.engine.trainer.matmul_peak", lambda *args, **kwargs: 1e12)
        yield


@pytest.fixture(scope="module")
def single(dist_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    outcome = run_pretrain(load_pretrain_recipe(dist_recipe), out, progress=False, log=lambda *a, **k: None)
    assert outcome.result.grad_accum == 2 and outcome.result.world_size == 1
    return out


@pytest.fixture(scope="module")
def launched(dist_recipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("launched")
    launch(workers.scenario, (2, 29631, str(dist_recipe), str(root)))
    return root


@pytest.fixture(scope="module")
def ddp(launched):
    return launched / "ddp"


@pytest.fixture(scope="module")
def fsdp(launched):
    return launched / "fsdp"


def assert_close_curves(a: dict[int, float], b: dict[int, float], steps) -> None:
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=RTOL), (s, a[s], b[s])


def resume_on_one_process(run, tmp_path, step=3):
    part = tmp_path / "resumed"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / f"step-{step}", part / "checkpoints" / f"step-{step}")
    shutil.copy(run / "config.json", part / "config.json")
    rec = load_pretrain_recipe(run / "recipe.toml")
    outcome = run_pretrain(rec, part, resume=True, progress=False, log=lambda *a, **k: None)
    assert outcome.result.world_size == 1 and outcome.result.grad_accum == 2
    return part


def test_ddp_ranks_hold_identical_weights_after_every_step(ddp):
    d0 = json.loads((ddp / "digests.0.json").read_text())
    d1 = json.loads((ddp / "digests.1.json").read_text())
    assert len(d0) == 6 and d0 == d1  # bit-identical replicas
    assert len(set(d0)) == 6  # and they did move


def test_ddp_loss_curve_equals_one_process_with_the_same_global_batch(ddp, single):
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == "ddp" and summary["grad_accum"] == 1
    assert summary["global_batch_tokens"] == 128
    assert_close_curves(losses(ddp), losses(single), range(1, 7))
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir() if p.is_dir()) == ["step-3", "step-6"]


def test_ddp_checkpoint_resumes_on_one_process(ddp, single, tmp_path):
    part = resume_on_one_process(ddp, tmp_path)
    assert sorted(losses(part)) == [4, 5, 6]
    assert_close_curves(losses(part), losses(single), range(4, 7))


def test_fsdp_loss_curve_equals_one_process_and_its_checkpoints_are_full(fsdp, single):
    summary = json.loads((fsdp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == "fsdp"
    assert_close_curves(losses(fsdp), losses(single), range(1, 7))
    a = ckpt.read_safetensors(fsdp / "checkpoints" / "step-6" / "model.safetensors")
    b = ckpt.read_safetensors(single / "checkpoints" / "step-6" / "model.safetensors")
    assert a.keys() == b.keys()  # the same layout as an unsharded run: full tensors, tied weight once
    # AdamW moves an element by at most about lr per step, so 6 steps move it at most ~6 lr. Reduction
    # order (reduce-scatter vs one process) changes gradients at fp32 rounding level, which Adam's
    # normalisation m / sqrt(v) can amplify for near-zero gradients up to a large part of a step; a wrong
    # gather or averaging would be off by a whole step (~lr). So allow 1e-3 of the total movement.
    movement = 6 * 3e-3
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-3 * movement)
    oa = ckpt.read_safetensors(fsdp / "checkpoints" / "step-6" / "optimizer.safetensors")
    ob = ckpt.read_safetensors(single / "checkpoints" / "step-6" / "optimizer.safetensors")
    assert {k for k in oa if k.startswith("state.")} == {k for k in ob if k.startswith("state.")}
    final = ckpt.read_safetensors(fsdp / "model.safetensors")
    assert final.keys() == a.keys()


def test_fsdp_checkpoint_resumes_under_fsdp(fsdp, single):
    assert_close_curves(losses(fsdp.with_name("fsdp-resumed")), losses(single), range(4, 7))


def test_fsdp_checkpoint_resumes_on_one_process(fsdp, single, tmp_path):
    part = resume_on_one_process(fsdp, tmp_path)
    assert_close_curves(losses(part), losses(single), range(4, 7))


def test_fsdp_trains_in_fp16_with_the_sharded_grad_scaler(launched):
    summary = json.loads((launched / "fsdp-fp16" / "summary.json").read_text())
    assert summary["precision"] == "fp16" and summary["parallel"] == "fsdp"
    assert "foreach" in summary["optimizer"]  # fused AdamW cannot take the sharded scaler's found_inf
    assert all(math.isfinite(x) for x in losses(launched / "fsdp-fp16").values())


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(launched):
    outcomes = [(launched / f"ddp-ctrl-c.{r}.txt").read_text() for r in (0, 1)]
    assert all(o.startswith("interrupted: stopped by Ctrl-C after step 2") for o in outcomes), outcomes
    assert (launched / "ddp-ctrl-c" / "checkpoints" / "step-2" / "state.json").exists()
    assert sorted(losses(launched / "ddp-ctrl-c")) == [1, 2]


def test_a_masked_loss_over_two_ranks_is_normalised_by_the_global_token_count(launched, tmp_path):
    """Two ranks training 3 and 29 tokens of the same global batch take the same steps, log the same
    loss and metric, and count the same 32 tokens a step as one process accumulating both micro-batches."""
    from safetensors.torch import load_file

    t, one = workers.masked_run(tmp_path / "one", grad_accum=2)
    two = json.loads((launched / "masked" / "result.json").read_text())
    assert one.units == two["units"] == 3 * sum(workers.MASKED_KEEP)
    from adl_cli.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)  # the first step's loss is the token-weighted mean, not the mean of the two micro-batch means
    m = GPT(GPTConfig(vocab_size=61, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        total = sum(torch.nn.functional.cross_entropy(m(x)[0].flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
                    for x, y in (workers.masked_batch(0, k, 0, 1) for k in range(2)))
    assert two["history"][0]["loss"] == pytest.approx(float(total) / sum(workers.MASKED_KEEP), rel=RTOL)
    for a, b in zip(one.history, two["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL) and a["twice"] == pytest.approx(b["twice"], rel=RTOL)
        assert a["twice"] == pytest.approx(2 * a["loss"], rel=1e-6)
    weights = load_file(launched / "masked" / "weights.safetensors")
    mine = {k: v for k, v in t.raw_model.state_dict().items() if k != "lm_head.weight"}
    for k, v in weights.items():  # fp32 sums of two terms in either order: equal to rounding
        torch.testing.assert_close(mine[k], v, rtol=1e-5, atol=1e-6)
