"""Houlsby bottleneck adapters: near identity at initialisation, 2md + m + d parameters each,
only adapters (and norms) learn, adapter runs reload."""

from __future__ import annotations

import pytest
import torch

from adl_cli.adapters.houlsby import BottleneckSection, add_bottlenecks, adapter_tensors
from adl_cli.errors import AdlError
from adl_cli.models.gpt import GPT, GPTConfig
from adl_cli.runs import load_run, save_adapter_run, save_run

X = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, loss_chunk_rows=0)).eval()


def test_near_identity_at_initialisation_with_the_papers_parameter_count():
    base = _model()
    model = add_bottlenecks(_model(), BottleneckSection(size=8, init_std=1e-3, train_norms=False))
    d, m = 32, 8
    assert len(model.bottlenecks) == 4  # 2 layers x (after attention, after the MLP)
    for adapter in model.bottlenecks.values():
        assert sum(p.numel() for p in adapter.parameters()) == 2 * m * d + m + d
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 4 * (2 * m * d + m + d)
    with torch.no_grad():
        want, got = base(X)[0], model(X)[0]
    assert (got - want).abs().max() < 1e-3 * want.abs().max()  # near the base, not equal: the weights are small, not zero
    assert (got - want).abs().max() > 0


def test_only_adapters_and_norms_learn():
    base = _model()
    model = add_bottlenecks(_model(), BottleneckSection(size=4, train_norms=True)).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(X, torch.roll(X, -1, 1))[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in base.named_parameters():
        now = dict(model.named_parameters())[name]
        assert torch.equal(now, p) != (".ln_" in f".{name}" or name.startswith("transformer.ln_f")), name


def test_an_adapter_run_reloads_and_bad_sizes_are_refused(tmp_path):
    from adl_cli.data.tokenizer import Tokenizer

    save_run(tmp_path / "base", _model(), Tokenizer("bytes"))
    section = BottleneckSection(size=4, places=["mlp"])
    model = add_bottlenecks(_model(), section)
    with torch.no_grad():
        for p in model.bottlenecks.parameters():
            p.normal_()
    save_adapter_run(tmp_path / "ad", tmp_path / "base", "adapter", section.to_dict(), adapter_tensors(model, section))
    run = load_run(tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(run.model(X)[0], model(X)[0], rtol=0, atol=0)
    with pytest.raises(AdlError, match="adapter.size"):
        add_bottlenecks(_model(), BottleneckSection(size=0))
    with pytest.raises(AdlError, match="adapter.places"):
        add_bottlenecks(_model(), BottleneckSection(places=["ffn"]))
