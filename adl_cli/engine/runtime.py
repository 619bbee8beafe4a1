"""Where and how work runs: precision choice, seeding, the allocator, the machine's measured matmul peak."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adl_cli.fileio import cache_dir  # noqa: F401  (re-exported: engine code reads it from here too)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# glibc mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_allocator_state: str | None = None


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    By default glibc serves every block over 32 MB with its own mmap and unmaps it on free,
    and trims the heap top once 128 KB+ is free. A training step allocates and frees the
    same large activations, gradients and loss buffers every time, so each step page-faults
    hundreds of MB afresh (zero-filled by the kernel): about a third of an eager CPU step at
    GPT-2-small-ish sizes. With ``M_MMAP_MAX = 0`` every block comes from the heap and with a
    2 GB trim threshold freed blocks stay there, so the next step reuses warm pages. The
    process keeps its high-water mark of memory (which is what it needs each step anyway).

    Idempotent; a no-op off glibc (macOS, Windows, musl) and when ``ADL_MALLOC=default``.
    Returns what was done: "tuned", "default" (opted out) or "unavailable"."""
    global _allocator_state
    if _allocator_state is not None:
        return _allocator_state
    if os.environ.get("ADL_MALLOC", "").strip().lower() in ("default", "off", "0", "no"):
        _allocator_state = "default"
        return _allocator_state
    _allocator_state = "unavailable"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return _allocator_state
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return _allocator_state
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1:
        _allocator_state = "tuned"
    return _allocator_state


def flush_denormals() -> bool:
    """Treat denormal floats (below 1.2e-38 in float32) as zero on the CPU (flush-to-zero and
    denormals-are-zero). Arithmetic on denormals takes a slow path on x86, up to ~100x: a training
    run whose gradients, optimizer moments or saturated gates drift there slows down for good (an
    LSTM at lr 1e-2 on selective copying fell from 80k to 6k tokens/s over 3,000 steps). Values
    that small are rounding noise to every model here. Returns whether the CPU supports it."""
    return torch.set_flush_denormal(True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@functools.lru_cache(maxsize=None)
def _cpu_bf16_speedup() -> float:
    n = 512
    return measure_matmul_peak(torch.device("cpu"), torch.bfloat16, n=n) / measure_matmul_peak(torch.device("cpu"), torch.float32, n=n)


def fast_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls are fast: CUDA with bf16 support; on a CPU, measured.

    CPUs differ (AMX or AVX512-BF16 make bf16 matmuls 2x or more faster than fp32; without
    them bf16 is emulated and several times slower), so on a CPU this times one 512^3 matmul
    in each dtype (a few milliseconds) and says yes when bf16 is at least 1.5x faster."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_bf16_speedup() >= 1.5
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 where the hardware does it fast, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """Best observed FLOP/s of an n^3 matmul: the roof that model-FLOPs utilisation is measured against."""
    g = torch.Generator(device=device).manual_seed(0)  # its own generator: never moves the training RNG
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """The peak measured now, on this device with this thread count: MFU's denominator.

    Measured at the start of each run rather than cached, so a busy machine lowers both the
    throughput and the roof it is compared with."""
    n = 4096 if device.type == "cuda" else 1024
    return measure_matmul_peak(device, dtype, n=n)
