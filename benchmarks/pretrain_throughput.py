"""Pretraining throughput: adl's default training path vs a nanoGPT-style model vs transformers.

Same model shape for every contender (GPT-2 small-ish: 6 layers, 6 heads, width 384,
block 256, batch 8, vocab 50304, fp32, tied embeddings), same random-token batches, the
full optimizer step (forward, backward, clip ||g|| to 1, AdamW with decay groups, lr set
every step):

    adl       adl's GPT driven by adl's own Trainer with TrainConfig's defaults, exactly
              the loop `adl pretrain` runs (fused linear cross-entropy, fused AdamW,
              allocator tuning, no compile unless asked), precision pinned to fp32 like
              the others; timed from the Trainer's calls to the batch function, so every
              piece of the loop is inside the timing
    nanogpt   the reference: a plain eager nanoGPT-style model written here (SDPA
              attention, full logits + F.cross_entropy), for-each AdamW (nanoGPT uses the
              fused one only on CUDA), glibc's default allocator
    hf        transformers' GPT2LMHeadModel from a GPT2Config (random weights, SDPA
              attention), full logits + F.cross_entropy, for-each AdamW

Each contender runs in its own subprocess per round (so ru_maxrss is that contender's
own peak resident memory, and one contender's freed memory cannot help another), and the
rounds alternate the order. Warm-up steps are dropped. Reported: median tokens/s over all
timed steps, the ratio to the reference (median of the per-round ratios, which cancels
slow drifts in machine load), model-FLOPs utilisation = tokens/s x (6N + 12 L T C) /
measured fp32 matmul peak (best of a 1024^3 and a 2048^3 matmul, measured in this run at
the same thread count, before and after the contenders), and the peak RSS of each worker
(it includes the Python interpreter, torch and, for hf, transformers: the "after setup"
column is the RSS once the model and optimizer exist, before the first step).

Variants of adl for ablations: ``adl/key=value/...`` with keys chunk (loss_chunk_rows,
0 = full logits + F.cross_entropy), malloc (default = glibc's own allocator settings),
fused (0 = for-each AdamW), compile (1 = torch.compile), threads, precision (auto = the
Trainer's own choice, which is bf16 autocast where bf16 matmuls measure faster).

    python benchmarks/pretrain_throughput.py                       # 3 rounds x 10 steps
    python benchmarks/pretrain_throughput.py --quick               # a one-minute smoke run
    python benchmarks/pretrain_throughput.py --rounds 5 --json out.json
    python benchmarks/pretrain_throughput.py --contenders adl,adl/malloc=default,adl/chunk=0,nanogpt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, vocab_size=50304)
DESCRIPTIONS = {
    "adl": "adl Trainer defaults",
    "nanogpt": "reference, nanoGPT-style eager",
    "hf": "transformers GPT2LMHeadModel",
}
REFERENCE = "nanogpt"


# ---------------------------------------------------------------------------- contenders


def _batches(steps: int, cfg: dict):
    """The same random-token batches for every contender: (x, y) for step t."""
    import torch

    B, T, V = cfg["batch_size"], cfg["block_size"], cfg["vocab_size"]

    def batch(t: int):
        g = torch.Generator().manual_seed(1000 + t)
        xy = torch.randint(0, V, (B, T + 1), generator=g)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()

    return batch


def _nanogpt_model(cfg: dict):
    """A nanoGPT-style GPT-2 (written here, plain eager PyTorch): the reference."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    C, H = cfg["n_embd"], cfg["n_head"]

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(C, 3 * C)
            self.c_proj = nn.Linear(C, C)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(C), SelfAttention()
            self.ln_2 = nn.LayerNorm(C)
            self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class RefGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(cfg["vocab_size"], C)
            self.wpe = nn.Embedding(cfg["block_size"], C)
            self.h = nn.ModuleList(Block() for _ in range(cfg["n_layer"]))
            self.ln_f = nn.LayerNorm(C)
            self.lm_head = nn.Linear(C, cfg["vocab_size"], bias=False)
            self.lm_head.weight = self.wte.weight
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

        def forward(self, idx, targets):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return RefGPT()


