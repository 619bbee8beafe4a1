"""A transposed weight layout against nn.Linear's for decoding: matrix-times-rows at the GPT-2 124M
shapes, weights read from memory (enough distinct matrices to exceed the caches).

    python benchmarks/decode_layout.py [--json benchmarks/decode-layout.json]

2 threads, fp32, medians of 7. (out, in): nn.Linear's layout, x @ W^T; (in, out): a transposed
copy, x @ W_t. An experiment adl tried and took back (benchmarks/RESULTS.md, "A transposed weight
layout for decoding: tried, not kept").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows = []
    for out_f, in_f, count in ((768, 768, 160), (3072, 768, 40), (768, 3072, 40), (50257, 768, 3)):
        ws = [torch.randn(out_f, in_f) for _ in range(count)]
        wts = [w.t().contiguous() for w in ws]
        for m in (1, 4):
            x = torch.randn(m, in_f)
            a = median_ms(lambda: [x @ w.t() for w in ws])
            b = median_ms(lambda: [x @ w for w in wts])
            a = min(a, median_ms(lambda: [x @ w.t() for w in ws]))  # alternate once more
            mb = out_f * in_f * 4 * count / 1e6
            rows.append({"shape": f"{out_f} x {in_f}", "matrices": count, "MB": round(mb), "rows": m, "out_in_ms": a, "in_out_ms": b,
                         "speedup": a / b})
            print(f"{out_f:>6} x {in_f:<5} x{count:<4} ({mb:5.0f} MB) rows {m}: (out, in) {a:6.1f} ms  (in, out) {b:6.1f} ms  {a / b:.2f}x")
        del ws, wts
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
