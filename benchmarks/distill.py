"""Distilled student against the same student from scratch, over seeds: `adl distill RECIPE --scratch`
once per seed (the seed sets the student's initialisation and its batches, alike for both), then
the paired difference in held-out loss with a t interval.

    python benchmarks/distill.py --recipe text --seeds 1337 1338 1339 --json benchmarks/distill-text.json

Needs the teacher run the recipe names (recipes/distill/text.toml: runs/small, from
`adl pretrain small`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571}  # two-sided 95% t quantiles by sample size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="text")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for both runs")
    ap.add_argument("--runs", default="runs/distill-bench")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        root = Path(args.runs) / f"{args.recipe}-s{seed}"
        cmd = [sys.executable, "-m", "adl_cli", "distill", args.recipe, "--out", str(root / "distilled"), "--scratch", str(root / "scratch"),
               "--set", f"train.seed={seed}", "--no-progress", "--json", "--force"]
        for o in args.overrides:
            cmd += ["--set", o]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        report = json.loads(out.strip().splitlines()[-1])
        r = report["rows"]
        row = {"seed": seed, **{f"{k}_val_loss": r[k]["val_loss"] for k in r}, **{f"{k}_bpb": r[k]["val_bits_per_byte"] for k in r},
               "seconds": report["seconds"], "tokens": r["distilled"]["tokens"]}
        rows.append(row)
        print(f"seed {seed}: teacher {row['teacher_val_loss']:.4f}  distilled {row['distilled_val_loss']:.4f}  scratch {row['scratch_val_loss']:.4f}"
              f"  ({row['tokens']:,} tokens; {row['seconds']['distilled']:.0f} s vs {row['seconds'].get('scratch', 0):.0f} s)", flush=True)
    gains = [r["scratch_val_loss"] - r["distilled_val_loss"] for r in rows]
    mean = statistics.mean(gains)
    half = T95.get(len(gains), 2.0) * statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else float("nan")
    summary = {"recipe": args.recipe, "seeds": args.seeds, "overrides": args.overrides, "rows": rows,
               "gain_val_loss_mean": mean, "gain_val_loss_ci95": [mean - half, mean + half],
               "distilled_mean": statistics.mean(r["distilled_val_loss"] for r in rows),
               "scratch_mean": statistics.mean(r["scratch_val_loss"] for r in rows)}
    print(f"val loss: distilled {summary['distilled_mean']:.4f}, scratch {summary['scratch_mean']:.4f}; "
          f"scratch - distilled {mean:+.4f} nats (95% CI {mean - half:+.4f} .. {mean + half:+.4f}, {len(gains)} seeds)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
