"""Is a quantization method's held-out loss different from round-to-nearest's? Per-token losses of
int4 (round to nearest), AWQ and GPTQ on the run's held-out windows (the same calibration as
`adl bench-quantize`: 128 windows of the training split, seed 0), their paired differences, and a
95% bootstrap interval that resamples whole windows (tokens of a window are not independent).

    python benchmarks/quant_paired.py runs/small
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F

from adl_cli.data.tokens import split_windows
from adl_cli.methods.evaluate import evaluation_tokens
from adl_cli.methods.quantize import calibration_windows, source_run
from adl_cli.quantization.apply import quantize_model
from adl_cli.quantization.methods import QuantOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--methods", nargs="+", default=["awq", "gptq"])
    ap.add_argument("--boot", type=int, default=2000)
    args = ap.parse_args()
    run = source_run(args.run)
    tokens, _ = evaluation_tokens(run, None, "val")
    windows, _ = calibration_windows(run, samples=128, seed=0)
    models = {}
    for name in ["int4", *args.methods]:
        m = copy.deepcopy(run.model)
        quantize_model(m, name, QuantOptions(), windows)
        models[name] = m.eval()
    per: dict[str, list[np.ndarray]] = {k: [] for k in models}
    with torch.no_grad():
        for x, y in split_windows(tokens, run.config.block_size, 8):
            for name, m in models.items():
                nll = F.cross_entropy(m(x)[0].float().transpose(1, 2), y, ignore_index=-100, reduction="none")
                per[name] += [nll[r][y[r] != -100].numpy() for r in range(x.shape[0])]
    rng = np.random.default_rng(0)
    n = len(per["int4"])
    for name in args.methods:
        sums = np.array([(a - b).sum() for a, b in zip(per[name], per["int4"])])
        counts = np.array([len(a) for a in per[name]])
        boots = [sums[i].sum() / counts[i].sum() for i in (rng.integers(0, n, n) for _ in range(args.boot))]
        lo, hi = np.percentile(boots, [2.5, 97.5])
        print(f"{name} - int4: {sums.sum() / counts.sum():+.5f} nats per token (95% window bootstrap {lo:+.5f} .. {hi:+.5f}), "
              f"{counts.sum():,} tokens in {n} windows")


if __name__ == "__main__":
    main()
