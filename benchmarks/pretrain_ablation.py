"""The GPT-2 reproduction's speed ladder, one rung at a time, on the machine it runs on.

    fp32 -> +TF32 -> +bf16 autocast -> +torch.compile -> +flash attention (SDPA instead of
    naive softmax(QK^T)V) -> +vocab padded 50257 -> 50304 -> +fused AdamW

Each rung adds one change to the previous rung and times full training steps (forward,
backward, clip, AdamW) of adl's GPT on a fixed random batch: ms/step, tokens/s and
model-FLOPs utilisation (6N + 12LTC FLOPs per token) against a roof: the card's dense
bf16 peak on a GPU (--peak-tflops, 989 for H100/H200 SXM), the measured fp32 matmul
peak on a CPU. A rung that does not apply here is shown as such (TF32 on a CPU), never
faked. bf16 is always measured and shown; with --keep auto (the default) it is carried
into the later rungs only where the hardware has fast bf16 (a GPU, a CPU with AMX: adl's
precision="auto" rule), so on other CPUs the later rungs build on fp32; with --keep all
the ladder is strictly cumulative.

Noise: all rungs are built and warmed up first, then timed in rounds that alternate the
rungs (--repeats rounds of --steps steps each); the table shows medians.

    python benchmarks/pretrain_ablation.py                       # cpu-small, this CPU
    python benchmarks/pretrain_ablation.py --preset cpu-tiny --repeats 3 --steps 3
    python benchmarks/pretrain_ablation.py --preset gpt2-124m --json ladder.json   # a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adl_cli.engine.runtime import fast_bf16, matmul_peak  # noqa: E402
from adl_cli.models.gpt import GPT, GPTConfig  # noqa: E402

PRESETS = {
    # name: (n_layer, n_head, n_embd, block, batch)
    "cpu-tiny": (2, 2, 128, 128, 4),
    "cpu-mini": (4, 4, 256, 128, 8),
    "cpu-small": (6, 6, 384, 256, 8),  # FACTS.md's CPU reference model
    "gpt2-124m": (12, 12, 768, 1024, 16),  # the ladder's shape; the recipe itself uses batch 64
}

RUNGS = [
    ("fp32", "baseline: fp32, naive attention, vocab 50257, for-each AdamW"),
    ("tf32", "+ TF32 matmuls (torch.set_float32_matmul_precision('high'))"),
    ("bf16", "+ bf16 autocast"),
    ("compile", "+ torch.compile"),
    ("flash", "+ SDPA (flash attention on CUDA) instead of naive attention"),
    ("vocab", "+ vocab padded 50257 -> 50304"),
    ("fused", "+ fused AdamW"),
]


@dataclass
class Setup:
    tf32: bool = False
    bf16: bool = False
    compile: bool = False
    attention: str = "naive"
    vocab: int = 50257
    fused: bool = False

    def with_rung(self, rung: str) -> Setup:
        s = Setup(**self.__dict__)
        if rung == "tf32":
            s.tf32 = True
        elif rung == "bf16":
            s.bf16 = True
        elif rung == "compile":
            s.compile = True
        elif rung == "flash":
            s.attention = "sdpa"
        elif rung == "vocab":
            s.vocab = 50304
        elif rung == "fused":
            s.fused = True
        return s


@dataclass
class Rung:
    name: str
    what: str
    setup: Setup
    applies: bool = True
    note: str = ""
    times: list[float] = field(default_factory=list)
    compile_s: float | None = None
    kept: bool = True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    torch.set_float32_matmul_precision("high" if on else "highest")


class Runner:
    """One rung's model, optimizer and step function."""

    def __init__(self, setup: Setup, shape, device: torch.device, loss_chunk_rows: int, seed: int = 0):
        n_layer, n_head, n_embd, block, batch = shape
        self.setup, self.device, self.batch, self.block = setup, device, batch, block
        torch.manual_seed(seed)
        cfg = GPTConfig(vocab_size=setup.vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, attention=setup.attention, loss_chunk_rows=loss_chunk_rows)
        self.model = GPT(cfg).to(device)
        self.flops_per_token = self.model.flops_per_token(block)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        other = [p for p in self.model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
        kw = {"fused": True} if setup.fused else {"foreach": True}
        self.opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, **kw)
        self.fn = torch.compile(self.model) if setup.compile else self.model
        g = torch.Generator().manual_seed(seed)
        data = torch.randint(0, 50257, (batch, block + 1), generator=g)
        self.x, self.y = data[:, :-1].to(device), data[:, 1:].to(device)

    def step(self) -> float:
        set_tf32(self.setup.tf32)
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.setup.bf16 else torch.autocast(self.device.type, enabled=False)
        with ctx:
            loss = self.fn(self.x, self.y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def timed(self, steps: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        sync(self.device)
        dt = (time.perf_counter() - t0) / steps
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"non-finite loss in {self.setup}")
        return dt


def peak_flops(device: torch.device, peak_tflops: float | None) -> tuple[float, str]:
    if peak_tflops:
        return peak_tflops * 1e12, f"{peak_tflops:g} TFLOP/s (given)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
        for key, value in known.items():
            if key in name:
                return value, f"{value / 1e12:g} TFLOP/s ({name} dense bf16 peak)"
        p = matmul_peak(device, torch.bfloat16)
        return p, f"{p / 1e12:.1f} TFLOP/s (measured bf16 matmul)"
    p = matmul_peak(device, torch.float32)
    return p, f"{p / 1e9:.0f} GFLOP/s (measured fp32 matmul, {torch.get_num_threads()} threads)"


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = list(PRESETS[args.preset])
    if args.batch:
        shape[4] = args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    loss_chunk = args.loss_chunk_rows if args.loss_chunk_rows is not None else (0 if device.type == "cuda" else 256)
    tokens = shape[3] * shape[4]

    rungs: list[Rung] = []
    for name, what in RUNGS:
        r = Rung(name, what, Setup())
        if name == "tf32" and device.type != "cuda":
            r.applies, r.note, r.kept = False, "n/a on CPU", False
        elif name == "compile" and args.no_compile:
            r.applies, r.note, r.kept = False, "skipped (--no-compile)", False
        rungs.append(r)

    # Each rung builds on the last kept one. With --keep auto, bf16 is measured everywhere but
    # carried forward only where the hardware has fast bf16 (adl's precision="auto" rule).
    runners: dict[str, Runner] = {}
    base = Setup()
    for r in rungs:
        if not r.applies:
            continue
        r.setup = base if r.name == "fp32" else base.with_rung(r.name)
        if r.name == "bf16" and args.keep == "auto" and not fast_bf16(device):
            r.kept, r.note = False, "measured, not kept: adl's precision=auto rule (runtime.fast_bf16) says fp32 on this hardware"
        print(f"  building {r.name:8s} {r.setup}", file=sys.stderr, flush=True)
        runner = Runner(r.setup, shape, device, loss_chunk)
        t0 = time.perf_counter()
        runner.step()  # compile (if any) and allocator warm-up
        sync(device)
        if r.setup.compile:
            r.compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            runner.step()
        runners[r.name] = runner
        if r.kept:
            base = r.setup

    peaks = []
    for rep in range(args.repeats):
        order = [r for r in rungs if r.applies]
        if rep % 2:
            order.reverse()
        for r in order:
            r.times.append(runners[r.name].timed(args.steps))
        if not args.peak_tflops:  # the roof measured in every round, under the same load as the steps
            peaks.append(peak_flops(device, None))
        print(f"  round {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    if peaks and device.type != "cuda":
        values = sorted(p for p, _ in peaks)
        peak = statistics.median(values)
        peak_note = f"{peak / 1e9:.0f} GFLOP/s (fp32 matmul, median of {len(values)} measurements between rounds: {', '.join(f'{v / 1e9:.0f}' for v in values)}; {torch.get_num_threads()} threads)"
    else:
        peak, peak_note = peak_flops(device, args.peak_tflops)
    rows = []
    fp32_ms = None
    for r in rungs:
        row = {"rung": r.name, "what": r.what, "applies": r.applies, "kept": r.kept, "note": r.note, "setup": r.setup.__dict__}
        if r.applies:
            ms = statistics.median(r.times) * 1e3
            fp32_ms = fp32_ms or ms
            tps = tokens / (ms / 1e3)
            row.update(ms_per_step=ms, tokens_per_s=tps, mfu=tps * runners[r.name].flops_per_token / peak, speedup_vs_fp32=fp32_ms / ms, times_ms=[t * 1e3 for t in r.times], compile_s=r.compile_s)
        rows.append(row)
    return {
        "preset": args.preset,
        "shape": dict(zip(("n_layer", "n_head", "n_embd", "block_size", "batch_size"), shape)),
        "tokens_per_step": tokens,
        "loss_chunk_rows": loss_chunk,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "peak": peak_note,
        "repeats": args.repeats,
        "steps_per_round": args.steps,
        "keep": args.keep,
        "rungs": rows,
    }


def render(res: dict) -> str:
    s = res["shape"]
    lines = [
        f"GPT {s['n_layer']}L/{s['n_head']}H/{s['n_embd']}, block {s['block_size']}, batch {s['batch_size']} ({res['tokens_per_step']:,} tokens/step) on {res['device']}; torch {res['torch']}",
        f"median of {res['repeats']} alternating rounds x {res['steps_per_round']} steps; MFU against {res['peak']}; rungs kept: {res['keep']}",
        "",
        f"| rung | change | ms/step | tokens/s | MFU | vs fp32 | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in res["rungs"]:
        if not r["applies"]:
            lines.append(f"| {r['rung']} | {r['what']} | - | - | - | - | {r['note']} |")
            continue
        note = r["note"]
        if r.get("compile_s"):
            note = (note + "; " if note else "") + f"compile {r['compile_s']:.1f} s (first step, not timed)"
        lines.append(
            f"| {r['rung']} | {r['what']} | {r['ms_per_step']:,.0f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {r['speedup_vs_fp32']:.2f}x | {note} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    ap.add_argument("--batch", type=int, help="override the preset's batch size")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per rung per round")
    ap.add_argument("--repeats", type=int, default=3, help="alternating timing rounds (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    ap.add_argument("--keep", choices=("auto", "all"), default="auto", help="auto: carry bf16 into later rungs only where the hardware has fast bf16; all: strictly cumulative")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rung (its first step can take minutes on a CPU)")
    ap.add_argument("--loss-chunk-rows", type=int, help="adl's fused loss chunk (default: 256 on CPU, 0 = plain logits on GPU)")
    ap.add_argument("--peak-tflops", type=float, help="the roof for MFU (default: known card peak, else measured)")
    ap.add_argument("--threads", type=int, help="torch threads (CPU)")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    res = run(args)
    print(render(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
