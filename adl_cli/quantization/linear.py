"""Quantized linear layers: what a quantized run holds in place of ``nn.Linear``, and how it multiplies.

Every layer keeps its stored form as persistent buffers (what ``model.safetensors`` of a quantized
run holds, reloaded bit-exactly) and builds the form its kernel wants in ``prepare()`` (called after
building and after loading). ``LAYERS`` maps a layer kind, as written in quantization.json, to its
class; ``spec()`` is that entry (kind, bits, group size, ...) and ``empty(spec, linear_shape)`` a
shell of the right shapes to load into.

    grid   weight-only, on a grids.Quantized grid (absmax, zero-point, codebook), an optional
           per-input scale (AWQ: y = (x / s) Q^T). The fast CPU paths are torch's kernels:
             8 bits, absmax, one scale a row  -> aten._weight_int8pack_mm   (bf16 activations)
             4 bits, linear grid, groups of 32..256 -> aten._weight_int4pack_mm_for_cpu, whose
               dequantization is (u - 8) s + z': a zero point z is z' = (8 - z) s  (bf16 scales)
           anything else is dequantized on the fly (codebooks, other group sizes, other devices).
    w8a8   SmoothQuant: int8 weights per output row after smoothing, activations rounded to int8
           per token at run time, an integer product (torch._int_mm), scaled back.
    bnb4 / bnb-int8 (quantization/bnb.py): bitsandbytes' NF4 / FP4 and LLM.int8().

4-bit integers are stored two a byte (low nibble first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adl_cli.quantization.grids import Quantized
from adl_cli.registry import Registry

LAYERS = Registry("quantized layer kind")
INT4_KERNEL_GROUPS = (32, 64, 128, 256)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(out, in) integers in 0..15 -> (out, in / 2) bytes, low nibble first."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


class QuantizedLinear(nn.Module):
    """What the quantized kinds share: shapes, the bias, storage bits."""

    kind = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float(), requires_grad=False)

    def spec(self) -> dict:
        return {"kind": self.kind}

    def prepare(self) -> None:
        """Build the kernel's form from the stored buffers."""

    def storage_bits(self) -> int:
        """Bits the layer's stored tensors take (the bias included)."""
        return sum(t.numel() * t.element_size() * 8 for t in self.state_dict().values())

    def dequantized(self) -> torch.Tensor:
        """The float weight (out, in) the layer stands for (input scales folded back in)."""
        raise NotImplementedError

    def _bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)


