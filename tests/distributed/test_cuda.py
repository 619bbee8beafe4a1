"""GPU paths (skipped without CUDA): bf16 + TF32 + compile through the trainer, fp16 with
the grad scaler, SDPA's fused (flash) kernel. benchmarks/gpu_check.sh runs these."""

from __future__ import annotations

import math

import pytest
import torch

from adl_cli.engine.trainer import TrainConfig, Trainer
from adl_cli.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
VOCAB, BLOCK = 128, 64


def batch_fn(step, micro, rank, world):
    g = torch.Generator().manual_seed(100 * step + micro)
    x = torch.randint(0, VOCAB, (8, BLOCK + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def fit(tmp_path, **kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, n_embd=128))
    cfg = TrainConfig(steps=6, batch_size=8, lr=3e-3, min_lr=3e-4, warmup=1, eval_every=0, checkpoint_every=0, log_every=1, **kw)
    t = Trainer(model, cfg, run_dir=tmp_path, batch_fn=batch_fn, loss_fn=lambda m, b: m(*b)[1], units_per_batch=8 * BLOCK, progress=False)
    return t, t.fit()


def test_bf16_tf32_compile_on_cuda(tmp_path):
    before = torch.get_float32_matmul_precision()
    try:
        t, res = fit(tmp_path, precision="bf16", tf32=True, compile=True)
        assert t.device.type == "cuda" and res.tf32 == "on" and torch.backends.cuda.matmul.allow_tf32
        assert res.compile_s is not None and res.compile_s > 0
        assert res.optimizer == "AdamW (fused)"
        losses = [r["loss"] for r in res.history]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cuda.matmul.allow_tf32 = False


def test_fp16_with_grad_scaler_on_cuda(tmp_path):
    t, res = fit(tmp_path, precision="fp16")
    assert t.scaler is not None and res.precision == "fp16"
    assert all(math.isfinite(r["loss"]) for r in res.history)


def test_sdpa_takes_a_fused_kernel_in_bf16():
    from adl_cli.nn.attention.sdpa import sdpa_backend

    q = torch.randn(2, 12, 1024, 64, device="cuda", dtype=torch.bfloat16)
    assert sdpa_backend(q, q, q, causal=True) in ("flash", "cudnn")
