"""Run folders: any family saves and loads through runs.py; old layouts load; init.from; adapters."""

from __future__ import annotations

import json
import pytest
import torch
from torch import nn

from adl_cli.engine.checkpoint import model_tensors, save_safetensors
from adl_cli.errors import AdlError
from adl_cli.models import build_model
from adl_cli.models.gpt import GPT, GPTConfig, fuse_qkv
from adl_cli.runs import ADAPTERS, load_run, read_config, save_adapter_run, save_run
from tiny_family import TinyMLP, TinyMLPConfig, register_tiny_family


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16))


def test_two_families_save_and_load(tmp_path):
    register_tiny_family()
    torch.manual_seed(0)
    mlp = build_model(TinyMLPConfig(width=5))
    save_run(tmp_path / "mlp", mlp)
    g = gpt()
    save_run(tmp_path / "gpt", g)
    x, idx = torch.randn(2, 4), torch.randint(0, 40, (2, 8))
    run = load_run(tmp_path / "mlp")
    assert isinstance(run.model, TinyMLP) and run.config == TinyMLPConfig(width=5) and run.tokenizer is None
    assert torch.equal(run.model(x), mlp(x))
    assert json.loads((tmp_path / "mlp" / "config.json").read_text())["family"] == "tiny-mlp"
    back = load_run(tmp_path / "gpt").model
    with torch.no_grad():
        assert torch.equal(back(idx)[0], g.eval()(idx)[0])


def test_unknown_family_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"family": "vitt"}))
    with pytest.raises(AdlError, match="unknown model family 'vitt'"):
        read_config(tmp_path)


def test_a_run_folder_from_before_families_and_split_qkv_loads(tmp_path):
    """config.json without 'family' and weights with GPT-2's fused attn.c_attn: the same model."""
    g = gpt()
    cfg = g.config.to_dict()
    del cfg["family"], cfg["vocab_multiple"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old = fuse_qkv(model_tensors(g))
    assert "transformer.h.0.attn.c_attn.weight" in old and not any("q_proj" in k for k in old)
    save_safetensors(old, tmp_path / "model.safetensors")
    back = load_run(tmp_path).model
    idx = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], g.eval()(idx)[0])


def test_q_and_v_alone_can_be_targeted_by_name():
    """LoRA's default targets (q and v, Hu et al. 2021) through peft, by module name."""
    peft = pytest.importorskip("peft")
    g = gpt()
    names = {n.rsplit(".", 1)[-1] for n, m in g.named_modules() if isinstance(m, nn.Linear)}
    assert {"q_proj", "k_proj", "v_proj"} <= names
    model = peft.get_peft_model(g, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".q_proj." in n or ".v_proj." in n for n in trainable)
    assert sum(".q_proj.lora_A" in n for n in trainable) == 2 and not any("k_proj" in n for n in trainable)


def test_init_from_loads_weights_and_refuses_another_shape(tmp_path):
    g = gpt()
    save_run(tmp_path / "base", g)
    from adl_cli.runs import init_from

    model, run = init_from(tmp_path / "base", g.config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), g.state_dict().values()))
    wider = GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=32)
    with pytest.raises(AdlError, match=r"init.from .*n_embd 16 \(run\) vs 32 \(recipe\)"):
        init_from(tmp_path / "base", wider)


def test_an_adapter_run_loads_its_base_and_applies_itself(tmp_path):
    """An adapter run holds only its tensors and a reference to its base run (here a toy kind that
    adds a vector to the final LayerNorm's bias; the LoRA issue registers the real kinds)."""
    if "bias-shift" not in ADAPTERS:
        @ADAPTERS.register("bias-shift")
        def apply(model, config, tensors):
            with torch.no_grad():
                model.transformer.ln_f.bias += tensors["shift"] * config["scale"]
            return model

    g = gpt()
    save_run(tmp_path / "base", g)
    shift = torch.randn(16)
    save_adapter_run(tmp_path / "adapter", tmp_path / "base", "bias-shift", {"scale": 2.0}, {"shift": shift})
    assert json.loads((tmp_path / "adapter" / "adapter.json").read_text())["base"] == "../base"  # relative: they move together
    run = load_run(tmp_path / "adapter")
    assert torch.allclose(run.model.transformer.ln_f.bias, g.transformer.ln_f.bias + 2 * shift)
    assert run.lineage[0]["kind"] == "adapter-base"
    (tmp_path / "moved").mkdir()
    (tmp_path / "adapter").rename(tmp_path / "moved" / "adapter")
    with pytest.raises(AdlError, match="base run .* is not there"):
        load_run(tmp_path / "moved" / "adapter")
