"""bitsandbytes' quantized layers, stored as adl stores every layer (persistent buffers, safetensors).

    bnb4      NF4 or FP4 in blocks of ``group_size`` (bitsandbytes.functional.quantize_4bit), the
              block absmaxes optionally quantized again to 8 bits (double quantization); the
              quantization state is kept in bitsandbytes' own packed dict form. The product goes
              through bitsandbytes.matmul_4bit.
    bnb-int8  LLM.int8(): int8 weights with one absmax a row (bitsandbytes' CB / SCB), multiplied
              through bitsandbytes.matmul with the outlier threshold: input columns where an
              activation reaches it are multiplied in floating point.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from adl_cli.errors import AdlError
from adl_cli.quantization.linear import LAYERS, QuantizedLinear


def bitsandbytes(purpose: str):
    """The bitsandbytes module, imported offline and quietly (on CPUs with AVX512-BF16 it asks the
    Hugging Face hub for an optional 4-bit kernel at import, and logs a warning when it cannot have
    it; adl never downloads); an AdlError naming ``purpose`` when it is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        raise AdlError(f"{purpose} needs bitsandbytes: pip install bitsandbytes") from None
    finally:
        log.setLevel(level)
    return bnb


def _functional():
    return bitsandbytes("bitsandbytes' quantization").functional


@LAYERS.register("bnb4")
class Bnb4Linear(QuantizedLinear):
    kind = "bnb4"

    def __init__(self, packed: torch.Tensor, state: dict[str, torch.Tensor], *, in_features: int, out_features: int, quant_type: str,
                 group_size: int, double_quant: bool, bias: torch.Tensor | None = None):
        super().__init__(in_features, out_features, bias)
        self.quant_type, self.group_size, self.double_quant = quant_type, group_size, double_quant
        self.register_buffer("packed", packed.contiguous())
        self._state_names = []
        for name, t in state.items():
            key = "state_" + name.replace(".", "_")
            self.register_buffer(key, t.contiguous())
            self._state_names.append((name, key))
        self._state = None
        self.prepare()

    @classmethod
    def quantize(cls, linear: nn.Linear, *, quant_type: str, group_size: int, double_quant: bool) -> Bnb4Linear:
        bf = _functional()
        w = linear.weight.detach().float().cpu()
        packed, state = bf.quantize_4bit(w, blocksize=group_size, quant_type=quant_type, compress_statistics=double_quant)
        return cls(packed, state.as_dict(packed=True), in_features=w.shape[1], out_features=w.shape[0], quant_type=quant_type,
                   group_size=group_size, double_quant=double_quant, bias=linear.bias)

    @classmethod
    def empty(cls, spec: dict, in_features: int, out_features: int, bias: bool) -> Bnb4Linear:
        lin = nn.Linear(in_features, out_features, bias=bias)
        return cls.quantize(lin, quant_type=spec["quant_type"], group_size=spec["group_size"], double_quant=spec["double_quant"])

    def spec(self) -> dict:
        return {"kind": self.kind, "bits": 4, "group_size": self.group_size, "quant_type": self.quant_type, "double_quant": self.double_quant}

    def prepare(self) -> None:
        bf = _functional()
        self._state = bf.QuantState.from_dict({name: getattr(self, key) for name, key in self._state_names}, device=self.packed.device)

    def dequantized(self) -> torch.Tensor:
        return _functional().dequantize_4bit(self.packed, self._state).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb = bitsandbytes("a bitsandbytes 4-bit layer")
        y = bnb.matmul_4bit(x, self.packed.t(), quant_state=self._state)
        return self._bias(y.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, bitsandbytes {self.quant_type.upper()} blocks of {self.group_size}" + (
            ", double quantization" if self.double_quant else "")


@LAYERS.register("bnb-int8")
class BnbInt8Linear(QuantizedLinear):
    kind = "bnb-int8"

    def __init__(self, cb: torch.Tensor, scb: torch.Tensor, *, threshold: float, bias: torch.Tensor | None = None):
        out, width = cb.shape
        super().__init__(width, out, bias)
        self.threshold = float(threshold)
        self.register_buffer("CB", cb.to(torch.int8).contiguous())
        self.register_buffer("SCB", scb.float().contiguous())
        self._state = None
        self.prepare()

    @classmethod
    def quantize(cls, linear: nn.Linear, *, threshold: float) -> BnbInt8Linear:
        cb, scb, _ = _functional().int8_vectorwise_quant(linear.weight.detach().float().cpu())
        return cls(cb, scb, threshold=threshold, bias=linear.bias)

    @classmethod
    def empty(cls, spec: dict, in_features: int, out_features: int, bias: bool) -> BnbInt8Linear:
        return cls(torch.zeros(out_features, in_features, dtype=torch.int8), torch.ones(out_features), threshold=spec["threshold"],
                   bias=torch.zeros(out_features) if bias else None)

    def spec(self) -> dict:
        return {"kind": self.kind, "bits": 8, "group_size": self.in_features, "threshold": self.threshold}

    def prepare(self) -> None:
        bitsandbytes("an LLM.int8() layer")
        from bitsandbytes.autograd._functions import MatmulLtState

        s = MatmulLtState()
        s.CB, s.SCB, s.threshold, s.has_fp16_weights, s.is_training = self.CB, self.SCB, self.threshold, False, False
        self._state = s

    def dequantized(self) -> torch.Tensor:
        return self.CB.float() * self.SCB[:, None] / 127

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb = bitsandbytes("an LLM.int8() layer")
        # bitsandbytes multiplies fp16 inputs (it would cast them itself, with a warning each call)
        y = bnb.matmul(x.to(torch.float16), self.CB, state=self._state, threshold=self.threshold)
        return self._bias(y.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, LLM.int8() (bitsandbytes), outlier threshold {self.threshold:g}"
