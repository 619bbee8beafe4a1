"""Optimizers on the main job: the tiny recipe trained for N steps with each optimizer, side by side.

Each contender is `adl pretrain tiny --set train.steps=N --set train.optimizer=NAME` (plus its
own extra settings) in a fresh process; seeds and data are the recipe's, so the runs differ only
in the optimizer. Reported: the final validation loss (nats/token, the whole eval set of the
recipe), the difference to AdamW, and tokens/s.

    python benchmarks/optimizers_tiny.py --steps 300                       # adamw vs muon
    python benchmarks/optimizers_tiny.py --steps 300 --contenders adamw,muon,muon:muon_lr=0.01
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, steps: int, out: Path) -> dict:
    opt, _, extra = name.partition(":")
    sets = ["--set", f"train.steps={steps}", "--set", f"train.optimizer={opt}"]
    for kv in filter(None, extra.split(",")):
        sets += ["--set", f"train.{kv}"]
    cmd = [sys.executable, "-m", "adl_cli", "pretrain", "tiny", "--out", str(out), "--no-progress", *sets]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"contender": name, "val_loss": s["val_loss"], "train_loss": s["train_loss"], "tokens_per_s": s["tokens_per_s"],
            "optimizer": s["optimizer"], "command": " ".join(["adl", *cmd[3:5], *sets])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--contenders", default="adamw,muon")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.contenders.split(",")):
            rows.append(run(name, args.steps, Path(tmp) / f"run{i}"))
            r = rows[-1]
            print(f"{name:28s} val {r['val_loss']:.4f}  train {r['train_loss']:.4f}  {r['tokens_per_s']:,.0f} tok/s  ({r['optimizer']})", flush=True)
    base = next((r for r in rows if r["contender"] == "adamw"), rows[0])
    print(f"\n{args.steps} steps of recipes/pretrain/tiny.toml; val loss minus {base['contender']}'s:")
    for r in rows:
        print(f"  {r['contender']:28s} {r['val_loss'] - base['val_loss']:+.4f} nats")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
