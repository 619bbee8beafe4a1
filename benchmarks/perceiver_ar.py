"""Perceiver AR against the GPT at equal training compute, in bits per byte on the main job's
held-out split.

Contenders (each an ordinary `adl pretrain` run, in alternating order seed by seed):

    gpt-128        recipes/pretrain/tiny.toml's 3 x 192 GPT, made plain (tied embeddings, no U-net
                   skips, no zero-initialised projections) so that only the attention differs
    gpt-512        the same GPT with a 512-token context (4 windows a step: the same tokens)
    perceiver-ar   recipes/pretrain/perceiver-ar.toml: a 512-token window, 128 latents, one
                   cross-attention + 2 latent layers, 192 wide

Equal compute: every contender gets the training FLOPs of ``--fraction`` x the tiny recipe's 1,750
steps of gpt-128, counted by each model's ``flops_per_token`` (the trainer's MFU convention: 6 x
the weights' multiply-adds + 12 x the attention's, per token the trainer counts); steps = budget /
FLOPs per step. Scoring: the same held-out targets for all three (every target after the split's
first 384 tokens: windows of 512 advancing by 128 score their last 128 positions, so every scored
token has 384 to 511 tokens of context; gpt-128 scores them with its own 0-127), in fp32.

    python benchmarks/perceiver_ar.py --json benchmarks/perceiver-ar.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ["model.unet_skips=false", "model.zero_init_proj=false", "model.tie_embeddings=true"]
CONTENDERS = {
    "gpt-128": ("recipes/pretrain/tiny.toml", PLAIN),
    "gpt-512": ("recipes/pretrain/tiny.toml", PLAIN + ["model.block_size=512", "train.batch_size=4"]),
    "perceiver-ar": ("recipes/pretrain/perceiver-ar.toml", []),
}
LATENTS, LONG = 128, 512
TINY_STEPS = 1750


def flops_per_step(recipe: Path, sets: list[str], vocab: int) -> tuple[float, int, int]:
    """(training FLOPs per step, block, batch) of a recipe with ``sets``."""
    from adl_cli.methods.pretrain import load_pretrain_recipe
    from adl_cli.models import build_model

    r = load_pretrain_recipe(recipe, sets)
    cfg = r.model.with_vocab(vocab)
    model = build_model(cfg)
    return model.flops_per_token(cfg.block_size) * cfg.block_size * r.train.batch_size, cfg.block_size, r.train.batch_size


def train(recipe: Path, out: Path, sets: list[str]) -> dict:
    extra = [a for s in sets for a in ("--set", s)]
    p = subprocess.run([sys.executable, "-m", "adl_cli", "pretrain", str(recipe), "--out", str(out), "--no-progress", *extra], cwd=ROOT,
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{recipe} failed:\n{p.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def score(run: Path, val, tokenizer) -> tuple[float, float, int]:
    """(loss in nats, bits per byte, targets scored) on the held-out targets after the first LONG - LATENTS tokens."""
    import torch

    from adl_cli.methods.pretrain import split_loss
    from adl_cli.runs import load_run

    model = load_run(run).model.eval()
    skip = LONG - LATENTS
    with torch.no_grad():
        if model.config.block_size >= LONG:
            loss = split_loss(model, val, model.config.block_size, 16, None, score_last=LATENTS)
        else:  # a short context scores the same targets from its own windows
            loss = split_loss(model, val[skip:], model.config.block_size, 16, None)
    targets = val[skip + 1:]
    return loss, loss / math.log(2) * len(targets) / tokenizer.token_bytes(targets), len(targets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=1.0, help="the budget as a fraction of the tiny recipe's compute")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    from adl_cli.data.tokens import load_tokens
    from adl_cli.methods.pretrain import load_pretrain_recipe

    data = load_tokens(load_pretrain_recipe(ROOT / "recipes/pretrain/tiny.toml").data)
    vocab = data.tokenizer.vocab_size
    per_step = {name: flops_per_step(ROOT / rec, sets, vocab) for name, (rec, sets) in CONTENDERS.items()}
    budget = args.fraction * TINY_STEPS * per_step["gpt-128"][0]
    rows: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    names = list(CONTENDERS)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for name in (names if seed % 2 == 0 else names[::-1]):
                rec, sets = CONTENDERS[name]
                f, block, batch = per_step[name]
                steps = max(1, round(budget / f))
                out = Path(tmp) / f"{name}-{seed}"
                t0 = time.perf_counter()
                s = train(ROOT / rec, out, sets + [f"train.steps={steps}", f"train.seed={1337 + seed}", "train.eval_every=0",
                                                   "train.checkpoint_every=0"])
                loss, bpb, n = score(out, data.val, data.tokenizer)
                predicted = steps * batch * (LATENTS if name == "perceiver-ar" else block)
                rows[name].append({"seed": seed, "steps": steps, "flops": steps * f, "train_s": s["train_wall_s"], "parameters": s["parameters"],
                                   "tokens_read": s["tokens"], "tokens_predicted": predicted, "val_loss": loss, "val_bpb": bpb, "scored": n,
                                   "run_val_bpb": s["val_bits_per_byte"], "wall_s": time.perf_counter() - t0})
                print(f"{name} seed {seed}: {steps} steps, {s['train_wall_s']:.0f} s, val {bpb:.4f} bits per byte on {n:,} targets", flush=True)
    med = statistics.median
    table = {name: {"steps": r[0]["steps"], "parameters": r[0]["parameters"], "tflops": r[0]["flops"] / 1e12,
                    "tokens_predicted": r[0]["tokens_predicted"], "train_s": med(x["train_s"] for x in r),
                    "val_bpb": med(x["val_bpb"] for x in r), "runs": r} for name, r in rows.items()}
    print(f"\nequal training compute: {budget / 1e12:.1f} TFLOP each ({args.fraction:g} x the tiny recipe's); "
          f"bits per byte on the same {rows['gpt-128'][0]['scored']:,} held-out targets, median of {args.seeds} seed(s)")
    print(f"{'contender':<14}{'params':>10}{'steps':>7}{'predicted':>11}{'train s':>9}{'val bpb':>9}{'vs gpt-128':>12}")
    base = table["gpt-128"]["val_bpb"]
    for name, t in table.items():
        print(f"{name:<14}{t['parameters']:>10,}{t['steps']:>7}{t['tokens_predicted']:>11,}{t['train_s']:>9.0f}{t['val_bpb']:>9.4f}"
              f"{t['val_bpb'] - base:>+12.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"budget_tflop": budget / 1e12, "fraction": args.fraction, "seeds": args.seeds,
                                               "contenders": table}, indent=1))


if __name__ == "__main__":
    main()
