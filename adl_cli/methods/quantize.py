"""adl quantize: a float run -> a quantized run folder (adl_cli/quantization/store.py's layout).

Calibrated methods (gptq, awq, smoothquant) read ``calib_samples`` windows of the model's context
(at most 512 tokens) drawn with ``seed`` from the run's own training text (its recipe's split:
never the held-out side the benchmark scores), or from ``calib_data`` (any corpus spec).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adl_cli.errors import AdlError, opt
from adl_cli.quantization.methods import METHODS, QuantOptions

CALIB_WINDOW = 512


@dataclass
class QuantizeResult:
    out: Path
    method: str
    layers: int
    bits_per_parameter: float
    source_bytes: int
    out_bytes: int
    seconds: float
    calibration: str
    group_size: int


def source_run(run_dir: Path, device: str = "cpu"):
    """The float run to quantize: not an adapter run, not already quantized."""
    from adl_cli.quantization.store import read_quantization
    from adl_cli.runs import ADAPTER, load_run

    run_dir = Path(run_dir)
    if (run_dir / ADAPTER).exists():
        raise AdlError(f"{run_dir} is an adapter run: fold it into its base first (adl lora merge {run_dir} --out RUN), then quantize that")
    if run_dir.is_dir() and read_quantization(run_dir) is not None:
        raise AdlError(f"{run_dir} is already quantized; quantize its source run")
    run = load_run(run_dir, device=device)
    if run.tokenizer is None:
        raise AdlError(f"{run_dir} has no tokenizer.json: quantized runs keep the source's tokenizer")
    return run


def calibration_windows(run, *, samples: int, seed: int, data: str | None = None) -> tuple[torch.Tensor, str]:
    """(samples, T) token ids: windows of the run's training text (or ``data``), T = min(context, 512)."""
    from adl_cli.methods.evaluate import evaluation_tokens

    if samples < 1:
        raise AdlError(f"{opt('calib_samples')} must be >= 1, got {samples}")
    if data is None and not (Path(run.path) / "recipe.toml").exists():
        raise AdlError(f"{run.path} has no recipe.toml (it was not trained by adl pretrain): name calibration text with {opt('calib_data')}")
    tokens, what = evaluation_tokens(run, data, "train")
    width = min(int(run.config.block_size), CALIB_WINDOW)
    if len(tokens) <= width:
        raise AdlError(f"the calibration text ({what}) has {len(tokens)} tokens: fewer than one window of {width + 1}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - width, size=samples)
    windows = np.stack([np.asarray(tokens[s:s + width]) for s in starts]).astype(np.int64)
    return torch.from_numpy(windows), f"{samples} windows of {width} tokens from {what}"


def quantize_run(run_dir: Path, out: Path, method: str, opts: QuantOptions, *, calib_data: str | None = None, force: bool = False,
                 float_dtype: str = "fp32", log=lambda msg: None) -> QuantizeResult:
    from adl_cli.quantization.apply import bits_per_parameter, plan, quantize_model
    from adl_cli.quantization.store import FLOAT_DTYPES, check_out, narrow_floats, save_quantized_run
    from adl_cli.runs import WEIGHTS

    spec = METHODS.get(method)
    if float_dtype not in FLOAT_DTYPES:
        raise AdlError(f"{opt('float_dtype')} must be one of {', '.join(FLOAT_DTYPES)}, got '{float_dtype}'")
    check_out(out, force)
    if calib_data is not None and not spec.stats:
        raise AdlError(f"{method} reads no activations: {opt('calib_data')} applies to {', '.join(n for n in METHODS.names() if METHODS.get(n).stats)}")
    run = source_run(run_dir)
    plan(run.model, method, opts)  # every option checked before calibration
    n_params = sum(p.numel() for p in {id(p): p for p in run.model.parameters()}.values())
    t0 = time.perf_counter()
    windows, calibration = (None, "none (calibration-free)")
    if spec.stats:
        windows, calibration = calibration_windows(run, samples=opts.calib_samples, seed=opts.seed, data=calib_data)
        log(f"calibration: {calibration}")
    progress = (lambda k, n: log(f"block {k}/{n} quantized")) if spec.stats else None
    specs, opts = quantize_model(run.model, method, opts, windows, progress=progress)
    narrow_floats(run.model, float_dtype)
    seconds = time.perf_counter() - t0
    bpp = bits_per_parameter(run.model, n_params, float_dtype)
    record = {"method": method, "summary": spec.summary, "options": opts.to_dict(), "float_dtype": float_dtype,
              "bits_per_parameter": bpp, "parameters": n_params, "calibration": calibration, "layers": specs}
    save_quantized_run(out, run, run.model, record, force=force, float_dtype=float_dtype)
    return QuantizeResult(Path(out), method, len(specs), bpp, run.weights.stat().st_size, (Path(out) / WEIGHTS).stat().st_size, seconds,
                          calibration, opts.group_size or 0)
