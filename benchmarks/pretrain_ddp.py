"""Data-parallel throughput of adl's trainer: 1 process vs N DDP processes.

Runs the real training loop (engine/trainer.py on accelerate: DDP over gloo on CPUs,
NCCL on GPUs) on a synthetic token batch, each configuration in freshly spawned
processes, and reports training tokens/s (median over steady steps), tokens/s per
process and the scaling efficiency  eff = tok/s(N procs) / (N x tok/s(1 proc)).

Configurations, alternated for --repeats rounds (medians):
    1 proc x T threads           the per-worker reference (weak scaling)
    N procs x T threads (DDP)    the same work per process, N times the global batch
    1 proc x N*T threads         the same cores in one process (CPU only): is DDP worth it here?

    python benchmarks/pretrain_ddp.py --preset cpu-tiny --procs 2 --steps 8
    python benchmarks/pretrain_ddp.py --preset gpt2-124m --procs 8      # 8 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_ablation import PRESETS  # noqa: E402  (the same model shapes as the ladder)


def _worker(rank: int, world: int, port: int, threads: int, preset: str, steps: int, vocab: int, out: str, precision: str, compile_: bool) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if world > 1:  # one process runs plain, without a process group
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    torch.set_num_threads(threads)
    from adl_cli.engine.trainer import TrainConfig, Trainer
    from adl_cli.models.gpt import GPT, GPTConfig

    n_layer, n_head, n_embd, block, batch = PRESETS[preset]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd))

    def batch_fn(step, micro, r, w):
        g = torch.Generator().manual_seed(1000 * step + r)
        x = torch.randint(0, vocab, (batch, block + 1), generator=g)
        return x[:, :-1], x[:, 1:]

    cfg = TrainConfig(steps=steps, batch_size=batch, warmup=1, eval_every=0, checkpoint_every=0, log_every=1, precision=precision, compile=compile_, keep_checkpoints=1)
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(model, cfg, run_dir=Path(tmp), batch_fn=batch_fn, loss_fn=lambda m, b: m(*b)[1], units_per_batch=batch * block, progress=False)
        res = t.fit()
    if rank == 0:
        rates = [row["tokens_per_s"] for row in res.history[1:] if row["tokens_per_s"]]  # step 1 (warm-up / compile) left out
        Path(out).write_text(json.dumps({"tokens_per_s": statistics.median(rates), "world": world, "device": res.device}))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip the slow interpreter teardown


def measure(world: int, threads: int, args, port: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        t0 = time.perf_counter()
        mp.start_processes(
            _worker, args=(world, port, threads, args.preset, args.steps, args.vocab, str(out), args.precision, args.compile), nprocs=world, start_method="spawn"
        )
        res = json.loads(out.read_text())
        res["wall_s"] = time.perf_counter() - t0
        return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--port", type=int, default=29651, help="MASTER_PORT (fixed: a derived port once hung the rendezvous)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda and args.procs > torch.cuda.device_count():
        ap.error(f"--procs {args.procs} > {torch.cuda.device_count()} GPUs")

    configs = [("1 process", 1, args.threads), (f"{args.procs} processes, DDP", args.procs, args.threads)]
    if not cuda:
        configs.append(("1 process, same cores", 1, args.procs * args.threads))
    rates: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    for rep in range(args.repeats):
        order = configs if rep % 2 == 0 else configs[::-1]
        for name, world, threads in order:
            r = measure(world, threads, args, args.port)
            rates[name].append(r["tokens_per_s"])
            print(f"  round {rep + 1}: {name:22s} {r['tokens_per_s']:10,.0f} tokens/s  ({r['wall_s']:.1f} s incl. start-up)", file=sys.stderr, flush=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    one, many = med[configs[0][0]], med[configs[1][0]]
    n_layer, n_head, n_embd, block, batch = PRESETS[args.preset]
    lines = [
        f"GPT {n_layer}L/{n_head}H/{n_embd}, block {block}, batch {batch} per process, vocab {args.vocab}; "
        f"{'GPUs' if cuda else f'CPU, {args.threads} thread(s) per process'}; median of {args.repeats} alternating rounds x {args.steps} steps",
        "",
        "| configuration | tokens/s | tokens/s per process | scaling efficiency |",
        "|---|---:|---:|---:|",
    ]
    result = {"preset": args.preset, "procs": args.procs, "threads": args.threads, "steps": args.steps, "repeats": args.repeats, "rates": rates, "median": med}
    for name, world, threads in configs:
        eff = med[name] / (world * one) if world > 1 else None
        label = name if cuda else f"{name} ({threads} thread{'s' if threads > 1 else ''} each)" if world > 1 else f"{name} ({threads} thread{'s' if threads > 1 else ''})"
        lines.append(f"| {label} | {med[name]:,.0f} | {med[name] / world:,.0f} | {'' if eff is None else f'{100 * eff:.0f}%'} |")
    result["scaling_efficiency"] = many / (args.procs * one)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
