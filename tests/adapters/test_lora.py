"""LoRA and DoRA through peft on adl's GPT: the base at initialisation, merged equals unmerged,
only adapter tensors learn, adapter runs reload, and bad choices name what is wrong."""

from __future__ import annotations

import pytest
import torch


from adl_cli.adapters.lora import LoraSection, adapter_tensors, add_lora, merge, resolve_targets, trainable_parameters  # noqa: E402
from adl_cli.errors import AdlError  # noqa: E402
from adl_cli.models.gpt import GPT, GPTConfig  # noqa: E402
from adl_cli.runs import load_run, save_adapter_run, save_run  # noqa: E402


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, loss_chunk_rows=0)).eval()


X = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))


def _trained(section: LoraSection, steps: int = 5):
    """A LoRA model after a few Adam steps on random next-token targets (B no longer zero)."""
    model = add_lora(_model(), section).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(X, torch.roll(X, -1, 1))[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("dora", [False, True])
def test_at_initialisation_the_model_is_its_base(dora):
    base = _model()
    with torch.no_grad():
        want = base(X)[0]
        got = add_lora(_model(), LoraSection(r=4, targets=["q_proj", "v_proj", "c_fc"], dora=dora))(X)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_merged_equals_unmerged(dora, rslora):
    model = _trained(LoraSection(r=4, alpha=8, targets=["q_proj", "v_proj", "mlp.c_proj"], dora=dora, rslora=rslora))
    with torch.no_grad():
        before = model(X)[0]
        merged = merge(model)
        after = merged(X)[0]
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert set(merged.state_dict()) == set(_model().state_dict())  # a plain model again
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_only_adapter_tensors_get_gradients_and_change():
    base = _model()
    model = add_lora(_model(), LoraSection(r=2, targets=["q_proj", "v_proj"]))
    trainable, total = trainable_parameters(model)
    assert trainable == 2 * 2 * (2 * 32 + 2 * 32)  # 2 layers x (q, v) x r (in + out)
    model = _trained(LoraSection(r=2, targets=["q_proj", "v_proj"]))
    frozen = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    for name, p in base.named_parameters():
        assert torch.equal(frozen[name], p), name
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and all(p.abs().sum() > 0 for p in b)  # B left zero: the adapter learned


def test_targets_resolve_by_suffix_and_unknown_names_are_errors():
    model = _model()
    assert resolve_targets(model, ["q_proj"]) == ["transformer.h.0.attn.q_proj", "transformer.h.1.attn.q_proj"]
    assert resolve_targets(model, ["mlp.c_proj"]) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    with pytest.raises(AdlError, match="no linear layer named 'c_attn'.*q_proj"):
        add_lora(model, LoraSection(targets=["c_attn"]))
    with pytest.raises(AdlError, match="lora.r"):
        add_lora(_model(), LoraSection(r=0))


def test_an_adapter_run_reloads_with_the_same_logits(tmp_path):
    from adl_cli.data.tokenizer import Tokenizer

    base = _model()
    save_run(tmp_path / "base", base, Tokenizer("bytes"))
    section = LoraSection(r=4, targets=["q_proj", "v_proj"], dora=True)
    model = _trained(section)
    save_adapter_run(tmp_path / "lora", tmp_path / "base", "lora", section.to_dict(), adapter_tensors(model))
    run = load_run(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(run.model(X)[0], model(X)[0], rtol=0, atol=0)
    assert run.lineage[0]["kind"] == "adapter-base"


@pytest.mark.parametrize("targets, dora, rslora", [
    (["q_proj", "v_proj"], False, False),
    (["q_proj", "k_proj", "v_proj", "attn.c_proj", "c_fc", "mlp.c_proj"], False, True),
    (["v_proj", "mlp.c_proj"], True, False),
])
def test_a_saved_adapter_loads_in_peft_on_the_exported_model_with_equal_logits(tmp_path, targets, dora, rslora):
    """q/k/v adapters become one block-structured c_attn adapter of rank (targets) x r."""
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    from adl_cli.data.tokenizer import Tokenizer
    from adl_cli.methods.interop import export_hf

    base = _model()
    save_run(tmp_path / "base", base, Tokenizer("bytes"))
    section = LoraSection(r=3, alpha=6, targets=targets, dora=dora, rslora=rslora)
    model = _trained(section)
    save_adapter_run(tmp_path / "lora", tmp_path / "base", "lora", section.to_dict(), adapter_tensors(model))
    export_hf(tmp_path / "lora", tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "hf" / "adapter").eval()
    with torch.no_grad():
        want = model(X)[0]
        got = peft_model(input_ids=X).logits
        moved = (base(X)[0] - want).abs().max()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert moved > 1e-3  # the adapter changes the logits: the comparison is not vacuous
