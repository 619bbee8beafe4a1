"""QLoRA (Dettmers et al., 2023): LoRA on a base whose linear layers are frozen in 4-bit NF4.

bitsandbytes stores each block of 64 weights as 4-bit indices into the NF4 code (16 values at
the quantiles of a normal distribution, scaled to [-1, 1]) and the block's absmax; with double
quantization the absmaxes are themselves quantized to 8 bits (blocks of 256). A weight comes
back as code[index] * absmax, so its error is at most half the widest gap between NF4 values
(0.304 / 2 of the block's absmax, between -1 and -0.696) plus the absmax's own rounding. The matmul dequantizes on
the fly and runs in the compute dtype (bf16 where the CPU has fast bf16, else fp32). The
LoRA tensors stay in full precision (peft wraps the 4-bit layers as it wraps plain ones).

Only the blocks' linear layers are quantized; embeddings, norms and the head stay as they are.
``dequantize`` turns the 4-bit layers back into plain ones (the NF4 values in full precision),
after which ``lora.merge`` folds the adapters in as for LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from adl_cli.errors import AdlError

NF4_HALF_GAP = (1.0 - 0.6961928009986877) / 2  # the widest gap between NF4 code values (-1 to -0.696), halved


@dataclass
class QloraSection:
    """The recipe's ``[qlora]``."""

    double_quant: bool = True  # quantize the blocks' absmax values too (8 bits)
    compute: Literal["auto", "bf16", "fp32"] = "auto"  # the dtype the 4-bit matmuls compute in

    def to_dict(self) -> dict:
        return {"double_quant": self.double_quant, "compute": self.compute}


def bitsandbytes():
    from adl_cli.quantization.bnb import bitsandbytes as load

    return load('method "qlora" (its 4-bit NF4 base)')


def compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        from adl_cli.engine.runtime import fast_bf16

        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[choice]


def _block_linears(model: nn.Module):
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        raise AdlError("QLoRA quantizes a model's transformer blocks (model.transformer.h)")
    for i, block in enumerate(blocks):
        for name, module in list(block.named_modules()):
            yield block, name, module


def quantize(model: nn.Module, section: QloraSection) -> nn.Module:
    """Every nn.Linear of the blocks replaced by a frozen bitsandbytes Linear4bit (NF4)."""
    bnb = bitsandbytes()
    device = next(model.parameters()).device
    dtype = compute_dtype(section.compute, device)
    for block, name, module in list(_block_linears(model)):
        if type(module) is not nn.Linear:
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None, compute_dtype=dtype,
                              compress_statistics=section.double_quant, quant_type="nf4")
        q.load_state_dict(module.state_dict())
        q = q.to(device)  # bitsandbytes quantizes when the weight moves to its device
        # bitsandbytes repacks a CPU weight in place for its AVX512-BF16 kernel at the first forward in
        # eval mode without grad; the packed weight computes differently and is not what dequantize
        # reads. One layout in training, evaluation and merging: the plain NF4 path throughout.
        q.support_avx512bf16_for_cpu = False
        q.train(module.training)
        q.weight.requires_grad_(False)
        if q.bias is not None:
            q.bias.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, q)
    return model


def _plain(module) -> nn.Linear:
    """A bitsandbytes Linear4bit as an nn.Linear holding its NF4 weight in full precision."""
    from bitsandbytes.functional import dequantize_4bit

    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):  # repacked by an eval forward
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, module.weight.quant_state)
    w = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    with torch.no_grad():
        plain.weight.copy_(w)
        if module.bias is not None:
            plain.bias.copy_(module.bias.float())
    return plain.to(w.device)


def dequantize(model: nn.Module) -> nn.Module:
    """The 4-bit layers back to nn.Linear holding their NF4 weights in full precision."""
    bnb = bitsandbytes()
    for parent_module in list(model.modules()):
        for child_name, module in list(parent_module.named_children()):
            if isinstance(module, bnb.nn.Linear4bit):
                setattr(parent_module, child_name, _plain(module))
    return model


def merge_quantized(model: nn.Module) -> nn.Module:
    """Each LoRA layer over a 4-bit base folded into a plain nn.Linear: the NF4 weight in full
    precision plus peft's update (``get_delta_weight``), the base never re-quantized; the 4-bit
    layers without an adapter become plain ones too."""
    bnb = bitsandbytes()
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if not (isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), bnb.nn.Linear4bit)):
            continue
        if any(module.use_dora.get(a, False) for a in module.active_adapters):
            raise AdlError(f"{name}: merging DoRA over a 4-bit base is not supported; load the adapter run as it is")
        plain = _plain(module.get_base_layer())
        with torch.no_grad():
            for a in module.active_adapters:
                plain.weight += module.get_delta_weight(a).float()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    return dequantize(model)  # the 4-bit layers without an adapter


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers hold (4-bit weights count their packed bytes)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
