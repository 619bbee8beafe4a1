"""Data parallelism for the one training loop: DDP (through accelerate) and FSDP2.

Launch the same command under ``torchrun --nproc_per_node N -m adl_cli ...`` or
``accelerate launch -m adl_cli ...``; the processes find each other through the
launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and every one runs the whole
loop on its own slice of each global batch.

DDP (Li et al., "PyTorch Distributed", VLDB 2020): every rank holds all weights; after
the backward of the last micro-batch the gradients are averaged, g = (1/W) sum_r g_r, so
the ranks take identical optimizer steps and stay bit-identical.

FSDP (Zhao et al., "PyTorch FSDP", VLDB 2023; ZeRO-3, Rajbhandari et al. 2020): every
rank holds 1/W of each parameter, gradient and optimizer state. Before a block's forward
(and again before its backward) its full weights are all-gathered; after its backward the
gradients are reduce-scattered, so each rank updates only its shard. Same mathematics as
DDP, W times less state per rank, more communication.

FSDP here is torch's FSDP2 (``torch.distributed.fsdp.fully_shard``) applied by adl
itself: one unit per repeated block (every child of an ``nn.ModuleList``) plus the root.
accelerate's FSDP plugin is not used because accelerate only enables it for GPU-type
process groups: on CPU (gloo) it silently falls back to DDP, so the path tested here
would not be the one that runs on GPUs. FSDP2 runs the same on gloo and NCCL.

Checkpoints stay in one format whatever the world size or the strategy: the full
(unsharded) weights and optimizer state, gathered onto rank 0 and written there as
safetensors. torch.distributed.checkpoint's sharded format is not used because its
metadata file is a pickle (adl never unpickles). The cost: rank 0 holds one full copy
of the state in CPU memory while saving (about 1.5 GB for GPT-2 124M with AdamW).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from adl_cli.console import env_rank, is_main_env  # noqa: F401  (re-exported)
from adl_cli.engine import checkpoint as ckpt
from adl_cli.errors import AdlError

STRATEGIES = ("ddp", "fsdp")


# ----------------------------------------------------------------------------- launch


def make_accelerator(log_with: list[str] | None = None, project_dir=None):
    """accelerate's Accelerator with adl's own precision handling (autocast + GradScaler).

    On a machine without CUDA, ``cpu=True`` makes accelerate form a gloo process group
    under torchrun/accelerate launch (without it, it would run every process alone).
    ``log_with`` names accelerate trackers (tensorboard, wandb, ...) that log into ``project_dir``."""
    from accelerate import Accelerator

    kwargs = {}
    if log_with:
        kwargs = {"log_with": list(log_with), "project_dir": str(project_dir) if project_dir is not None else None}
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", **kwargs)


# ----------------------------------------------------------------------------- global batch


def close_process_group() -> None:
    """End a distributed command cleanly: wait for every rank, then tear the group down.

    Without it each process exits with gloo's threads still running; a rank that leaves
    while another is still inside a collective (rank 0 writing the run) can then die in
    C++ teardown ("terminate called without an active exception", SIGABRT), failing the
    launch after a successful run. A no-op outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_grad_accum(global_batch: int, grad_accum: int, world: int, batch_size: int, units_per_sequence: int, unit: str = "tokens") -> int:
    """Micro-steps per optimizer step.

    With ``global_batch`` = 0 the recipe's ``grad_accum`` is per process: the global batch
    is batch_size * grad_accum * world sequences and grows with the world size. With
    ``global_batch`` > 0 (in units, e.g. tokens) the global batch is fixed and
    grad_accum = global_batch / (world * batch_size * units_per_sequence)."""
    if global_batch <= 0:
        return grad_accum
    per = world * batch_size * units_per_sequence
    if global_batch % per:
        lo = max(per, global_batch // per * per)
        raise AdlError(
            f"train.global_batch_tokens={global_batch:,} is not a multiple of world size {world} x train.batch_size {batch_size} "
            f"x {units_per_sequence} {unit} per sequence = {per:,}; use e.g. {lo:,} or {lo + per:,}, change train.batch_size, "
            f"or set train.global_batch_tokens=0 to use train.grad_accum"
        )
    return global_batch // per


# ----------------------------------------------------------------------------- FSDP2


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: every child of every nn.ModuleList (transformer blocks)."""
    out = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            out.extend(module)
    return out


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Make every rank start from rank ``src``'s weights and buffers (what DDP does on wrap)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src)


def shard_model(model: nn.Module, device: torch.device, world: int, *, compile_blocks: bool = False) -> nn.Module:
    """Apply FSDP2 full sharding in place: each repeated block, then the root.

    With ``compile_blocks`` each block is torch.compile'd before it is sharded (compiling
    the sharded root instead would break the graph at every FSDP hook)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    broadcast_parameters(model)
    mesh = init_device_mesh(device.type, (world,))
    for block in reversed(repeated_blocks(model)):  # innermost first when lists nest
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def grad_sync(model: nn.Module, enabled: bool):
    """FSDP2's no_sync: skip the reduce-scatter on non-final micro-steps."""
    if enabled:
        model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def off():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return off()


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: canonical} for parameters registered under several names (tied embeddings)."""
    canonical: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in canonical:
            aliases[name] = canonical[id(p)]
        else:
            canonical[id(p)] = name
    return aliases


def _param_names_in_optimizer_order(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def gather_full_state(model: nn.Module, opt: torch.optim.Optimizer, main: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]] | None:
    """Collective: the sharded model's full weights and optimizer state, in the same
    layout ``checkpoint.save_checkpoint`` writes for an unsharded model. Every rank must
    call it; rank 0 gets (weights, optimizer tensors, optimizer meta), the others None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=options)
    osd = get_optimizer_state_dict(model, opt, options=options)
    if not main:
        return None
    aliases = _tied_aliases(model)
    weights = {k: v.detach().contiguous() for k, v in msd.items() if k not in aliases}
    order = _param_names_in_optimizer_order(model, opt)
    index = {name: i for i, name in enumerate(order)}
    states = {index[aliases.get(name, name)]: state for name, state in osd["state"].items()}
    groups, start = [], 0
    for group in osd["param_groups"]:
        n = len(group["params"])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + n))})
        start += n
    tensors, meta = ckpt.flatten_optimizer(states, groups)
    return weights, tensors, meta


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer | None, weights: dict[str, torch.Tensor], opt_tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None, where: str) -> None:
    """Collective: load a full (unsharded) checkpoint into a sharded model and optimizer.
    Every rank passes the full tensors (read from the shared checkpoint folder) and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    aliases = _tied_aliases(model)
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items() if n not in aliases}
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise AdlError(f"checkpoint {where} does not match the model: " + (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"))
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise AdlError(f"checkpoint {where} does not match the model: '{name}' has shape {tuple(weights[name].shape)}, the model expects {shape}")
    full = dict(weights)
    for alias, name in aliases.items():
        full[alias] = weights[name]
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, full, options=options)
    if opt is None or meta is None:
        return
    order = _param_names_in_optimizer_order(model, opt)
    by_index, groups = ckpt.unflatten_optimizer(opt_tensors, meta)
    state = {order[i]: s for i, s in by_index.items()}
    if sum(len(g["params"]) for g in groups) != len(order) or len(groups) != len(opt.param_groups):
        raise AdlError(f"checkpoint {where}: the optimizer state does not match the model's parameters")
    named_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [order[i] for i in g["params"]]} for g in groups]
    try:
        set_optimizer_state_dict(model, opt, {"state": state, "param_groups": named_groups}, options=options)
    except (ValueError, RuntimeError, KeyError) as e:
        raise AdlError(f"checkpoint {where}: the optimizer state does not match: {e}") from None


# ----------------------------------------------------------------------------- TF32


def set_tf32(enabled: bool, device: torch.device) -> str:
    """TF32 matmuls/convolutions on CUDA (10-bit mantissa inputs, fp32 accumulate: about
    8x the fp32 tensor-core rate on A100/H100). Returns a note for the report."""
    if device.type != "cuda":
        return "n/a on CPU" if enabled else "off"
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    return "on" if enabled else "off"
