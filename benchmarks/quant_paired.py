"""Is a quantization method's held-out loss different from round-to-nearest's? Per-token losses of
int4 (round to nearest), AWQ and GPTQ on the run's held-out windows (the same calibration as
`adl bench-quantize`: 128 windows of the training split, seed 0), their paired differences, and a
95% bootstrap interval that resamples whole windows (tokens of a window are not independent).
With ``--calib-seeds``, every method is calibrated on that many draws of the calibration windows
(seed 0, 1, ...) and the difference is printed for each draw and for their mean: on small models
the draw moves the result by as much as the methods differ.

    python benchmarks/quant_paired.py runs/small --calib-seeds 3
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
    ap.add_argument("--calib-seeds", type=int, default=1)
    args = ap.parse_args()
    run = source_run(args.run)
    tokens, _ = evaluation_tokens(run, None, "val")
    batches = list(split_windows(tokens, run.config.block_size, 8))
    rng = np.random.default_rng(0)
    diffs: dict[str, list[list[np.ndarray]]] = {k: [] for k in args.methods}
    for seed in range(args.calib_seeds):
        windows, _ = calibration_windows(run, samples=128, seed=seed)
        per = {name: losses(quantized(run.model, name, windows), batches) for name in ["int4", *args.methods]}
        for name in args.methods:
            diffs[name].append([a - b for a, b in zip(per[name], per["int4"])])
            report(f"{name} - int4, calibration seed {seed}", diffs[name][-1], rng, args.boot)
    if args.calib_seeds > 1:
        for name in args.methods:
            mean = [sum(d[w] for d in diffs[name]) / args.calib_seeds for w in range(len(diffs[name][0]))]
            report(f"{name} - int4, mean of {args.calib_seeds} calibrations", mean, rng, args.boot)


def quantized(model, name, windows):
    m = copy.deepcopy(model)
    quantize_model(m, name, QuantOptions(), windows)
    return m.eval()


@torch.no_grad()
def losses(model, batches) -> list[np.ndarray]:
    """Per window: the loss of each predicted token."""
    out = []
    for x, y in batches:
        nll = F.cross_entropy(model(x)[0].float().transpose(1, 2), y, ignore_index=-100, reduction="none")
        out += [nll[r][y[r] != -100].numpy() for r in range(x.shape[0])]
    return out


def report(label: str, diffs: list[np.ndarray], rng, boot: int) -> None:
    """The mean per-token difference and its 95% bootstrap interval over windows."""
    sums = np.array([d.sum() for d in diffs])
    counts = np.array([len(d) for d in diffs])
    n = len(diffs)
    boots = [sums[i].sum() / counts[i].sum() for i in (rng.integers(0, n, n) for _ in range(boot))]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    print(f"{label}: {sums.sum() / counts.sum():+.5f} nats per token (95% window bootstrap {lo:+.5f} .. {hi:+.5f}), "
          f"{counts.sum():,} tokens in {n} windows", flush=True)

if __name__ == "__main__":
    main()