def _hf_model(cfg: dict):
    import torch.nn.functional as F
    from torch import nn
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(
        vocab_size=cfg["vocab_size"],
        n_positions=cfg["block_size"],
        n_embd=cfg["n_embd"],
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    inner = GPT2LMHeadModel(hf_cfg)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, idx, targets):
            logits = self.inner(input_ids=idx).logits
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return Wrapped()


def _plain_loop(model, steps: int, warmup: int, batch) -> list[float]:
    """nanoGPT's training step: lr per group, forward, backward, clip, AdamW (for-each), zero."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=6e-4, betas=(0.9, 0.95)
    )
    model.train()
    stamps = []
    for it in range(warmup + steps):
        stamps.append(time.perf_counter())
        lr = 6e-4 * min(1.0, (it + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batch(it)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (it + 1) % 10 == 0:
            loss.item()
    stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]


def _parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    name, *opts = spec.split("/")
    options = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in ("chunk", "malloc", "fused", "compile", "threads", "precision") or not value:
            raise SystemExit(f"unknown adl variant option '{opt}' in '{spec}' (chunk=N, malloc=default, fused=0|1, compile=0|1, threads=N, precision=auto|fp32|bf16)")
        options[key] = value
    return name, options


def _adl_loop(cfg: dict, steps: int, warmup: int, batch, options: dict[str, str]) -> tuple[list[float], dict]:
    """adl's GPT through adl's Trainer, with TrainConfig's defaults (what `adl pretrain` runs)."""
    from adl_cli.engine.trainer import TrainConfig, Trainer
    from adl_cli.models import build_model
    from adl_cli.models.gpt import GPTConfig

    section = GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"], block_size=cfg["block_size"])
    if "chunk" in options:
        section.loss_chunk_rows = int(options["chunk"])
    gcfg = section.with_vocab(cfg["vocab_size"])
    model = build_model(gcfg)
    total = warmup + steps + 1
    # The benchmark's precision is fp32 for every contender (precision = "auto" may pick bf16
    # autocast on CPUs with fast bf16 matmuls: the variant adl/precision=auto shows it).
    tc = TrainConfig(steps=total, batch_size=cfg["batch_size"], eval_every=0, checkpoint_every=0, keep_checkpoints=1, precision=options.get("precision", "fp32"))
    if "fused" in options:
        tc.fused_adamw = options["fused"] not in ("0", "false", "no")
    if "compile" in options:
        tc.compile = options["compile"] not in ("0", "false", "no")
    stamps: list[float] = []

    def batch_fn(step, micro, rank, world):
        stamps.append(time.perf_counter())
        return batch(step)

    def loss_fn(m, b):
        return m(*b)[1]

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(
            model, tc, run_dir=Path(run_dir), batch_fn=batch_fn, loss_fn=loss_fn, units_per_batch=cfg["batch_size"] * cfg["block_size"], progress=False
        )
        rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        info = {"rss_setup_kb": rss_setup, "optimizer": trainer.optimizer_kind, "precision": trainer.precision, "compile": tc.compile, "loss_chunk_rows": gcfg.loss_chunk_rows}
        trainer.fit()
    times = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]
    return times[:steps], info


