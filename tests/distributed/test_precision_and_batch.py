"""One process: bf16/fp16 training steps, TF32 on CPU, train.global_batch_tokens and
train.distributed validation (no process group needed)."""

from __future__ import annotations

import math

import pytest
import torch

from adl_cli.engine.distributed import resolve_grad_accum
from adl_cli.engine.trainer import TrainConfig, Trainer
from adl_cli.errors import AdlError
from adl_cli.methods.pretrain import load_pretrain_recipe
from adl_cli.models.gpt import GPT, GPTConfig

VOCAB, BLOCK = 64, 16


def batch_fn(step, micro, rank, world):
    g = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
    x = torch.randint(0, VOCAB, (4, BLOCK + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def trainer(tmp_path, **kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32))
    cfg = TrainConfig(steps=4, batch_size=4, lr=3e-3, min_lr=3e-4, warmup=1, eval_every=0, checkpoint_every=0, log_every=1, **kw)
    return Trainer(model, cfg, run_dir=tmp_path, batch_fn=batch_fn, loss_fn=lambda m, b: m(*b)[1], units_per_batch=4 * BLOCK, progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_trains_a_few_steps_with_finite_falling_loss(tmp_path, precision):
    t = trainer(tmp_path, precision=precision, grad_accum=2)
    assert (t.scaler is not None) == (precision == "fp16")
    result = t.fit()
    losses = [row["loss"] for row in result.history]
    assert result.precision == precision and len(losses) == 4
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in t.raw_model.parameters())  # autocast: fp32 master weights


def test_tf32_is_a_noted_no_op_on_cpu(tmp_path):
    before = torch.get_float32_matmul_precision()
    t = trainer(tmp_path, tf32=True)
    assert t.tf32 == ("n/a on CPU" if t.device.type == "cpu" else "on")
    if t.device.type == "cpu":
        assert torch.get_float32_matmul_precision() == before


def test_global_batch_tokens_derives_grad_accum(tmp_path):
    assert resolve_grad_accum(0, 3, 8, 64, 1024) == 3  # off: grad_accum is per process
    assert resolve_grad_accum(524_288, 1, 8, 64, 1024) == 1  # the GPT-2 recipe on 8 GPUs
    assert resolve_grad_accum(524_288, 1, 1, 64, 1024) == 8  # the same recipe on 1 GPU
    assert resolve_grad_accum(524_288, 1, 2, 16, 1024) == 16
    t = trainer(tmp_path, global_batch_tokens=4 * BLOCK * 3)
    assert t.grad_accum == 3
    assert t.fit().units == 4 * 4 * BLOCK * 3


def test_global_batch_tokens_that_does_not_divide_is_a_clear_error(tmp_path):
    with pytest.raises(AdlError, match=r"train.global_batch_tokens=500,000 is not a multiple of world size 8 x train.batch_size 64 x 1024 tokens") as e:
        resolve_grad_accum(500_000, 1, 8, 64, 1024)
    assert "524,288" in str(e.value)  # a valid neighbour is suggested
    with pytest.raises(AdlError, match="global_batch_tokens"):
        trainer(tmp_path, global_batch_tokens=100)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.global_batch_tokens=-1", "train.global_batch_tokens must be >= 0"),
        ("train.distributed=fdsp", "train.distributed must be one of ddp, fsdp, got 'fdsp' \\(did you mean 'fsdp'\\?\\)"),
    ],
)
def test_recipe_validation_names_the_key(tiny_recipe, override, message):
    with pytest.raises(AdlError, match=message):
        load_pretrain_recipe(tiny_recipe, [override])


def test_one_process_ignores_the_strategy(tmp_path):
    t = trainer(tmp_path, distributed="fsdp")
    assert t.parallel == "none" and not t.sharded
    assert t.fit().parallel == "none"
