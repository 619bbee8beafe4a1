"""A quantized run folder: an ordinary run folder whose linear layers are stored quantized.

    OUT/
      quantization.json     {"method", "options", "layers": {name: spec}, "bits_per_parameter", ...}
      model.safetensors     the quantized model's state: float tensors (embeddings, norms; fp32, or
                            bf16 / fp16 with --float-dtype) and each quantized layer's stored
                            buffers (integers, scales, zero points, ...)
      config.json, tokenizer files, recipe.toml   copied from the source run (eval reads the split)
      lineage.json          the source run, kind "quantize", with its weights' digest

``runs.load_run`` reads it like any run: it builds the model, puts the layers' shells in place
(``apply.install``), loads the state and prepares the kernels, so ``adl generate``, ``adl eval`` and
``adl bench-inference`` take a quantized run as they take any other.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adl_cli.errors import AdlError, opt
from adl_cli.fileio import atomic_copy, atomic_write, fsync_dir, make_temp_dir

QUANTIZATION = "quantization.json"
COPIED = ("config.json", "tokenizer.json", "tokenizer.tiktoken", "recipe.toml")


def read_quantization(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / QUANTIZATION
    if not path.exists():
        return None
    from adl_cli.runs import read_json

    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise AdlError(f"{path} is not an adl quantization record (no 'layers' table)")
    return data


def install_quantized(run_dir: Path, model: nn.Module) -> dict[str, Any] | None:
    """Put the quantized layers' shells named by the run's quantization.json into ``model`` (None
    when the run is not quantized)."""
    record = read_quantization(run_dir)
    if record is not None:
        from adl_cli.quantization.apply import install

        install(model, record["layers"])
    return record


FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def float_names(model: nn.Module) -> list[str]:
    """The saved tensors outside the quantized layers that are floating point (embeddings, norms,
    an unquantized head): what ``--float-dtype`` narrows."""
    from adl_cli.engine.checkpoint import model_tensors
    from adl_cli.quantization.linear import QuantizedLinear

    inside = [name + "." for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    return [k for k, t in model_tensors(model).items() if t.is_floating_point() and not any(k.startswith(p) for p in inside)]


def narrow_floats(model: nn.Module, dtype: str) -> None:
    """Round those tensors to ``dtype`` in place (kept in their own dtype), so that the model in
    memory computes what the saved run will."""
    if dtype == "fp32":
        return
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in float_names(model):
            t = state[name]
            t.copy_(t.to(FLOAT_DTYPES[dtype]).to(t.dtype))


def stored_tensors(model: nn.Module, dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """The quantized model's tensors as a quantized run stores them (floats outside the quantized
    layers in ``dtype``; loading casts them back into the model's parameters)."""
    from adl_cli.engine.checkpoint import model_tensors

    tensors = model_tensors(model)
    if dtype != "fp32":
        for name in float_names(model):
            tensors[name] = tensors[name].to(FLOAT_DTYPES[dtype])
    return tensors


def check_out(out: Path, force: bool) -> None:
    """Refuse an output folder that holds anything, unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdlError(f"{out} is a file; {opt('out')} names a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise AdlError(f"{out} is not empty; choose another {opt('out')} or replace it with {opt('force')}")


def save_quantized_run(out: Path, source, model: nn.Module, record: dict[str, Any], *, force: bool = False, float_dtype: str = "fp32") -> None:
    """``model`` (quantized in place) as a run folder at ``out``, beside the source run's files:
    written whole into a temporary folder beside ``out``, then renamed into place (an existing
    ``out`` is replaced only with ``force``, and only once the new folder is complete)."""
    from adl_cli.engine.checkpoint import save_safetensors
    from adl_cli.runs import WEIGHTS, parent_entry, write_lineage

    out = Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        for name in COPIED:
            src = Path(source.path) / name
            if src.exists():
                atomic_copy(src, tmp / name)
        save_safetensors(stored_tensors(model, float_dtype), tmp / WEIGHTS,
                         metadata={"format": "pt", "adl": model.config.family, "quantization": record["method"]})
        write_lineage(tmp, [parent_entry("quantize", source, method=record["method"])])
        atomic_write(tmp / QUANTIZATION, json.dumps(record, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
