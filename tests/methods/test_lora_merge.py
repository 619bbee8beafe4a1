"""Merging adapter runs into plain run folders: the same logits, a plain model, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from adl_cli.adapters.houlsby import BottleneckSection, add_bottlenecks
from adl_cli.adapters.houlsby import adapter_tensors as bottleneck_tensors
from adl_cli.adapters.lora import LoraSection, adapter_tensors, add_lora, load_adapter
from adl_cli.adapters.qlora import QloraSection, quantize
from adl_cli.data.tokenizer import Tokenizer
from adl_cli.errors import AdlError
from adl_cli.methods.lora import merge_run
from adl_cli.models.gpt import GPT, GPTConfig
from adl_cli.runs import ADAPTER, load_run, save_adapter_run, save_run

X = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=64, loss_chunk_rows=0)).eval()


def _with_adapter(tmp_path, qlora: bool):
    save_run(tmp_path / "base", _model(), Tokenizer("bytes"))
    section = LoraSection(r=4, targets=["q_proj", "v_proj", "c_fc"], dora=not qlora)
    model = _model()
    if qlora:
        model = quantize(model, QloraSection(compute="fp32"))
    model = add_lora(model, section)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    config = {**section.to_dict(), **({"qlora": QloraSection(compute="fp32").to_dict()} if qlora else {})}
    save_adapter_run(tmp_path / "adapter", tmp_path / "base", "lora", config, adapter_tensors(model))
    return model


def test_a_merged_run_computes_what_the_adapter_run_computes(tmp_path):
    trained = _with_adapter(tmp_path, qlora=False)
    adapter_run = load_run(tmp_path / "adapter")
    merge_run(tmp_path / "adapter", tmp_path / "merged")
    merged = load_run(tmp_path / "merged")
    with torch.no_grad():
        want = trained(X)[0]
        torch.testing.assert_close(adapter_run.model(X)[0], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged.model(X)[0], want, rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "merged" / ADAPTER).exists() and type(merged.model) is GPT
    assert not any("lora" in k for k in merged.model.state_dict())
    lineage = json.loads((tmp_path / "merged" / "lineage.json").read_text())["parents"]
    assert lineage[-1]["kind"] == "merged-adapter" and merged.tokenizer is not None


def test_a_merged_qlora_run_computes_on_the_nf4_base(tmp_path):
    """The merged weights are the NF4 values plus the update: the QLoRA model's logits (fp32
    compute), not the full-precision base's."""
    trained = _with_adapter(tmp_path, qlora=True)
    merge_run(tmp_path / "adapter", tmp_path / "merged")
    merged = load_run(tmp_path / "merged")
    full_precision = add_lora(_model(), LoraSection(r=4, targets=["q_proj", "v_proj", "c_fc"]))
    load_adapter(full_precision, adapter_tensors(trained))  # the same update on the full-precision base
    with torch.no_grad():
        want = trained(X)[0]
        torch.testing.assert_close(merged.model(X)[0], want, rtol=1e-4, atol=1e-4)
        assert not any(type(m).__name__ == "Linear4bit" for m in merged.model.modules())
        assert (full_precision(X)[0] - want).abs().max() > 1e-3  # NF4 rounding is visible: the check has teeth


def test_merge_refuses_what_it_cannot_fold_or_would_replace(tmp_path):
    _with_adapter(tmp_path, qlora=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(AdlError, match="not empty"):
        merge_run(tmp_path / "adapter", tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(AdlError, match="not an adapter run"):
        merge_run(tmp_path / "base", tmp_path / "m2")
    section = BottleneckSection(size=4)
    model = add_bottlenecks(_model(), section)
    save_adapter_run(tmp_path / "houlsby", tmp_path / "base", "adapter", section.to_dict(), bottleneck_tensors(model, section))
    with pytest.raises(AdlError, match="cannot be folded"):
        merge_run(tmp_path / "houlsby", tmp_path / "m3")