def worker(spec: str, steps: int, warmup: int, threads: int, cfg: dict) -> dict:
    name, options = _parse_variant(spec)
    if options.get("malloc") == "default":
        os.environ["ADL_MALLOC"] = "default"
    import torch

    torch.set_num_threads(int(options.get("threads", threads)))
    torch.manual_seed(0)
    batch = _batches(steps, cfg)
    info: dict = {}
    rss_setup = None
    if name == "adl":
        from adl_cli.engine.runtime import keep_freed_memory

        info["malloc"] = keep_freed_memory()  # the Trainer calls it too; here to record the outcome
        times, more = _adl_loop(cfg, steps, warmup, batch, options)
        rss_setup = more.pop("rss_setup_kb")
        info.update(more)
    elif name in ("nanogpt", "hf"):
        model = _nanogpt_model(cfg) if name == "nanogpt" else _hf_model(cfg)
        rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = _plain_loop(model, steps, warmup, batch)
        info.update(optimizer="foreach", precision="fp32", compile=False, malloc="glibc default")
    else:
        raise SystemExit(f"unknown contender '{name}' (adl, nanogpt, hf, adl/...)")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "spec": spec,
        "step_s": times,
        "maxrss_mb": ru.ru_maxrss / 1024,
        "rss_after_setup_mb": (rss_setup or 0) / 1024,
        "threads": torch.get_num_threads(),
        **info,
    }


# ---------------------------------------------------------------------------- driver


