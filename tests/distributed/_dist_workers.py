"""Process bodies and a launcher for the distributed tests (a module of its own so that
spawned processes can import it).

Each launch fixes MASTER_PORT (a port derived from a hash once differed between parent and
children and the rendezvous hung) and runs every process on one thread."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def no_peak_measurement() -> None:
    """The trainer measures the matmul peak (MFU's roof) at each start: a second of pure
    overhead for these tests, whose MFU nobody reads."""
    from adl_cli.engine import trainer

    trainer.matmul_peak = lambda *args, **kwargs: 1e12


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _traced_trainer(digests: list[str], sigint_at: dict) -> None:
    """Record weight digests after each step; send this process a SIGINT during step
    ``sigint_at['step']`` when ``sigint_at['rank']`` is this rank (a Ctrl-C seen by one rank)."""
    from adl_cli.engine.trainer import Trainer

    step = Trainer._train_step

    def traced(self, t, interval):
        rank = self.acc.process_index
        if sigint_at.get("rank") == rank and sigint_at.get("step") == t:
            os.kill(os.getpid(), signal.SIGINT)
        units = step(self, t, interval)
        if not self.sharded:
            digests.append(weights_digest(self.raw_model))
        return units

    Trainer._train_step = traced


def scenario(rank: int, world: int, port: int, recipe: str, root: str) -> None:
    """One launch, three runs of the same recipe in the same processes (a launch costs
    seconds): root/ddp (weight digests after every step in root/ddp/digests.<rank>.json),
    root/fsdp, root/fsdp-resumed (FSDP resuming a copy of root/fsdp's step-3 checkpoint) and
    root/fsdp-fp16 (3 steps with the sharded grad scaler), then root/ddp-ctrl-c, where only
    rank 1 receives a Ctrl-C (both ranks must stop after the same step)."""
    _env(rank, world, port)
    import torch.distributed as dist

    from adl_cli.errors import Interrupted
    from adl_cli.methods.pretrain import load_pretrain_recipe, run_pretrain

    no_peak_measurement()
    digests: list[str] = []
    sigint_at: dict = {}
    _traced_trainer(digests, sigint_at)
    quiet = dict(progress=False, log=lambda *a, **k: None)
    ddp, fsdp, again = Path(root, "ddp"), Path(root, "fsdp"), Path(root, "fsdp-resumed")
    run_pretrain(load_pretrain_recipe(recipe, ["train.distributed=ddp"]), ddp, **quiet)
    (ddp / f"digests.{rank}.json").write_text(json.dumps(digests))
    rec = load_pretrain_recipe(recipe, ["train.distributed=fsdp"])
    run_pretrain(rec, fsdp, **quiet)
    if rank == 0:
        (again / "checkpoints").mkdir(parents=True)
        shutil.copytree(fsdp / "checkpoints" / "step-3", again / "checkpoints" / "step-3")
        shutil.copy(fsdp / "config.json", again / "config.json")
    dist.barrier()
    run_pretrain(rec, again, resume=True, **quiet)
    fp16 = ["train.distributed=fsdp", "train.precision=fp16", "train.steps=3", "train.checkpoint_every=0"]
    run_pretrain(load_pretrain_recipe(recipe, fp16), Path(root, "fsdp-fp16"), **quiet)
    sigint_at.update(rank=1, step=1)  # only rank 1 sees Ctrl-C, during the second step
    try:
        run_pretrain(load_pretrain_recipe(recipe, ["train.checkpoint_every=0"]), Path(root, "ddp-ctrl-c"), **quiet)
        outcome = "finished"
    except Interrupted as e:
        outcome = f"interrupted: {e}"
    Path(root, f"ddp-ctrl-c.{rank}.txt").write_text(outcome)
    dist.barrier()
    sigint_at.clear()
    t, result = masked_run(Path(root, "masked"), grad_accum=1)
    if rank == 0:
        from adl_cli.engine.checkpoint import save_safetensors

        save_safetensors({k: v.detach().cpu().contiguous() for k, v in t.raw_model.state_dict().items() if k != "lm_head.weight"},
                         Path(root, "masked", "weights.safetensors"))
        Path(root, "masked", "result.json").write_text(json.dumps({"units": result.units, "history": result.history}))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip torch's slow interpreter teardown (seconds per process on a busy machine)


MASKED_KEEP = (3, 29)  # trained tokens (of 32) in global slices 0 and 1: a masked loss over very unequal micro-batches


def masked_batch(step, micro, rank, world):
    """Slice ``micro * world + rank`` of step's global batch of two sequences, targets masked to
    MASKED_KEEP[slice] tokens (an SFT-like batch whose micro-batches train unequal counts)."""
    piece = micro * world + rank
    g = torch.Generator().manual_seed(100 * step + piece)
    x = torch.randint(0, 61, (2, 17), generator=g)
    y = x[:, 1:].clone()
    y.view(-1)[MASKED_KEEP[piece]:] = -100
    return x[:, :-1], y


def masked_run(run_dir: Path, grad_accum: int):
    """A GPT trained 3 SGD steps on ``masked_batch`` with the global token count as the unit and a
    metric from the loss; the same global batch whatever the world size."""
    from adl_cli.engine.trainer import TrainConfig, Trainer
    from adl_cli.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, block_size=16, n_layer=1, n_head=2, n_embd=16))
    cfg = TrainConfig(steps=3, batch_size=2, grad_accum=grad_accum, optimizer="sgd", momentum=0.0, lr=0.5, min_lr=0.5, warmup=0,
                      grad_clip=0.0, weight_decay=0.0, eval_every=0, checkpoint_every=0, log_every=1, precision="fp32", seed=1)

    def loss(m, b):
        value = m(*b)[1]
        return value, {"twice": 2 * value.detach()}

    t = Trainer(model, cfg, run_dir=run_dir, batch_fn=masked_batch, loss_fn=loss, units_fn=lambda b: int((b[1] != -100).sum()),
                units_per_batch=2 * 16, progress=False)
    result = t.fit()
    return t, result


def launch(fn, args: tuple, nprocs: int = 2, timeout: float = 120.0) -> None:
    """Run fn(rank, *args) in ``nprocs`` spawned processes; fail (not hang) past ``timeout``."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed processes did not finish within {timeout:.0f} s")


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def sft_scenario(rank: int, world: int, port: int, recipe: str, out: str) -> None:
    """`adl sft`'s method on ``world`` processes (DDP over gloo), fp32, no base evaluation."""
    _env(rank, world, port)
    import torch.distributed as dist

    from adl_cli.methods.sft import load_sft_recipe, run_sft

    no_peak_measurement()
    try:
        run_sft(load_sft_recipe(recipe), Path(out), progress=False, log=lambda *a, **k: None, evaluate_base=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def dpo_scenario(rank: int, world: int, port: int, recipe: str, out: str) -> None:
    """`adl rlhf dpo`'s method on ``world`` processes (DDP over gloo), fp32."""
    _env(rank, world, port)
    import torch.distributed as dist

    from adl_cli.methods.rlhf.dpo import load_dpo_recipe, run_dpo

    no_peak_measurement()
    try:
        run_dpo(load_dpo_recipe(recipe), Path(out), progress=False, log=lambda *a, **k: None, evaluate_base=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def rl_scenario(rank: int, world: int, port: int, method: str, recipe: str, out: str) -> None:
    """`adl rlhf ppo` or `adl rlhf grpo`'s method on ``world`` processes (DDP over gloo), fp32."""
    _env(rank, world, port)
    import torch.distributed as dist

    from adl_cli.methods.rlhf import grpo, ppo

    no_peak_measurement()
    load, run = (ppo.load_ppo_recipe, ppo.run_ppo) if method == "ppo" else (grpo.load_grpo_recipe, grpo.run_grpo)
    try:
        run(load(recipe), Path(out), progress=False, log=lambda *a, **k: None, evaluate_base=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
