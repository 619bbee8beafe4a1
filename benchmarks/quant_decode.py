"""Weight-only int8 / int4 decoding against fp32: greedy decode tokens/s on the main job's model
and on a GPT-2-124M-shaped model (random weights), alternating, medians, one process.

    python benchmarks/quant_decode.py --run runs/tiny --json benchmarks/quant-decode.json

Batch 1, 2 threads, a 32-token prompt, 64 new tokens (the 124M model: 32). Decoding one token
reads every weight once, so at batch 1 it is bound by memory reads: int8 weights are a quarter of
fp32's bytes, int4 an eighth (plus scales). Also printed: how many of the greedy tokens equal
fp32's.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from adl_cli.inference.quant import quantize_model
from adl_cli.methods.generate import generate
from adl_cli.models.gpt import GPT, GPTConfig
from adl_cli.runs import load_run


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/tiny")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    models = {"main job (3 x 192)": (load_run(Path(args.run)).model.float().eval(), 64),
              "GPT-2 124M shape": (GPT(GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)).eval(), 32)}
    rows = []
    for name, (base, new) in models.items():
        prompt = torch.randint(0, base.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
        variants = {"fp32": base}
        for scheme in ("int8", "int4"):
            m = copy.deepcopy(base)
            quantize_model(m, scheme)
            variants[scheme] = m
        times = {v: [] for v in variants}
        outs = {}
        with torch.no_grad():
            for v, m in variants.items():  # warm-up
                generate(m, prompt, 4, temperature=0)
            for r in range(args.rounds):
                for v in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                    t = time.perf_counter()
                    outs[v] = generate(variants[v], prompt, new, temperature=0)
                    times[v].append(time.perf_counter() - t)
        base_t = statistics.median(times["fp32"])
        print(f"\n{name}: {new} new tokens after a 32-token prompt")
        print(f"{'weights':<8} {'MB':>8} {'tok/s':>8} {'x fp32':>7} {'tokens = fp32':>14}")
        for v, ts in times.items():
            med = statistics.median(ts)
            same = int((outs[v][0, 32:] == outs["fp32"][0, 32:]).cumprod(0).sum())
            row = {"model": name, "weights": v, "mb": weight_bytes(variants[v]) / 1e6, "tokens_per_s": new / med, "ratio": base_t / med,
                   "leading_tokens_equal_fp32": same, "new_tokens": new}
            rows.append(row)
            print(f"{v:<8} {row['mb']:>8.1f} {row['tokens_per_s']:>8.1f} {row['ratio']:>7.2f} {same:>10}/{new}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