def _flops_per_token(cfg: dict) -> tuple[float, int]:
    """6N + 12 L T C from adl's GPT (N counts wte once: the tied lm_head matmul)."""
    import torch

    from adl_cli.models.gpt import GPT, GPTConfig

    with torch.device("meta"):
        m = GPT(GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg["block_size"], n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"]))
    return m.flops_per_token(cfg["block_size"]), m.num_params()


def _peak(threads: int, dtype: str = "float32") -> float:
    import torch

    from adl_cli.engine.runtime import measure_matmul_peak

    torch.set_num_threads(threads)
    dev, dt = torch.device("cpu"), getattr(torch, dtype)
    return max(measure_matmul_peak(dev, dt, n=1024, repeats=5), measure_matmul_peak(dev, dt, n=2048, repeats=3))


def _compute_dtype(info: dict) -> str:
    """The matmul dtype a contender computed in (MFU is measured against that dtype's peak)."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(info.get("precision", "fp32"), "float32")


def _run_worker(spec: str, args, cfg: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", spec, "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k != "ADL_MALLOC"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"contender {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contenders", default="adl,nanogpt,hf", help="comma list: adl, nanogpt, hf, adl/chunk=N/malloc=default/fused=0/compile=1")
    p.add_argument("--steps", type=int, default=10, help="timed steps per contender per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (per round; compile happens here)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every contender once, the order rotating")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default, one per core)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 3 steps after 1 warm-up step")
    p.add_argument("--json", type=Path, default=None, help="write all numbers here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    if args.threads <= 0:
        args.threads = torch.get_num_threads()
    if args.quick:
        args.steps, args.rounds, args.warmup = 3, 1, 1
    cfg = dict(CONFIG)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.threads, cfg)))
        return None

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    specs = [s.strip() for s in args.contenders.split(",") if s.strip()]
    for s in specs:
        _parse_variant(s)
    fpt, n_params = _flops_per_token(cfg)
    tokens_per_step = cfg["batch_size"] * cfg["block_size"]
    load0 = os.getloadavg()
    console.print(
        f"[bold]pretrain throughput[/]  {cfg['n_layer']}L/{cfg['n_head']}H/{cfg['n_embd']}, block {cfg['block_size']}, batch {cfg['batch_size']}, "
        f"vocab {cfg['vocab_size']}, fp32; {n_params / 1e6:.1f}M params, {fpt / 1e6:.1f} MFLOP/token; "
        f"{args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up), {args.threads} threads; load {load0[0]:.2f}"
    )
    peaks = [_peak(args.threads)]
    console.print(f"fp32 matmul peak: {peaks[0] / 1e9:.0f} GFLOP/s")
    results: dict[str, list[dict]] = {s: [] for s in specs}
    for r in range(args.rounds):
        order = specs[r % len(specs) :] + specs[: r % len(specs)]
        for spec in order:
            out = _run_worker(spec, args, cfg)
            results[spec].append(out)
            med = statistics.median(out["step_s"])
            console.print(f"  round {r + 1}: {spec:<22s} {tokens_per_step / med:8.0f} tokens/s   peak RSS {out['maxrss_mb']:6.0f} MB")
    peaks.append(_peak(args.threads))
    peak = max(peaks)
    dtype_peaks = {"float32": peak}
    for runs in results.values():
        dt = _compute_dtype(runs[0])
        if dt not in dtype_peaks:
            dtype_peaks[dt] = max(_peak(args.threads, dt) for _ in range(2))
            console.print(f"{dt} matmul peak: {dtype_peaks[dt] / 1e9:.0f} GFLOP/s")
    load1 = os.getloadavg()

    summary = {}
    ref = REFERENCE if REFERENCE in results else specs[0]
    for spec, runs in results.items():
        all_steps = [t for run in runs for t in run["step_s"]]
        per_round = [tokens_per_step / statistics.median(run["step_s"]) for run in runs]
        tps = tokens_per_step / statistics.median(all_steps)
        summary[spec] = {
            "tokens_per_s": tps,
            "tokens_per_s_rounds": per_round,
            "mfu": tps * fpt / dtype_peaks[_compute_dtype(runs[0])],
            "mfu_peak_dtype": _compute_dtype(runs[0]),
            "maxrss_mb": max(run["maxrss_mb"] for run in runs),
            "rss_after_setup_mb": statistics.median(run["rss_after_setup_mb"] for run in runs),
            "info": {k: v for k, v in runs[0].items() if k not in ("step_s", "maxrss_mb", "rss_after_setup_mb", "spec")},
            "step_s": [run["step_s"] for run in runs],
        }
    for spec, s in summary.items():
        ratios = [a / b for a, b in zip(s["tokens_per_s_rounds"], summary[ref]["tokens_per_s_rounds"])]
        s["ratio_vs_ref"] = statistics.median(ratios)
        s["ratio_vs_ref_rounds"] = ratios
        s["memory_vs_ref"] = s["maxrss_mb"] / summary[ref]["maxrss_mb"]

    table = Table(title=f"Pretraining throughput ({args.threads} threads, peak {peak / 1e9:.0f} GFLOP/s fp32; ratios vs {ref})")
    for col, just in (("contender", "left"), ("path", "left"), ("tokens/s", "right"), ("rounds", "right"), ("vs ref", "right"), ("MFU", "right"), ("peak RSS", "right"), ("after setup", "right"), ("mem vs ref", "right")):
        table.add_column(col, justify=just)
    for spec, s in summary.items():
        name = spec.split("/")[0]
        desc = DESCRIPTIONS.get(name, "") if spec == name else "variant: " + ", ".join(spec.split("/")[1:])
        table.add_row(
            spec,
            desc,
            f"{s['tokens_per_s']:,.0f}",
            " ".join(f"{v:,.0f}" for v in s["tokens_per_s_rounds"]),
            f"{s['ratio_vs_ref']:.2f}x",
            f"{s['mfu']:.0%}" + ("" if s["mfu_peak_dtype"] == "float32" else f" ({s['mfu_peak_dtype'][:4]})"),
            f"{s['maxrss_mb']:,.0f} MB",
            f"{s['rss_after_setup_mb']:,.0f} MB",
            f"{s['memory_vs_ref']:.2f}x",
        )
    console.print(table)
    console.print(f"[dim]load average {load0[0]:.2f} at start, {load1[0]:.2f} at end; peak measured {', '.join(f'{x / 1e9:.0f}' for x in peaks)} GFLOP/s[/]")
    report = {
        "config": cfg,
        "flops_per_token": fpt,
        "params": n_params,
        "tokens_per_step": tokens_per_step,
        "threads": args.threads,
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_flops": peak,
        "peak_flops_by_dtype": dtype_peaks,
        "peak_flops_measured": peaks,
        "load_average": [load0[0], load1[0]],
        "reference": ref,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count()},
        "contenders": summary,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        console.print(f"[dim]numbers written to {args.json}[/]")
    return report


if __name__ == "__main__":
    main()
