"""Weight-only quantization for decoding: int8 per output channel, int4 per group, round to nearest.

    int8:  s_j = max_i |W_ji| / 127            q = round(W / s_j) in [-127, 127]   (one scale a row)
    int4:  s_jg = max_{i in g} |W_ji| / 7      q = round(W / s_jg) in [-7, 7]      (one scale per
           group of ``group_size`` inputs; two weights a byte)

Activations stay in floating point; y = x (q s)^T. Rounding moves each weight by at most half
its scale, so every output is within sum_i |x_i| s_j(i) / 2 of the float layer's (the tests
check this bound, not a tolerance from one host). int8 runs through torch's CPU kernel for
int8 weights (``aten._weight_int8pack_mm``) with bf16 activations, which adds bf16's rounding
of the input, the scales and the output (relative 2^-8 each at most); elsewhere it dequantizes.
int4 (group sizes 32 to 256) runs through torch's int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``,
its packed layout, rows padded to a multiple of 16) with bf16 activations and scales, the same
bf16 rounding as int8's; other group sizes, or weights on another device, are kept two a byte and
dequantized on the fly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adl_cli.errors import AdlError, opt

SCHEMES = ("int8", "int4")


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, bits: int, group_size: int = 32):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        w = linear.weight.detach().float()
        self.out_features, self.in_features = w.shape
        self.bits, self.group_size = bits, group_size if bits == 4 else self.in_features
        if bits == 4 and (self.in_features % group_size or self.in_features % 2):
            raise ValueError(f"int4 needs the input width ({self.in_features}) to be a multiple of the group size {group_size}")
        qmax = 127 if bits == 8 else 7
        groups = w.view(self.out_features, -1, self.group_size)
        scale = (groups.abs().amax(dim=-1) / qmax).clamp(min=torch.finfo(torch.float32).tiny)  # (out, n_groups)
        q = torch.round(groups / scale[..., None]).clamp(-qmax, qmax).to(torch.int8).view(self.out_features, self.in_features)
        # int4 on a CPU: torch's int4 kernel layout (rows padded to a multiple of 16; scales and
        # zero points (in / group, rows, 2), zero points 0: w = (u - 8) s with u = q + 8 in 1..15)
        self.int4_kernel = bits == 4 and w.device.type == "cpu" and group_size in (32, 64, 128, 256)
        if self.int4_kernel:
            rows = -(-self.out_features // 16) * 16
            u = torch.full((rows, self.in_features), 8, dtype=torch.int32)
            u[: self.out_features] = q.to(torch.int32) + 8
            q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
            sz = torch.zeros(self.in_features // group_size, rows, 2)
            sz[:, : self.out_features, 0] = scale.t()
            self.register_buffer("kernel_scale", sz.to(torch.bfloat16).contiguous())
        elif bits == 4:
            nib = (q + 8).to(torch.uint8)  # 1..15
            q = nib[:, 0::2] | (nib[:, 1::2] << 4)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.contiguous())
        if bits == 8:
            self.register_buffer("kernel_scale", scale[:, 0].to(torch.bfloat16).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def _int4_kernel_weight(self) -> torch.Tensor:
        """(u - 8) s read back through the kernel from an identity input (exact in fp32)."""
        sz = torch.zeros(self.kernel_scale.shape)
        sz[:, : self.out_features, 0] = self.scale.t()
        eye = torch.eye(self.in_features)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size, sz)[:, : self.out_features].t()

    def int_weight(self) -> torch.Tensor:
        """The integer weights (out, in) as int8."""
        if self.bits == 8:
            return self.qweight
        if self.int4_kernel:
            scale = self.scale.repeat_interleave(self.group_size, dim=1)
            return torch.round(self._int4_kernel_weight() / scale).to(torch.int8)
        low = (self.qweight & 0x0F).to(torch.int8) - 8
        high = (self.qweight >> 4).to(torch.int8) - 8
        return torch.stack((low, high), dim=-1).view(self.out_features, self.in_features)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        q = self.int_weight().view(self.out_features, -1, self.group_size).to(dtype)
        return (q * self.scale.to(dtype)[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 8 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            # torch's int8 kernel is fast with bf16 activations (3x fp32's matmul at 768 x 3072 on a
            # 2-core AMX host; 0.3x with fp32 ones): the activations and the output round to bf16
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.qweight, self.kernel_scale)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.int4_kernel and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            # torch's int4 kernel, with bf16 activations and scales (2x fp32's matmul at 768 x 3072 here)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16), self.qweight,
                                                           self.group_size, self.kernel_scale)
            y = y[:, : self.out_features].reshape(*x.shape[:-1], self.out_features).to(x.dtype)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, int{self.bits}" + (f", groups of {self.group_size}" if self.bits == 4 else "")


def quantize_model(model: nn.Module, scheme: str, *, group_size: int = 32) -> int:
    """Replace the model's linear layers by QuantLinear in place; returns how many were replaced.
    An output head tied to the token embedding gets its own quantized copy (the embedding keeps
    the float table, of which decoding reads one row a token; the head reads all of it).
    Weight-only: for decoding, not training or the fused loss."""
    if scheme not in SCHEMES:
        raise AdlError(f"{opt('quant')} must be one of {', '.join(SCHEMES)}, got '{scheme}'")
    bits = 8 if scheme == "int8" else 4
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    if not targets:
        raise AdlError(f"{opt('quant')} {scheme}: the model has no linear layers to quantize")
    for parent, name, child in targets:
        try:
            setattr(parent, name, QuantLinear(child, bits, group_size))
        except ValueError as e:
            raise AdlError(f"{opt('quant')} {scheme} cannot quantize {type(parent).__name__}.{name}: {e}") from None
    return len(targets)
