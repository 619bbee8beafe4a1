"""Peak tensor memory of a training step (engine/memory.py) against what the step must hold,
and 8-bit AdamW's smaller state (bitsandbytes) through the optimizer registry."""

from __future__ import annotations

import types

import torch
from torch import nn

from adl_cli.engine.memory import peak_bytes, step_memory, tensor_bytes
from adl_cli.engine.optim import make_optimizer

CFG = types.SimpleNamespace(lr=1e-2, beta1=0.9, beta2=0.95, fused_adamw=False)


def test_peak_bytes_sees_a_known_allocation_and_its_release():
    def fn():
        a = torch.empty(1000, dtype=torch.float32)  # 4,000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4,000 more while a lives
        del a, b
        torch.empty(100)

    assert peak_bytes(fn, torch.device("cpu")) == 8000


def _step_bytes(optimizer: str) -> tuple[dict, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256, bias=False), nn.Linear(256, 256, bias=False))
    n = sum(p.numel() for p in model.parameters())
    opt, _ = make_optimizer(optimizer, [{"params": list(model.parameters()), "weight_decay": 0.0}], CFG, torch.device("cpu"))
    x = torch.randn(4, 256)

    def step():
        model(x).square().mean().backward()
        opt.step()

    return step_memory(model, step, torch.device("cpu")), n


def test_a_step_holds_gradients_and_adam_moments():
    mem, n = _step_bytes("adamw")
    assert mem["model"] == 4 * n
    assert mem["step"] >= 4 * n + 2 * 4 * n  # fp32 gradients and two fp32 moments per parameter
    assert mem["peak"] == mem["model"] + mem["step"]


def test_8bit_adamw_keeps_a_quarter_of_the_state_and_learns():
    full, n = _step_bytes("adamw")
    small, _ = _step_bytes("adamw8bit")
    # the moments: 8 bytes per parameter in fp32, 2 in 8 bits (+ block scales); gradients alike
    assert full["step"] - small["step"] >= 0.7 * 6 * n
    torch.manual_seed(0)
    model = nn.Linear(128, 128)
    target = torch.randn(128, 128)
    opt, desc = make_optimizer("adamw8bit", [{"params": list(model.parameters()), "weight_decay": 0.0}], CFG, torch.device("cpu"))
    x = torch.randn(64, 128)
    first = None
    for _ in range(30):
        loss = (model(x) - x @ target).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first and "8-bit" in desc
    assert any(v.dtype == torch.uint8 for v in opt.state[model.weight].values() if torch.is_tensor(v))


def test_tensor_bytes_counts_a_tied_table_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert tensor_bytes(nn.ModuleList([emb, head])) == 10 * 4 * 4
