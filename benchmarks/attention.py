"""Attention side by side: adl's kernels vs torch SDPA and the naive reference.

    python benchmarks/attention.py --threads 1 --json benchmarks/attention-1t.json

Runs ``adl_cli.bench.attention.run_attention_bench`` (the code behind
``adl bench-attention``; its docstring says how time, memory and error are measured) at
512-4096 tokens, B=1, H=8, D=64, causal, float32, and prints one table per length.

OMP_WAIT_POLICY defaults to PASSIVE here (set before torch loads): on a shared machine,
OpenMP threads that spin between parallel regions get descheduled and every one of the
thousands of small operators a tiled kernel issues waits for them; measured on the 2-core
box at load ~6, flash fwd+bwd at 4096 went from 4.5x to 1.3x SDPA's time, SDPA itself
unchanged. Pass --active to keep OpenMP's default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

if "--active" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from adl_cli.bench.attention import run_attention_bench  # noqa: E402
from adl_cli.cli.bench_attention import render  # noqa: E402
from adl_cli.console import console  # noqa: E402


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", default="naive,sdpa,flash,window,ring,tree,mla")
    ap.add_argument("--seq", default="512,1024,2048,4096")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--active", action="store_true", help="keep OpenMP's default (spinning) wait policy")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    meta = {
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "load_at_start": round(load, 2),
        "command": "python benchmarks/attention.py " + " ".join(sys.argv[1:]),
    }
    console.print(meta, highlight=False)
    rows = run_attention_bench(args.impl, args.seq, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                               repeats=args.repeats, window=args.window,
                               on_seq=lambda T, seq_rows: render(T, seq_rows, console))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
        console.print(f"[dim]rows written to {args.json}[/]", highlight=False)


if __name__ == "__main__":
    main()
