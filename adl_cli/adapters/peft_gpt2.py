"""An adl LoRA/DoRA adapter as a peft adapter of transformers' GPT2LMHeadModel.

adl's GPT keeps q, k and v as three linears; transformers' GPT-2 fuses them into one ``c_attn``
(a Conv1D of C -> 3C). Adapters on q, k or v therefore become one ``c_attn`` adapter whose rank
is (number of adapted projections) x r: A stacks the projections' A matrices, and B is block
structured, each projection's B in its own rows and columns, zeros elsewhere::

    A = [A_q; A_v]            B = [B_q 0; 0 0; 0 B_v]      (q and v adapted, k not)

so B A = [B_q A_q; 0; B_v A_v]: each third of c_attn's output gets exactly its projection's
update. The scaling alpha / rank must not change with the larger rank: c_attn's alpha is
multiplied by the number of projections (its square root with rsLoRA), through peft's
``alpha_pattern``. DoRA's magnitude is per output channel, so c_attn's is the three magnitudes
in a row, a projection without an adapter contributing the norms of its own weight rows (its
update is zero, so its direction is its weight's). The other targets (``attn.c_proj``,
``mlp.c_fc``, ``mlp.c_proj``) keep their names and tensors (peft's ``fan_in_fan_out`` handles
Conv1D's transposed weight).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from adl_cli.errors import AdlError

_QKV = ("q_proj", "k_proj", "v_proj")
_NAME = re.compile(r"^transformer\.h\.(\d+)\.(attn\.(?:q_proj|k_proj|v_proj|c_proj)|mlp\.(?:c_fc|c_proj))\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")


def convert(tensors: dict[str, torch.Tensor], config: dict, base_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """(peft tensors named as ``PeftModel.save_pretrained`` names them, LoraConfig keyword arguments)."""
    layers: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _NAME.match(key)
        if m is None:
            raise AdlError(f"cannot export adapter tensor {key!r} to transformers' GPT-2 (only q/k/v, attn.c_proj, mlp.c_fc and mlp.c_proj)")
        layers.setdefault(int(m.group(1)), {}).setdefault(m.group(2), {})[m.group(3)] = t
    r, alpha, rslora, dora = int(config["r"]), float(config["alpha"]), bool(config.get("rslora")), bool(config.get("dora"))
    out: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    fused_count = set()
    for i, mods in sorted(layers.items()):
        prefix = f"base_model.model.transformer.h.{i}."
        qkv = [p for p in _QKV if f"attn.{p}" in mods]
        if qkv:
            n = len(qkv)
            fused_count.add(n)
            C = mods[f"attn.{qkv[0]}"]["lora_B.weight"].shape[0]
            A = torch.cat([mods[f"attn.{p}"]["lora_A.weight"] for p in qkv], dim=0)
            B = torch.zeros(3 * C, n * r, dtype=A.dtype)
            for j, p in enumerate(qkv):
                row = _QKV.index(p)
                B[row * C:(row + 1) * C, j * r:(j + 1) * r] = mods[f"attn.{p}"]["lora_B.weight"]
            out[prefix + "attn.c_attn.lora_A.weight"] = A.contiguous()
            out[prefix + "attn.c_attn.lora_B.weight"] = B
            if dora:
                mags = []
                for p in _QKV:
                    if f"attn.{p}" in mods:
                        mags.append(mods[f"attn.{p}"]["lora_magnitude_vector"])
                    else:
                        mags.append(base_state[f"transformer.h.{i}.attn.{p}.weight"].float().norm(dim=1).to(A.dtype))
                out[prefix + "attn.c_attn.lora_magnitude_vector"] = torch.cat(mags).contiguous()
            targets.add("attn.c_attn")
        for name in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            if name in mods:
                for part, t in mods[name].items():
                    out[prefix + f"{name}.{part}"] = t.contiguous()
                targets.add(name)
    if len(fused_count) > 1:
        raise AdlError("the layers adapt different sets of q, k and v: transformers' GPT-2 needs one rank for every c_attn")
    kwargs = {"r": r, "lora_alpha": alpha, "target_modules": sorted(targets), "fan_in_fan_out": True, "use_rslora": rslora,
              "use_dora": dora, "bias": "none", "lora_dropout": float(config.get("dropout", 0.0))}
    if fused_count:
        n = fused_count.pop()
        if n > 1:
            kwargs["rank_pattern"] = {"c_attn": n * r}
            kwargs["alpha_pattern"] = {"c_attn": alpha * (math.sqrt(n) if rslora else n)}
    return out, kwargs


def write_peft_adapter(out: Path, tensors: dict[str, torch.Tensor], config: dict, base_state: dict[str, torch.Tensor]) -> None:
    """``out/adapter_config.json`` + ``out/adapter_model.safetensors``: what ``PeftModel.from_pretrained``
    reads on top of the model ``adl export hf`` writes."""
    from peft import LoraConfig

    from adl_cli.engine.checkpoint import save_safetensors

    hf_tensors, kwargs = convert(tensors, config, base_state)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(**kwargs).save_pretrained(str(out))
    save_safetensors(hf_tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
