"""The one training loop, on accelerate.

It takes a model, a batch function and a loss function and knows nothing of tokens
beyond a throughput unit; pretraining, fine-tuning, vision and self-supervised labs all
run through it. Per optimizer step t:

    for m in range(grad_accum):          # micro-batches; DDP syncs only on the last
        loss_m = loss_fn(model, batch_fn(t, m, rank, world)) / grad_accum
        backward(loss_m)                 # scaled when fp16
    clip ||g|| to grad_clip;  lr = schedule(t);  AdamW step

Batches are a pure function of (step, micro, rank, world), so the data position is the
step itself and resuming is exact. Checkpoints (weights, optimizer, RNG, step) are written
atomically; Ctrl-C finishes the current step, writes one and exits; a non-finite loss stops
the run with the last good checkpoint kept.

Several processes (torchrun / accelerate launch): each rank takes its slice of every
global batch; ``train.distributed`` picks DDP or FSDP2 (engine/distributed.py). The global
batch is batch_size x grad_accum x world, or fixed by ``train.global_batch_tokens`` (then
grad_accum is derived from the world size). Losses are averaged over ranks; only the main
process logs, prints and writes; checkpoints always hold the full, unsharded state, so a
run resumes under any world size or strategy. With several processes Ctrl-C takes effect
at the next logging step, where the ranks agree on it.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adl_cli.engine import checkpoint as ckpt
from adl_cli.engine import distributed as dist_
from adl_cli.engine.distributed import STRATEGIES
from adl_cli.engine.optim import lr_at, make_adamw
from adl_cli.engine.runtime import autocast_dtype, keep_freed_memory, matmul_peak, resolve_precision, seed_everything
from adl_cli.errors import AdlError, Interrupted


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1  # micro-steps per optimizer step, per process: global batch = batch_size * grad_accum * world
    global_batch_tokens: int = 0  # > 0: fixed global batch in tokens; grad_accum is derived from the world size (and ignored)
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    fused_adamw: bool = True
    tf32: bool = False  # CUDA: TF32 matmuls for fp32 work (no effect on CPU)
    distributed: str = "ddp"  # ddp | fsdp (FSDP2 full shard); nothing to do with one process
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 20
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 1337

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"train.lr must be > 0 and 0 <= train.min_lr <= train.lr (got lr={self.lr}, min_lr={self.min_lr})")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be one of auto, fp32, bf16, fp16, got '{self.precision}'")
        if self.global_batch_tokens < 0:
            raise ValueError(f"train.global_batch_tokens must be >= 0 (0 = use train.grad_accum), got {self.global_batch_tokens}")
        if self.distributed not in STRATEGIES:
            from adl_cli.errors import closest

            raise ValueError(f"train.distributed must be one of {', '.join(STRATEGIES)}, got '{self.distributed}'{closest(self.distributed, STRATEGIES)}")


@dataclass
class TrainResult:
    steps: int
    units: int
    unit: str
    wall_s: float
    units_per_s: float
    train_loss: float
    val_loss: float | None
    mfu: float | None
    precision: str
    optimizer: str
    compile_s: float | None
    device: str
    world_size: int
    history: list[dict[str, Any]] = field(default_factory=list)
    grad_accum: int = 1
    parallel: str = "none"  # none | ddp | fsdp
    tf32: str = "off"
    peak_dtype: str = "float32"  # the dtype whose measured matmul peak MFU is relative to
    resumed_from: int | None = None  # the step this session started from, when it resumed


class StopRequested(Exception):
    pass


class _SigintGuard:
    """First Ctrl-C (SIGINT) or SIGTERM (what SLURM and Kubernetes send) asks the loop to stop
    after the current step and checkpoint; a second one interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = "Ctrl-C"
        self.exit_code = 130
        self._old: dict = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.exit_code = 128 + int(signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _accelerator():
    return dist_.make_accelerator()


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        *,
        run_dir: Path,
        batch_fn: Callable[[int, int, int, int], tuple],
        loss_fn: Callable[[nn.Module, tuple], torch.Tensor],
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        units_per_batch: int,
        unit: str = "tokens",
        flops_per_unit: float | None = None,
        accelerator=None,
        progress: bool = True,
        state_extra: dict[str, Any] | None = None,
        grad_accum: int | None = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.batch_fn, self.loss_fn, self.eval_fn = batch_fn, loss_fn, eval_fn
        self.unit, self.units_per_batch, self.flops_per_unit = unit, units_per_batch, flops_per_unit
        self.acc = accelerator or _accelerator()
        self.show_progress = progress and self.acc.is_main_process
        self.state_extra = state_extra or {}
        self.device = self.acc.device
        self.precision = resolve_precision(cfg.precision, self.device)
        self.amp_dtype = autocast_dtype(self.precision)
        self.tf32 = dist_.set_tf32(cfg.tf32, self.device)
        world = self.acc.num_processes
        self.grad_accum = grad_accum or dist_.resolve_grad_accum(
            cfg.global_batch_tokens, cfg.grad_accum, world, cfg.batch_size, max(1, units_per_batch // cfg.batch_size), unit
        )
        self.parallel = "none" if world == 1 else cfg.distributed
        self.sharded = self.parallel == "fsdp"
        keep_freed_memory()  # glibc: reuse freed step buffers instead of re-faulting them (ADL_MALLOC=default opts out)
        self.raw_model = model.to(self.device)
        fused = cfg.fused_adamw
        if self.sharded:
            # FSDP2 in place (adl's own, see engine/distributed.py); the optimizer is built on the shards.
            dist_.shard_model(self.raw_model, self.device, world, compile_blocks=cfg.compile)
            fused = fused and self.precision != "fp16"  # fused AdamW rejects the sharded scaler's found_inf
        if self.precision == "fp16":
            if self.sharded:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(self.device.type)  # all-reduces found_inf across shards
            else:
                self.scaler = torch.amp.GradScaler(self.device.type)
        else:
            self.scaler = None
        self.optimizer, self.optimizer_kind = make_adamw(
            self.raw_model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), fused=fused
        )
        if self.sharded:
            self.compiled = self.raw_model  # blocks were compiled before sharding
            self.model = self.raw_model
        else:
            self.compiled = torch.compile(self.raw_model) if cfg.compile else self.raw_model
            self.model, self.optimizer = self.acc.prepare(self.compiled, self.optimizer)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # ------------------------------------------------------------------ pieces

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def rng_fork(self):
        """Run something (evaluation, sampling) without changing the random state the next step sees."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _check_finite(self, step: int, interval_loss: torch.Tensor, last_saved: int | None) -> None:
        """Before any checkpoint: finite weights, and a finite loss sum since the last logging
        step (which checked the steps before it), so a non-finite model is never saved."""
        flags = [~torch.isfinite(interval_loss)]
        for p in self.raw_model.parameters():
            t = p.to_local() if hasattr(p, "to_local") else p
            flags.append((~torch.isfinite(t.detach())).any())
        if float(self.acc.reduce(torch.stack(flags).any().float(), reduction="sum")) > 0:
            raise AdlError(
                f"the loss or the weights became non-finite by step {step}; stopped without saving them. "
                + (f"Last good checkpoint: {self.run_dir / 'checkpoints' / f'step-{last_saved}'}" if last_saved is not None else "No checkpoint was written yet.")
                + " Try a lower train.lr or train.precision=fp32."
            )

    def _to_device(self, batch):
        return tuple(t.to(self.device, non_blocking=True) if torch.is_tensor(t) else t for t in batch)

    def evaluate(self) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        self.model.eval()
        try:
            with self.rng_fork(), torch.no_grad(), self.autocast():  # evaluation never moves the training RNG
                out = self.eval_fn(self.raw_model)
        finally:
            self.model.train()
        return {k: float(self.acc.reduce(torch.tensor(v, device=self.device), reduction="mean")) for k, v in out.items()}

    def _log(self, row: dict[str, Any]) -> None:
        if self.acc.is_main_process:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def _save(self, step: int, units: int, wall: float) -> Path | None:
        path = None
        state = {"units": units, "wall_s": wall, "unit": self.unit, "world_size": self.acc.num_processes, "grad_accum": self.grad_accum, **self.state_extra}
        if self.sharded:  # every rank takes part in the gather; rank 0 writes the same format as unsharded runs
            full = dist_.gather_full_state(self.raw_model, self._plain_optimizer(), self.acc.is_main_process)
            if full is not None:
                path = ckpt.write_checkpoint(self.run_dir, step, *full, state, keep=self.cfg.keep_checkpoints)
        elif self.acc.is_main_process:
            path = ckpt.save_checkpoint(self.run_dir, step, self.raw_model, self.optimizer, state, keep=self.cfg.keep_checkpoints)
        self.acc.wait_for_everyone()
        return path

    def _plain_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's AcceleratedOptimizer

    def _load(self, path: Path) -> dict[str, Any]:
        if not self.sharded:
            return ckpt.load_checkpoint(path, self.raw_model, self.optimizer)
        state, weights, tensors = ckpt.read_checkpoint(path)
        dist_.load_full_state(self.raw_model, self._plain_optimizer(), weights, tensors, state.pop("optimizer", None), str(path))
        ckpt.restore_rng(tensors)
        return state

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The trained weights, unsharded, on the main process (None elsewhere). Collective under FSDP."""
        if self.sharded:
            full = dist_.gather_full_state(self.raw_model, self._plain_optimizer(), self.acc.is_main_process)
            return full[0] if full is not None else None
        return ckpt.model_tensors(self.raw_model) if self.acc.is_main_process else None

    def _truncate_metrics(self, step: int) -> None:
        if not self.acc.is_main_process or not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        ckpt.atomic_write_text(self.metrics_path, "".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: bool = False, checkpoint: Path | None = None) -> TrainResult:
        """Train to ``cfg.steps``; with ``resume`` continue from ``checkpoint`` (default: the run's latest)."""
        cfg = self.cfg
        peak = matmul_peak(self.device, self.amp_dtype or torch.float32) if self.flops_per_unit else None
        seed_everything(cfg.seed + self.acc.process_index)
        start_step, units, wall_before = 0, 0, 0.0
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume or checkpoint is not None:
            path = Path(checkpoint) if checkpoint is not None else ckpt.latest_checkpoint(self.run_dir)
            if path is None:
                raise AdlError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
            state = self._load(path)
            resume = True
            start_step, units, wall_before = int(state["step"]), int(state.get("units", 0)), float(state.get("wall_s", 0.0))
            if self.acc.process_index:  # the file holds rank 0's RNG; keep the other ranks' streams (dropout) distinct
                torch.manual_seed(cfg.seed + 7919 * self.acc.process_index + start_step)
            if start_step >= cfg.steps:
                raise AdlError(f"--resume: the checkpoint is at step {start_step}, the recipe has train.steps={cfg.steps}; raise train.steps to continue")
            self._truncate_metrics(start_step)
        elif self.acc.is_main_process and self.metrics_path.exists():
            self.metrics_path.unlink()

        rank, world = self.acc.process_index, self.acc.num_processes
        units_per_step = self.units_per_batch * self.grad_accum * world
        self.peak_dtype = str(self.amp_dtype or torch.float32).removeprefix("torch.")
        history: list[dict[str, Any]] = []
        rates: list[float] = []
        losses: list[float] = []
        compile_s = None
        val_loss = None
        t_start = time.perf_counter()
        progress = _Progress(cfg.steps, start_step, self.unit, bar=self.show_progress, main=self.acc.is_main_process)
        interval_t, interval_units, interval_loss, interval_n = time.perf_counter(), 0, torch.zeros((), device=self.device), 0
        step = start_step
        last_saved = start_step if resume else None
        self.model.train()
        with _SigintGuard() as guard, progress:
            try:
                for step in range(start_step, cfg.steps):
                    lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, steps=cfg.steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    t_step = time.perf_counter()
                    step_loss = self._step(step, rank, world)
                    if compile_s is None and cfg.compile and step == start_step:
                        compile_s = time.perf_counter() - t_step
                        interval_t = time.perf_counter()  # keep compilation out of the throughput
                    else:
                        interval_units += units_per_step
                    interval_loss += step_loss
                    interval_n += 1
                    units += units_per_step
                    done = step + 1
                    progress.advance(done)
                    stop = guard.requested if world == 1 else False
                    if done % cfg.log_every == 0 or done == cfg.steps:
                        # one all-reduce carries the mean loss and whether any rank saw Ctrl-C, so that
                        # every rank stops after the same step (a lone rank stopping would hang the others)
                        flag = torch.tensor(float(guard.requested), device=self.device)
                        reduced = self.acc.reduce(torch.stack([interval_loss / interval_n, flag]), reduction="mean")
                        loss = float(reduced[0])
                        stop = stop or (world > 1 and float(reduced[1]) > 0)
                        if not math.isfinite(loss):
                            raise AdlError(
                                f"the loss became {loss} at step {done}; stopped. "
                                + (f"Last good checkpoint: {ckpt.latest_checkpoint(self.run_dir)}" if last_saved is not None else "No checkpoint was written yet.")
                                + " Try a lower train.lr or train.precision=fp32."
                            )
                        elapsed = time.perf_counter() - interval_t
                        rate = interval_units / elapsed if interval_units and elapsed > 0 else 0.0
                        if rate:
                            rates.append(rate)
                        losses.append(loss)
                        row = {"step": done, "loss": loss, "lr": lr, f"{self.unit}_per_s": rate, "elapsed_s": wall_before + time.perf_counter() - t_start}
                        history.append(row)
                        self._log(row)
                        progress.update(done, loss, lr, rate)
                        interval_t, interval_units, interval_loss, interval_n = time.perf_counter(), 0, torch.zeros((), device=self.device), 0
                    if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                        t_eval = time.perf_counter()
                        metrics = self.evaluate()
                        if metrics:
                            val_loss = metrics.get("val_loss", val_loss)
                            self._log({"step": done, **metrics})
                            progress.note(done, metrics)
                        interval_t += time.perf_counter() - t_eval
                    if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
                        t_ck = time.perf_counter()
                        self._check_finite(done, interval_loss, last_saved)
                        self._save(done, units, wall_before + time.perf_counter() - t_start)
                        last_saved = done
                        interval_t += time.perf_counter() - t_ck
                    if stop:
                        raise StopRequested
            except StopRequested:
                done = step + 1
                self._check_finite(done, interval_loss, last_saved)
                path = self._save(done, units, wall_before + time.perf_counter() - t_start)
                progress.stop()
                raise Interrupted(f"stopped by {guard.signal_name} after step {done}; checkpoint written to {path}; continue with --resume", exit_code=guard.exit_code) from None
            except KeyboardInterrupt:
                progress.stop()
                raise Interrupted("interrupted twice: stopped without writing a checkpoint; --resume continues from the last one") from None

        metrics = self.evaluate()
        if metrics:
            val_loss = metrics.get("val_loss", val_loss)
            self._log({"step": cfg.steps, **metrics})
        wall = wall_before + time.perf_counter() - t_start
        self._check_finite(cfg.steps, interval_loss, last_saved)
        self._save(cfg.steps, units, wall)
        steady = rates[1:] if len(rates) > 2 else rates
        rate = statistics.median(steady) if steady else 0.0
        mfu = rate * self.flops_per_unit / world / peak if peak and rate else None
        tail = losses[-max(1, len(losses) // 10):]
        return TrainResult(
            steps=cfg.steps,
            units=units,
            unit=self.unit,
            wall_s=wall,
            units_per_s=rate,
            train_loss=statistics.fmean(tail) if tail else float("nan"),
            val_loss=val_loss,
            mfu=mfu,
            precision=self.precision,
            optimizer=f"AdamW ({self.optimizer_kind})",
            compile_s=compile_s,
            device=str(self.device),
            world_size=world,
            history=history,
            grad_accum=self.grad_accum,
            parallel=self.parallel,
            tf32=self.tf32,
            peak_dtype=self.peak_dtype,
            resumed_from=start_step if resume else None,
        )

    def _step(self, step: int, rank: int, world: int) -> torch.Tensor:
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        accum = self.grad_accum
        for micro in range(accum):
            batch = self._to_device(self.batch_fn(step, micro, rank, world))
            last = micro == accum - 1
            if self.sharded:
                sync = dist_.grad_sync(self.raw_model, last)
            else:
                sync = contextlib.nullcontext() if last else self.acc.no_sync(self.model)
            with sync:
                with self.autocast():
                    loss = self.loss_fn(self.model, batch) / accum
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            total += loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total


class _Progress:
    """Progress of the loop on the main process.

    On a terminal: a rich bar that advances every step (so the ETA appears after the first
    steps), with the last logged loss, lr and throughput; it keeps to one line at 60 columns.
    Elsewhere (a pipe, nohup, CI): one plain line per logging step, with the ETA. With the bar
    off (--no-progress) only evaluation lines are printed."""

    def __init__(self, total: int, start: int, unit: str, bar: bool, main: bool):
        from adl_cli.console import console

        self.main, self.unit, self.console, self.last = main, unit, console, ""
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.enabled = bar and main and console.is_terminal
        self.plain = bar and main and not console.is_terminal
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, stats="")

    def __enter__(self):
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)

    def stop(self):
        if self.enabled:
            self.bar.stop()

    def eta(self, step: int) -> str:
        done = step - self.start
        if done <= 0:
            return "-"
        left = (time.perf_counter() - self.t0) / done * (self.total - step)
        return f"{int(left // 60)}:{int(left % 60):02d}"

    def advance(self, step: int) -> None:
        """Every step: the bar moves (its ETA follows the steps, not the logging cadence)."""
        if self.enabled:
            self.bar.update(self.task, completed=step)

    def update(self, step: int, loss: float, lr: float, rate: float) -> None:
        self.last = f"loss {loss:.4f} lr {lr:.1e} {_short(rate)} {self.unit[:3]}/s"
        if self.enabled:
            self.bar.update(self.task, completed=step, stats=self.last)
        elif self.plain:
            self.console.print(f"step {step}/{self.total}  {self.last}  eta {self.eta(step)}", highlight=False, markup=False)

    def note(self, step: int, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        text = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        if self.enabled:
            self.bar.console.print(f"  step {step}: {text}", highlight=False)
        else:
            self.console.print(f"step {step}: {self.last}  {text}".replace(":   ", ": "), highlight=False, markup=False)


def _short(x: float) -> str:
    """1234567 -> '1.23M', 4567 -> '4.6k': throughput that fits a narrow terminal."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.0f}"
