"""Mamba's selective scan: adl's chunked scan against mambapy's parallel scan (the peer), the
doubling scan and the sequential loop, forward + backward, in one process.

Every contender computes the states h_t = a_t h_{t-1} + b_t of (B, L, D, N) inputs and the
gradient of sum(h * w) with respect to a and b (a fixed random w), which is what a training step
of a Mamba layer asks of it:

    adl-chunked   adl_cli.nn.scan.scan_chunked (chunk 16): one fused autograd operation
    mambapy       mambapy.pscan.pscan (Blelloch, in place, its own backward): pip install mambapy
    doubling      adl_cli.nn.scan.scan_parallel (Hillis-Steele under autograd)
    sequential    adl_cli.nn.scan.scan_sequential (the loop under autograd; the reference)

The outputs are checked against the sequential loop first (float32, 1e-4 relative). Contenders
alternate their order each repeat; the figure is the median seconds per call and its ratios.

    python benchmarks/scan.py --json benchmarks/scan.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from adl_cli.nn.scan import scan_chunked, scan_parallel, scan_sequential


def contenders(chunk: int) -> dict:
    found = {"adl-chunked": lambda a, b: scan_chunked(a, b, None, chunk)[0]}
    try:
        from mambapy.pscan import pscan

        found["mambapy"] = pscan
    except ImportError:
        print("mambapy is not installed (pip install mambapy): the peer is left out")
    found["doubling"] = lambda a, b: scan_parallel(a, b)[0]
    found["sequential"] = lambda a, b: scan_sequential(a, b)[0]
    return found


def one_call(fn, a0, b0, w):
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    sync()
    t0 = time.perf_counter()
    h = fn(a, b)
    ga, gb = torch.autograd.grad((h * w).sum(), (a, b))
    sync()
    return time.perf_counter() - t0, h.detach(), ga, gb


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="80,256,512", help="sequence lengths L (the loop under autograd takes minutes at 1024)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--channels", type=int, default=128, help="D (Mamba's expand x n_embd)")
    ap.add_argument("--state", type=int, default=16, help="N")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    fns = contenders(args.chunk)
    rows = []
    for length in [int(v) for v in args.lengths.split(",")]:
        shape = (args.batch, length, args.channels, args.state)
        a0 = torch.rand(shape, device=args.device) * 0.5 + 0.5  # decays in (0.5, 1): long memory, as Mamba's small steps give
        b0, w = torch.randn(shape, device=args.device), torch.randn(shape, device=args.device)
        _, ref, ref_ga, ref_gb = one_call(fns["sequential"], a0, b0, w)
        times = {name: [] for name in fns}
        for name, fn in fns.items():  # warm-up and the check
            _, h, ga, gb = one_call(fn, a0, b0, w)
            for got, want in ((h, ref), (ga, ref_ga), (gb, ref_gb)):
                err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))
                if err > 1e-4:
                    raise SystemExit(f"{name} at L={length} differs from the loop: {err:.2e} of the largest value")
        order = list(fns)
        for r in range(args.repeats):
            for name in order if r % 2 == 0 else reversed(order):
                times[name].append(one_call(fns[name], a0, b0, w)[0])
        med = {name: statistics.median(v) for name, v in times.items()}
        row = {"length": length, "shape": list(shape), "median_s": med}
        row["adl_vs"] = {name: med[name] / med["adl-chunked"] for name in med if name != "adl-chunked"}
        rows.append(row)
        print(f"L={length:5d} " + "  ".join(f"{name} {med[name] * 1e3:8.2f} ms" for name in med))
        print("        adl-chunked is " + ", ".join(f"{v:.2f}x as fast as {name}" for name, v in row["adl_vs"].items()))
    host = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or platform.machine()
    report = {"host": host, "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "batch": args.batch, "channels": args.channels, "state": args.state, "chunk": args.chunk, "repeats": args.repeats,
              "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
