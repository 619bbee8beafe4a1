"""The CPU speedrun: how long recipes/pretrain/speedrun.toml takes to reach the final validation
bits per byte of the landed tiny recipe, both run alternating in one benchmark.

"landed" is recipes/pretrain/tiny.toml as of a git revision (default 2e8f0ac, before the "how to
train transformers" work: pydoc only, AdamW, dropout 0.1), run by today's code, so both read the
same honest held-out split, with its training text as it was (``data.dedup = false``). Its
training time is its last logging row's ``train_s`` (training seconds, evaluations and
checkpoints left out); the speedrun's is ``train_s`` at its first evaluation whose bits per byte
is at or below the landed run's final value (evaluations every 25 steps). Reported per round
and as medians, with the ratio speedrun / landed (goal: <= 0.60).

    python benchmarks/speedrun.py --rounds 2 --json benchmarks/speedrun.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The landed recipe as it trained then: its code kept repeated paragraphs (data.dedup came later).
LANDED_SETS = ["data.dedup=false"]


def run(recipe: Path, out: Path, sets: list[str] = ()) -> tuple[dict, list[dict]]:
    extra = [a for s in sets for a in ("--set", s)]
    p = subprocess.run([sys.executable, "-m", "adl_cli", "pretrain", str(recipe), "--out", str(out), "--no-progress", *extra], cwd=ROOT,
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{recipe} failed:\n{p.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return json.loads((out / "summary.json").read_text()), rows


def bpb_curve(summary: dict, rows: list[dict]) -> list[tuple[int, float, float]]:
    """(step, train_s, val bits per byte) at each evaluation; bits per byte = loss x (the run's final bpb / loss)."""
    per_nat = summary["val_bits_per_byte"] / summary["val_loss"]
    train_s, out = 0.0, []
    for r in rows:
        if "train_s" in r:
            train_s = r["train_s"]
        if "val_loss" in r:
            out.append((r["step"], train_s, r["val_loss"] * per_nat))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--landed", default="2e8f0ac", help="git revision whose recipes/pretrain/tiny.toml is the landed main job")
    ap.add_argument("--json")
    args = ap.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        landed_recipe = Path(tmp) / "landed-tiny.toml"
        landed_recipe.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{args.landed}:recipes/pretrain/tiny.toml"],
                                                check=True, capture_output=True, text=True).stdout)
        speed_recipe = ROOT / "recipes" / "pretrain" / "speedrun.toml"
        for i in range(args.rounds):
            order = [("landed", landed_recipe), ("speedrun", speed_recipe)] if i % 2 == 0 else [("speedrun", speed_recipe), ("landed", landed_recipe)]
            got = {name: run(recipe, Path(tmp) / f"{name}-{i}", LANDED_SETS if name == "landed" else ()) for name, recipe in order}
            ls, lrows = got["landed"]
            target = ls["val_bits_per_byte"]
            landed_s = [r["train_s"] for r in lrows if "train_s" in r][-1]
            curve = bpb_curve(*got["speedrun"])
            hit = next(((step, t) for step, t, b in curve if b <= target), None)
            r = {"landed_bpb": target, "landed_train_s": landed_s, "speedrun_final_bpb": got["speedrun"][0]["val_bits_per_byte"],
                 "speedrun_step": hit[0] if hit else None, "speedrun_train_s": hit[1] if hit else None,
                 "ratio": hit[1] / landed_s if hit else None, "curve": curve}
            rounds.append(r)
            print(f"round {i + 1}: landed {target:.4f} bpb in {landed_s:.1f} s; speedrun "
                  + (f"reached it at step {hit[0]} in {hit[1]:.1f} s (x{hit[1] / landed_s:.2f})" if hit else "did not reach it")
                  + f", ended at {r['speedrun_final_bpb']:.4f}", flush=True)
    hits = [r for r in rounds if r["ratio"] is not None]
    if hits:
        print(f"\nmedian: landed {statistics.median(r['landed_train_s'] for r in rounds):.1f} s, speedrun "
              f"{statistics.median(r['speedrun_train_s'] for r in hits):.1f} s to the landed quality; ratio {statistics.median(r['ratio'] for r in hits):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"landed": args.landed, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
