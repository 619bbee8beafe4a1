"""QLoRA: NF4 round trip within its bound, the 4-bit forward equals a full-precision model holding
the NF4 weights (so QLoRA is LoRA on those weights), dequantize + merge keeps the function, and a
missing bitsandbytes is one clear error."""

from __future__ import annotations

import builtins

import pytest
import torch

import bitsandbytes as bnb  # noqa: E402

from adl_cli.adapters.lora import LoraSection, add_lora, merge  # noqa: E402
from adl_cli.adapters.qlora import NF4_HALF_GAP, QloraSection, dequantize, quantize, weight_bytes  # noqa: E402
from adl_cli.errors import AdlError  # noqa: E402
from adl_cli.models.gpt import GPT, GPTConfig  # noqa: E402

X = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=64, loss_chunk_rows=0)).eval()


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_error_is_within_half_the_widest_code_gap(double_quant):
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = torch.randn(256, 128) * 0.02
    q, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    back = dequantize_4bit(q, state)
    blocks, err = w.reshape(-1, 64), (back - w).reshape(-1, 64)
    rel = err.abs().amax(1) / blocks.abs().amax(1)
    # |code * absmax' - w| <= half gap * absmax + |absmax' - absmax|: double quantization rounds the
    # absmaxes to 8 bits relative to the largest of their 256-block (here all of one scale: ~2/127)
    bound = NF4_HALF_GAP + (2 / 127 if double_quant else 0) + 1e-6
    assert rel.max() <= bound, (rel.max(), bound)
    # NF4's point: on normally distributed weights it beats uniform 4-bit levels with the same blocks
    scale = blocks.abs().amax(1, keepdim=True)
    uniform = (blocks / scale * 7).round() / 7 * scale
    assert ((back.reshape(-1, 64) - blocks) ** 2).mean() < ((uniform - blocks) ** 2).mean()


def test_qlora_is_lora_on_the_nf4_weights_and_merges():
    section = LoraSection(r=4, targets=["q_proj", "v_proj", "c_fc"])
    qmodel = add_lora(quantize(_model(), QloraSection(compute="fp32")), section)
    with torch.no_grad():  # give B values so that the adapters matter
        for n, p in qmodel.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    trainable = [n for n, p in qmodel.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        q_out = qmodel(X)[0]
    reference = dequantize(qmodel)  # the same model with the NF4 weights in fp32 (in place)
    with torch.no_grad():
        torch.testing.assert_close(reference(X)[0], q_out, rtol=1e-5, atol=1e-5)
        merged = merge(reference)
        torch.testing.assert_close(merged(X)[0], q_out, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())


def test_the_quantized_base_is_close_and_four_times_smaller():
    base = _model()
    q = quantize(_model(), QloraSection(compute="fp32", double_quant=True))
    with torch.no_grad():
        a, b = base(X)[0], q(X)[0]
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    block = lambda m: sum(t.numel() * t.element_size() for n, t in list(m.named_parameters()) + list(m.named_buffers()) if ".h." in n)  # noqa: E731
    assert block(q) < 0.2 * block(base)  # 4 bits and a few statistics against 32 bits
    assert weight_bytes(q) < weight_bytes(base)


def test_qlora_without_bitsandbytes_is_one_clear_error(monkeypatch):
    real = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(AdlError, match="needs bitsandbytes"):
        quantize(_model(), QloraSection())


def test_evaluation_and_training_compute_alike_and_the_mode_is_kept():
    """bitsandbytes would repack a CPU weight for its AVX512-BF16 kernel at an eval forward without
    grad (another layout, other numerics); adl keeps one layout: an eval forward, then training
    mode, gives what training mode gave before, and dequantize still reads the NF4 weights."""
    model = quantize(_model().train(), QloraSection(compute="fp32"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.training for m in layers)
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    before = dequantize(quantize(_model(), QloraSection(compute="fp32"))).state_dict()
    with torch.no_grad():
        train_logits = model(x)[0]
        model.eval()
        eval_logits = model(x)[0]
    torch.testing.assert_close(eval_logits, train_logits, rtol=0, atol=0)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    after = dequantize(model).state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
