"""Pretraining throughput of the trainer before and after a change, side by side in one run.

The same GPT shape, random-token batches and TrainConfig run through adl's Trainer from two
source trees: the working tree ("new") and a git revision ("old", exported with `git archive`
into a temporary folder). Each round runs both in fresh subprocesses, alternating which goes
first; a worker reports the Trainer's own tokens/s (median over its logging intervals, the
first dropped). Reported: each contender's median tokens/s and the median of the per-round
ratios new/old (which cancels slow drifts in machine load).

    python benchmarks/trainer_before_after.py --before 2e8f0ac                 # tiny recipe shape
    python benchmarks/trainer_before_after.py --before 2e8f0ac --shape bench   # 6L/384, vocab 50304
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=256, block_size=128, batch_size=16, vocab_size=2048, dropout=0.1),  # recipes/pretrain/tiny.toml
    "bench": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, vocab_size=50304, dropout=0.0),  # pretrain_throughput.py
}

WORKER = r"""
import json, sys, tempfile, torch
from pathlib import Path
from adl_cli.engine.trainer import TrainConfig, Trainer
from adl_cli.models.gpt import GPT, GPTConfig
shape, steps, precision, threads = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
B, T, V = shape["batch_size"], shape["block_size"], shape["vocab_size"]
model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=shape["dropout"]))
def batch_fn(step, micro, rank, world):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, V, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]
cfg = TrainConfig(steps=steps, batch_size=B, lr=1e-3, min_lr=1e-4, warmup=5, eval_every=0, checkpoint_every=0, keep_checkpoints=1, log_every=5, precision=precision)
with tempfile.TemporaryDirectory() as run:
    t = Trainer(model, cfg, run_dir=Path(run), batch_fn=batch_fn, loss_fn=lambda m, b: m(*b)[1], units_per_batch=B * T, progress=False)
    r = t.fit()
print(json.dumps({"tokens_per_s": r.units_per_s, "precision": r.precision, "loss": r.train_loss}))
"""


def export(rev: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "adl_cli"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_worker(tree: Path, shape: dict, steps: int, precision: str, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, "-c", WORKER, json.dumps(shape), str(steps), precision, str(threads)], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=900)
    if p.returncode:
        raise SystemExit(f"worker in {tree} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision of the old trainer (e.g. the last landed commit)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--precision", default="auto", help="auto (what adl pretrain runs) | fp32 | bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the rounds here")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        old = export(args.before, Path(tmp))
        for i in range(args.rounds):
            order = [("new", ROOT), ("old", old)] if i % 2 == 0 else [("old", old), ("new", ROOT)]
            got = {name: run_worker(tree, shape, args.steps, args.precision, args.threads) for name, tree in order}
            rounds.append(got)
            print(f"round {i + 1}: new {got['new']['tokens_per_s']:,.0f} tok/s, old {got['old']['tokens_per_s']:,.0f} tok/s, "
                  f"new/old {got['new']['tokens_per_s'] / got['old']['tokens_per_s']:.3f}  ({got['new']['precision']})", flush=True)
    new = statistics.median(r["new"]["tokens_per_s"] for r in rounds)
    old = statistics.median(r["old"]["tokens_per_s"] for r in rounds)
    ratio = statistics.median(r["new"]["tokens_per_s"] / r["old"]["tokens_per_s"] for r in rounds)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    print(f"\n{args.shape} shape {shape}, {args.steps} steps x {args.rounds} rounds, precision {args.precision}, {args.threads} threads, {cpu}")
    print(f"median tokens/s: new {new:,.0f}, old ({args.before}) {old:,.0f}; median per-round ratio new/old {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "before": args.before, "rounds": rounds, "ratio": ratio, "cpu": cpu}, indent=1))


if __name__ == "__main__":
    main()
