"""The one training loop, on accelerate: every method hands it a model, batches and a loss.

Per optimizer step t (``fit`` reads as these named pieces):

    batches = [source(t, m, rank, world) for m in range(grad_accum)]   # the step's micro-batches
    N = sum over micro-batches and ranks of units(batch)              # e.g. trained tokens after masking
    for each micro-batch m (DDP syncs only on the last):
        loss_m, metrics_m = loss_fn(model, batch_m)                   # loss_m: the mean over its units
        backward(loss_m * n_m * world / N)                             # = the sum over units / N, globally
    clip ||g||; lr = schedule(t) per group; optimizer step; EMA update

so a loss over masked tokens is normalised by the global count of trained tokens, not by a mean
of per-micro-batch means; metrics are averaged with the same weights, and over ranks at
logging steps (one all-reduce carries them with the loss).

Contract for a method (see docs/ARCHITECTURE.md):
- ``loss_fn(model, batch)`` returns the mean loss, or ``(loss, {"name": value, ...})``;
- ``units_fn(batch)`` (optional) counts what the batch trains (tokens after masking, images);
  without it every micro-batch counts ``units_per_batch``;
- ``batch_fn(step, micro, rank, world)`` gives a batch; an object with ``state_dict`` /
  ``load_state_dict`` (epoch order, a rollout buffer) has that state checkpointed, so resume is exact;
- ``param_groups(model)`` (optional) gives groups with their own ``lr_scale`` and ``weight_decay``;
  ``train.optimizer`` and ``train.schedule`` pick the optimizer and the schedule by name;
- ``eval_fn(model)`` returns a dict of metrics; with ``train.ema`` it runs on the averaged weights
  too (keys prefixed ``ema_``).

Checkpoints (weights, optimizer, EMA, batch-source state, RNG, step) are written atomically;
Ctrl-C or SIGTERM finishes the step, writes one and exits; a non-finite loss stops the run with
the last good checkpoint kept. Several processes (torchrun / accelerate launch): each rank takes
its slice of every global batch; ``train.distributed`` picks DDP or FSDP2 (engine/distributed.py);
only the main process logs, prints and writes; checkpoints hold the full, unsharded state, so a
run resumes under any world size or strategy.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from adl_cli.engine import optim
from adl_cli.engine.ema import EMA
from adl_cli.engine.runtime import autocast_dtype, flush_denormals, keep_freed_memory, matmul_peak, resolve_precision, seed_everything
from adl_cli.errors import AdlError, Interrupted, opt


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1  # micro-steps per optimizer step, per process: global batch = batch_size * grad_accum * world
    global_batch_tokens: int = 0  # > 0: fixed global batch in tokens; grad_accum is derived from the world size (and ignored)
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes) | sgd | muon (Muon on hidden matrices, AdamW on the rest)
    lr: float = 6e-4
    min_lr: float = 6e-5
    schedule: str = "cosine"  # cosine | linear | constant | wsd (warmup-stable-decay)
    warmup: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps that decays to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    momentum: float = 0.9  # sgd
    muon_lr: float = 0.02  # muon: the hidden matrices' peak lr (the other tensors take train.lr)
    muon_momentum: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    ema: float = 0.0  # > 0: keep an exponential moving average of the weights with this decay (e.g. 0.999)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward (less memory, ~1/3 more compute)
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
    log_with: list[str] = field(default_factory=list)  # trackers beside metrics.jsonl, through accelerate: tensorboard, wandb, ...
    seq_len_warmup: int = 0  # steps over which the training window grows from seq_len_start to model.block_size (0: off)
    seq_len_start: int = 64
    batch_size_warmup: int = 0  # steps over which the rows per micro-batch grow from batch_size_start to batch_size (0: off)
    batch_size_start: int = 1
    seed: int = 1337

    def validate(self) -> None:
        from adl_cli.engine.optim import OPTIMIZERS, SCHEDULES
        from adl_cli.errors import closest

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
            raise ValueError(f"train.distributed must be one of {', '.join(STRATEGIES)}, got '{self.distributed}'{closest(self.distributed, STRATEGIES)}")
        for key, reg in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            value = getattr(self, key)
            if value not in reg:
                raise ValueError(f"train.{key} must be one of {', '.join(reg.names())}, got '{value}'{closest(value, reg.names())}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"train.ema must be in [0, 1) (0: off; e.g. 0.999), got {self.ema}")
        for name in ("momentum", "muon_momentum", "beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("seq_len_warmup", "batch_size_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len_start < 1 or self.batch_size_start < 1:
            raise ValueError(f"train.seq_len_start and train.batch_size_start must be >= 1, got {self.seq_len_start} and {self.batch_size_start}")
        if self.muon_lr <= 0:
            raise ValueError(f"train.muon_lr must be > 0, got {self.muon_lr}")
        if self.distributed == "fsdp" and (self.optimizer == "muon" or self.ema):
            raise ValueError("train.distributed = 'fsdp' does not combine with train.optimizer = 'muon' or train.ema yet (both need whole matrices on every rank); use 'ddp'")
        known = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
        for name in self.log_with:
            if name not in known:
                raise ValueError(f"train.log_with: unknown tracker '{name}'{closest(name, known)}; accelerate supports: {', '.join(known)}")


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
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's metrics (val_loss, ema_val_loss, accuracy ...)
    train_metrics: dict[str, float] = field(default_factory=dict)  # the loss function's metrics at the last logging step
    schedule: str = "cosine"


SHORT_UNITS = {"tokens": "tok", "images": "img", "sequences": "seq"}  # the progress line's rate unit


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


def _accelerator(log_with: list[str] | None = None, project_dir: Path | None = None):
    return dist_.make_accelerator(log_with=log_with, project_dir=project_dir)


@dataclass
class _Interval:
    """What accumulates between logging steps, on the device (one host sync per logging step)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    units: int = 0
    t0: float = field(default_factory=time.perf_counter)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        *,
        run_dir: Path,
        batch_fn: Callable[[int, int, int, int], Any],
        loss_fn: Callable[[nn.Module, Any], torch.Tensor | tuple[torch.Tensor, dict[str, Any]]],
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        units_per_batch: int,
        units_fn: Callable[[Any], int] | None = None,
        unit: str = "tokens",
        flops_per_unit: float | None = None,
        param_groups: Callable[[nn.Module], list[dict]] | None = None,
        accelerator=None,
        progress: bool | None = True,  # a bar (or plain lines in a pipe); False: evaluation lines only; None: silent
        state_extra: dict[str, Any] | None = None,
        grad_accum: int | None = None,
        run_name: str | None = None,
        frozen_base: bool = False,  # checkpoints hold only the tensors that train (an adapter over a base rebuilt from its run)
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.batch_fn, self.loss_fn, self.eval_fn, self.units_fn = batch_fn, loss_fn, eval_fn, units_fn
        self.unit, self.units_per_batch, self.flops_per_unit = unit, units_per_batch, flops_per_unit
        self.acc = accelerator or _accelerator(cfg.log_with, self.run_dir)
        self.trackers = list(cfg.log_with)
        self.run_name = run_name or self.run_dir.name
        self.frozen_base = frozen_base
        self.show_progress = bool(progress) and self.acc.is_main_process
        self.silent = progress is None
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
        flush_denormals()  # x86: denormal arithmetic is a slow path that a long run can drift into
        self.raw_model = model.to(self.device)
        if cfg.activation_checkpointing:
            if not hasattr(self.raw_model, "activation_checkpointing"):
                raise AdlError(f"train.activation_checkpointing: the {type(self.raw_model).__name__} model does not support it")
            self.raw_model.activation_checkpointing = True
        if self.sharded:
            # FSDP2 in place (adl's own, see engine/distributed.py); the optimizer is built on the shards.
            dist_.shard_model(self.raw_model, self.device, world, compile_blocks=cfg.compile)
        self.scaler = self._grad_scaler()
        self.optimizer, self.optimizer_kind = self._optimizer(param_groups)
        self.ema = EMA(self.raw_model, cfg.ema) if cfg.ema else None
        if self.sharded:
            self.compiled = self.raw_model  # blocks were compiled before sharding
            self.model = self.raw_model
        else:
            self.compiled = torch.compile(self.raw_model) if cfg.compile else self.raw_model
            self.model, self.optimizer = self.acc.prepare(self.compiled, self.optimizer)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # ------------------------------------------------------------------ set-up pieces

    def _grad_scaler(self):
        if self.precision != "fp16":
            return None
        if self.sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.device.type)  # all-reduces found_inf across shards
        return torch.amp.GradScaler(self.device.type)

    def _optimizer(self, make_groups) -> tuple[torch.optim.Optimizer, str]:
        cfg = self.cfg
        groups = make_groups(self.raw_model) if make_groups is not None else optim.param_groups(self.raw_model, cfg.weight_decay)
        if cfg.optimizer == "muon":
            from adl_cli.engine.muon import mark_non_hidden

            mark_non_hidden(self.raw_model)
        fused_ok = not (self.sharded and self.precision == "fp16")  # fused AdamW rejects the sharded scaler's found_inf
        run_cfg = dataclasses.replace(cfg, fused_adamw=cfg.fused_adamw and fused_ok)
        return optim.make_optimizer(cfg.optimizer, groups, run_cfg, self.device, self.amp_dtype)

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
        if isinstance(batch, dict):
            return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if isinstance(batch, (tuple, list)):
            return type(batch)(t.to(self.device, non_blocking=True) if torch.is_tensor(t) else t for t in batch)
        return batch.to(self.device, non_blocking=True) if torch.is_tensor(batch) else batch

    def evaluate(self) -> dict[str, float]:
        """The eval hook's metrics (and, with EMA, the same on the averaged weights as ``ema_*``), averaged over ranks."""
        if self.eval_fn is None:
            return {}
        self.model.eval()
        try:
            with self.rng_fork(), torch.no_grad(), self.autocast():  # evaluation never moves the training RNG
                out = dict(self.eval_fn(self.raw_model))
                if self.ema is not None:
                    with self.ema.swapped_in():
                        out.update({f"ema_{k}": v for k, v in self.eval_fn(self.raw_model).items()})
        finally:
            self.model.train()
        if not out:
            return {}
        keys = list(out)
        reduced = self.acc.reduce(torch.tensor([float(out[k]) for k in keys], device=self.device), reduction="mean")
        return {k: float(v) for k, v in zip(keys, reduced.tolist())}

    def _log(self, row: dict[str, Any]) -> None:
        if self.acc.is_main_process:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if self.trackers:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def _source_state(self) -> dict[str, Any] | None:
        get = getattr(self.batch_fn, "state_dict", None)
        return get() if get is not None else None

    def _save(self, step: int, units: int, wall: float) -> Path | None:
        path = None
        state = {"units": units, "wall_s": wall, "unit": self.unit, "world_size": self.acc.num_processes, "grad_accum": self.grad_accum, **self.state_extra}
        extra = ckpt.flatten_state("batches", self._source_state())
        if self.ema is not None:
            extra.update(self.ema.state())
        if self.sharded:  # every rank takes part in the gather; rank 0 writes the same format as unsharded runs
            full = dist_.gather_full_state(self.raw_model, self._plain_optimizer(), self.acc.is_main_process)
            if full is not None:
                path = ckpt.write_checkpoint(self.run_dir, step, *full, state, keep=self.cfg.keep_checkpoints, extra=extra)
        elif self.acc.is_main_process:
            path = ckpt.save_checkpoint(self.run_dir, step, self.raw_model, self.optimizer, state, keep=self.cfg.keep_checkpoints, extra=extra,
                                        trainable_only=self.frozen_base)
        self.acc.wait_for_everyone()
        return path

    def _plain_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's AcceleratedOptimizer

    def _load(self, path: Path) -> dict[str, Any]:
        if not self.sharded:
            state, tensors = ckpt.load_checkpoint(path, self.raw_model, self.optimizer, trainable_only=self.frozen_base)
        else:
            state, weights, tensors = ckpt.read_checkpoint(path)
            dist_.load_full_state(self.raw_model, self._plain_optimizer(), weights, tensors, state.pop("optimizer", None), str(path))
            ckpt.restore_rng(tensors)
        if self.ema is not None:
            self.ema.load(tensors, str(path))
        source = ckpt.unflatten_state("batches", tensors, state)
        load = getattr(self.batch_fn, "load_state_dict", None)
        if load is not None:
            if source is None:
                raise AdlError(f"{path} holds no batch-source state (the run was trained with another data source)")
            load(source)
        return state

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The trained weights, unsharded, on the main process (None elsewhere). Collective under FSDP."""
        if self.sharded:
            full = dist_.gather_full_state(self.raw_model, self._plain_optimizer(), self.acc.is_main_process)
            return full[0] if full is not None else None
        return ckpt.model_tensors(self.raw_model) if self.acc.is_main_process else None

    def ema_model_state(self) -> dict[str, torch.Tensor] | None:
        """The moving average as a full state dict of the model (None without train.ema)."""
        if self.ema is None:
            return None
        full = ckpt.model_tensors(self.raw_model)
        full.update({k: v for k, v in self.ema.tensors().items() if k in full})
        return full

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
        start, units, wall_before = self._begin(resume, checkpoint)
        resume = resume or checkpoint is not None
        self.peak_dtype = str(self.amp_dtype or torch.float32).removeprefix("torch.")
        self._start_trackers()
        self.history: list[dict[str, Any]] = []
        self.rates: list[float] = []
        self.losses: list[float] = []
        self.eval_metrics: dict[str, float] = {}
        self.train_metrics: dict[str, float] = {}
        self.compile_s = None
        self.overhead_s = 0.0
        t_start = time.perf_counter()
        progress = _Progress(cfg.steps, start, self.unit, bar=self.show_progress, main=self.acc.is_main_process and not self.silent)
        iv = self._new_interval()
        step = start
        last_saved = start if resume else None
        self.model.train()
        with _SigintGuard() as guard, progress:
            try:
                for step in range(start, cfg.steps):
                    lr = self._set_lr(step)
                    t_step = time.perf_counter()
                    step_units = self._train_step(step, iv)
                    units += step_units
                    if self.compile_s is None and cfg.compile and step == start:
                        self.compile_s = time.perf_counter() - t_step
                        iv.t0 = time.perf_counter()  # keep compilation out of the throughput
                    else:
                        iv.units += step_units
                    done = step + 1
                    progress.advance(done)
                    stop = guard.requested if self.acc.num_processes == 1 else False
                    if done % cfg.log_every == 0 or done == cfg.steps:
                        stop = self._log_interval(done, lr, iv, guard, wall_before + time.perf_counter() - t_start, progress, last_saved) or stop
                        iv = self._new_interval()
                    if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                        t_eval = time.perf_counter()
                        self._evaluate_and_log(done, progress)
                        iv.t0 += time.perf_counter() - t_eval
                        self.overhead_s += time.perf_counter() - t_eval
                    if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
                        t_ck = time.perf_counter()
                        self._check_finite(done, iv.loss, last_saved)
                        self._save(done, units, wall_before + time.perf_counter() - t_start)
                        last_saved = done
                        iv.t0 += time.perf_counter() - t_ck
                        self.overhead_s += time.perf_counter() - t_ck
                    if stop:
                        raise StopRequested
            except StopRequested:
                done = step + 1
                self._check_finite(done, iv.loss, last_saved)
                path = self._save(done, units, wall_before + time.perf_counter() - t_start)
                progress.stop()
                self._end_trackers()
                raise Interrupted(f"stopped by {guard.signal_name} after step {done}; checkpoint written to {path}; continue with {opt('resume')}", exit_code=guard.exit_code) from None
            except KeyboardInterrupt:
                progress.stop()
                self._end_trackers()
                raise Interrupted(f"interrupted twice: stopped without writing a checkpoint; {opt('resume')} continues from the last one") from None

        self._evaluate_and_log(cfg.steps, None)
        wall = wall_before + time.perf_counter() - t_start
        self._check_finite(cfg.steps, iv.loss, last_saved)
        self._save(cfg.steps, units, wall)
        self._end_trackers()
        return self._result(units, wall, peak, start if resume else None)

    def _begin(self, resume: bool, checkpoint: Path | None) -> tuple[int, int, float]:
        """(start step, units so far, wall time so far): from the checkpoint when resuming."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not (resume or checkpoint is not None):
            if self.acc.is_main_process and self.metrics_path.exists():
                self.metrics_path.unlink()
            return 0, 0, 0.0
        path = Path(checkpoint) if checkpoint is not None else ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            raise AdlError(f"{opt('resume')}: no checkpoint in {self.run_dir / 'checkpoints'}")
        state = self._load(path)
        start = int(state["step"])
        if self.acc.process_index:  # the file holds rank 0's RNG; keep the other ranks' streams (dropout) distinct
            torch.manual_seed(cfg.seed + 7919 * self.acc.process_index + start)
        if start >= cfg.steps:
            raise AdlError(f"{opt('resume')}: the checkpoint is at step {start}, the recipe has train.steps={cfg.steps}; raise train.steps to continue")
        self._truncate_metrics(start)
        return start, int(state.get("units", 0)), float(state.get("wall_s", 0.0))

    def _new_interval(self) -> _Interval:
        return _Interval(torch.zeros((), device=self.device))

    def _set_lr(self, step: int) -> float:
        """Every group's lr from its own peak (``initial_lr``) and the schedule; returns train.lr's value."""
        cfg = self.cfg
        factor = optim.lr_at(step, lr=1.0, min_lr=cfg.min_lr / cfg.lr, warmup=cfg.warmup, steps=cfg.steps, schedule=cfg.schedule, decay_fraction=cfg.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = group.get("initial_lr", cfg.lr) * factor
        return cfg.lr * factor

    def _micro_weights(self, batches: list) -> tuple[list[float], int]:
        """Each micro-batch's weight in the step's loss and the step's global units.

        With ``units_fn`` the weight is n_m * world / N (N: units over micro-batches and ranks,
        one all-reduce), so the summed gradient is that of sum(losses over units) / N; without,
        every micro-batch trains ``units_per_batch`` and weighs 1 / grad_accum."""
        world = self.acc.num_processes
        if self.units_fn is None:
            return [1.0 / len(batches)] * len(batches), self.units_per_batch * len(batches) * world
        counts = [int(self.units_fn(b)) for b in batches]
        total = sum(counts)
        if world > 1:
            total = int(self.acc.reduce(torch.tensor(float(total), device=self.device), reduction="sum").item())
        if total <= 0:
            return [0.0] * len(batches), 0
        return [c * world / total for c in counts], total

    def _train_step(self, step: int, iv: _Interval) -> int:
        """One optimizer step over the step's micro-batches; adds the loss and metrics to the interval."""
        cfg = self.cfg
        rank, world = self.acc.process_index, self.acc.num_processes
        batches = [self.batch_fn(step, micro, rank, world) for micro in range(self.grad_accum)]
        weights, step_units = self._micro_weights(batches)
        for micro, (batch, w) in enumerate(zip(batches, weights)):
            batch = self._to_device(batch)
            last = micro == len(batches) - 1
            if self.sharded:
                sync = dist_.grad_sync(self.raw_model, last)
            else:
                sync = contextlib.nullcontext() if last else self.acc.no_sync(self.model)
            with sync:
                with self.autocast():
                    loss, metrics = _split_loss(self.loss_fn(self.model, batch))
                    loss = loss * w
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            iv.loss += loss.detach()
            for k, v in metrics.items():
                v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=self.device)
                iv.metrics[k] = iv.metrics.get(k, torch.zeros((), device=self.device)) + v * w
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
        if self.ema is not None:
            self.ema.update()
        iv.steps += 1
        return step_units

    def _log_interval(self, done: int, lr: float, iv: _Interval, guard, elapsed: float, progress, last_saved) -> bool:
        """One all-reduce carries the interval's mean loss, its metrics and whether any rank saw
        Ctrl-C, so every rank stops after the same step. Returns whether to stop."""
        keys = sorted(iv.metrics)
        flag = torch.tensor(float(guard.requested), device=self.device)
        packed = torch.stack([iv.loss / iv.steps, *[iv.metrics[k] / iv.steps for k in keys], flag])
        reduced = self.acc.reduce(packed, reduction="mean").tolist()
        loss = reduced[0]
        if not math.isfinite(loss):
            raise AdlError(
                f"the loss became {loss} at step {done}; stopped. "
                + (f"Last good checkpoint: {ckpt.latest_checkpoint(self.run_dir)}" if last_saved is not None else "No checkpoint was written yet.")
                + " Try a lower train.lr or train.precision=fp32."
            )
        seconds = time.perf_counter() - iv.t0
        rate = iv.units / seconds if iv.units and seconds > 0 else 0.0
        if rate:
            self.rates.append(rate)
        self.losses.append(loss)
        self.train_metrics = dict(zip(keys, reduced[1:-1]))
        row = {"step": done, "loss": loss, **self.train_metrics, "lr": lr, f"{self.unit}_per_s": rate, "elapsed_s": elapsed,
               "train_s": elapsed - self.overhead_s}  # train_s: this session's evaluations and checkpoints left out
        self.history.append(row)
        self._log(row)
        progress.update(done, loss, lr, rate, self.train_metrics)
        return self.acc.num_processes > 1 and reduced[-1] > 0

    def _evaluate_and_log(self, done: int, progress) -> None:
        metrics = self.evaluate()
        if metrics:
            self.eval_metrics = metrics
            self._log({"step": done, **metrics})
            if progress is not None:
                progress.note(done, metrics)

    def _start_trackers(self) -> None:
        if not self.trackers:
            return
        try:
            self.acc.init_trackers(self.run_name, config=_flat_config(self.cfg))
        except (ImportError, ModuleNotFoundError, ValueError) as e:
            raise AdlError(f"train.log_with {self.trackers}: {e} (install the tracker's package, e.g. pip install tensorboard)") from None

    def _end_trackers(self) -> None:
        if self.trackers:
            self.acc.end_training()

    def _result(self, units: int, wall: float, peak: float | None, resumed_from: int | None) -> TrainResult:
        world = self.acc.num_processes
        steady = self.rates[1:] if len(self.rates) > 2 else self.rates
        rate = statistics.median(steady) if steady else 0.0
        mfu = rate * self.flops_per_unit / world / peak if peak and rate else None
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return TrainResult(
            steps=self.cfg.steps,
            units=units,
            unit=self.unit,
            wall_s=wall,
            units_per_s=rate,
            train_loss=statistics.fmean(tail) if tail else float("nan"),
            val_loss=self.eval_metrics.get("val_loss"),
            mfu=mfu,
            precision=self.precision,
            optimizer=self.optimizer_kind,
            compile_s=self.compile_s,
            device=str(self.device),
            world_size=world,
            history=self.history,
            grad_accum=self.grad_accum,
            parallel=self.parallel,
            tf32=self.tf32,
            peak_dtype=self.peak_dtype,
            resumed_from=resumed_from,
            metrics=dict(self.eval_metrics),
            train_metrics=dict(self.train_metrics),
            schedule=self.cfg.schedule,
        )


def _split_loss(out) -> tuple[torch.Tensor, dict[str, Any]]:
    """A loss function's result: the loss alone, or (loss, metrics)."""
    if isinstance(out, tuple):
        loss, metrics = out
        return loss, dict(metrics or {})
    return out, {}


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """The [train] table for a tracker's hyper-parameter view (scalars only)."""
    return {k: (",".join(v) if isinstance(v, list) else v) for k, v in dataclasses.asdict(cfg).items()}


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

    def update(self, step: int, loss: float, lr: float, rate: float, metrics: dict[str, float] | None = None) -> None:
        shown = "".join(f" {k} {v:.4g}" for k, v in list((metrics or {}).items())[:2])  # the loss function's first metrics
        self.last = f"loss {loss:.4f}{shown} lr {lr:.1e} {_short(rate)} {SHORT_UNITS.get(self.unit, self.unit)}/s"
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