@LAYERS.register("grid")
class GridLinear(QuantizedLinear):
    kind = "grid"

    def __init__(self, quantized: Quantized, bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None):
        out, width = quantized.q.shape
        super().__init__(width, out, bias)
        self.bits, self.group_size = quantized.bits, quantized.group_size or width
        self.has_zero, self.has_codebook = quantized.zero is not None, quantized.codebook is not None
        q = quantized.q
        if self.bits == 4:
            q = pack_nibbles(q if self.has_zero or self.has_codebook else q.to(torch.int16) + 8)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", quantized.scale.to(torch.float16).contiguous())
        if self.has_zero:
            self.register_buffer("zero", quantized.zero.to(torch.float16).contiguous())
        if self.has_codebook:
            self.register_buffer("codebook", quantized.codebook.float().contiguous())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().contiguous())
        self._kernel: str | None = None
        self.prepare()

    @classmethod
    def empty(cls, spec: dict, in_features: int, out_features: int, bias: bool) -> GridLinear:
        bits, group = spec["bits"], spec["group_size"] or in_features
        n_groups = in_features // group
        dtype = torch.int8 if (bits == 8 and not spec["zero"] and not spec["codebook"]) else torch.uint8
        q = Quantized(torch.zeros(out_features, in_features, dtype=dtype), torch.ones(out_features, n_groups),
                      torch.zeros(out_features, n_groups) if spec["zero"] else None, spec["group_size"], bits,
                      torch.zeros(2 ** bits) if spec["codebook"] else None)
        return cls(q, torch.zeros(out_features) if bias else None, torch.ones(in_features) if spec.get("input_scale") else None)

    def spec(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "group_size": self.group_size, "zero": self.has_zero,
                "codebook": self.has_codebook, "input_scale": self.input_scale is not None}

    def quantized(self) -> Quantized:
        """The stored grid, unpacked."""
        q = self.qweight
        if self.bits == 4:
            q = unpack_nibbles(q)
            if not (self.has_zero or self.has_codebook):
                q = (q.to(torch.int16) - 8).to(torch.int8)
        return Quantized(q, self.scale.float(), self.zero.float() if self.has_zero else None, self.group_size, self.bits,
                         self.codebook if self.has_codebook else None)

    def prepare(self) -> None:
        on_cpu = self.qweight.device.type == "cpu"
        self._kernel = None
        if on_cpu and self.bits == 8 and not (self.has_zero or self.has_codebook) and self.group_size == self.in_features:
            self._kernel = "int8"
            self._kernel_scale = self.scale[:, 0].to(torch.bfloat16).contiguous()
        elif on_cpu and self.bits == 4 and not self.has_codebook and self.group_size in INT4_KERNEL_GROUPS:
            self._kernel = "int4"
            qz = self.quantized()
            u = qz.q.to(torch.int32) + (0 if self.has_zero else 8)
            rows = -(-self.out_features // 16) * 16  # the kernel's layout wants rows in multiples of 16
            padded = torch.full((rows, self.in_features), 8, dtype=torch.int32)
            padded[: self.out_features] = u
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded, 1)
            sz = torch.zeros(self.in_features // self.group_size, rows, 2)
            sz[:, : self.out_features, 0] = qz.scale.t()
            if self.has_zero:
                sz[:, : self.out_features, 1] = ((8 - qz.zero) * qz.scale).t()
            self._kernel_scale = sz.to(torch.bfloat16).contiguous()

    def dequantized(self) -> torch.Tensor:
        w = self.quantized().dequantize()
        return w if self.input_scale is None else w / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        fast = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
        if fast and self._kernel == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.qweight, self._kernel_scale)
            return self._bias(y.view(*x.shape[:-1], self.out_features).to(x.dtype))
        if fast and self._kernel == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16), self._packed,
                                                           self.group_size, self._kernel_scale)
            return self._bias(y[:, : self.out_features].reshape(*x.shape[:-1], self.out_features).to(x.dtype))
        return self._bias(F.linear(x, self.quantized().dequantize().to(x.dtype)))

    def extra_repr(self) -> str:
        grid = "codebook" if self.has_codebook else "zero-point" if self.has_zero else "absmax"
        group = "" if self.group_size == self.in_features else f", groups of {self.group_size}"
        return f"{self.in_features} -> {self.out_features}, {self.bits}-bit {grid}{group}" + (", input scales" if self.input_scale is not None else "")


def int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, scales): each row of ``x`` (n, in) on its own absmax grid."""
    scale = (x.abs().amax(-1, keepdim=True).float() / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


@LAYERS.register("w8a8")
class W8A8Linear(QuantizedLinear):
    """SmoothQuant's layer: y = Q8(x / s) Q8(W diag(s))^T, integers multiplied exactly."""

    kind = "w8a8"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor, bias: torch.Tensor | None = None):
        out, width = qweight.shape
        super().__init__(width, out, bias)
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.reshape(out).to(torch.float16).contiguous())
        self.register_buffer("input_scale", input_scale.float().contiguous())

    @classmethod
    def empty(cls, spec: dict, in_features: int, out_features: int, bias: bool) -> W8A8Linear:
        return cls(torch.zeros(out_features, in_features, dtype=torch.int8), torch.ones(out_features), torch.ones(in_features),
                   torch.zeros(out_features) if bias else None)

    def spec(self) -> dict:
        return {"kind": self.kind, "bits": 8, "group_size": self.in_features}

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None] / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = (x.reshape(-1, self.in_features).float() / self.input_scale)
        qx, sx = int8_per_token(rows)
        if x.device.type == "cpu":
            acc = torch._int_mm(qx, self.qweight.t())  # int32, exact
        else:  # exact in fp32 while |sum| < 2^24; cuBLAS' int8 path wants shapes padded
            acc = qx.float() @ self.qweight.float().t()
        y = acc.float() * sx * self.scale.float()[None, :]
        return self._bias(y.view(*x.shape[:-1], self.out_features).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, W8A8 (smoothed, per-token int8 activations)"
