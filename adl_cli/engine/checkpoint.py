"""Checkpoints: safetensors only, written atomically, resumable.

A checkpoint folder ``checkpoints/step-N/`` holds ``model.safetensors`` (weights),
``optimizer.safetensors`` (optimizer tensors and RNG states) and ``state.json`` (step,
counters, optimizer hyper-parameters). It is written under a temporary name and renamed
into place, so a crash mid-write leaves the previous checkpoint untouched; ``latest``
names the newest complete one. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from adl_cli.errors import AdlError
from adl_cli.fileio import atomic_path, atomic_write, fsync_dir, make_temp_dir

COMPILE_PREFIX = "_orig_mod."


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the unwrapped model, tied (shared) tensors kept once, no compile prefixes."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in unwrap(model).state_dict().items():
        name = name.replace(COMPILE_PREFIX, "")
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
    except SafetensorError as e:  # its I/O errors (a full disk) arrive wrapped
        reason = str(e).split("I/O error: ")[-1].split(" (os error")[0]
        raise OSError(getattr(e, "errno", None) or 5, reason, str(path)) from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise AdlError(f"missing file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdlError(f"cannot read {path}: the file is truncated or not a safetensors file ({e})") from None


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    save_safetensors(model_tensors(model), path, metadata)


def load_weights(model: nn.Module, path: Path, *, what: str = "checkpoint") -> None:
    """Load weights into ``model`` (through its family's upgrade of older layouts, e.g. GPT-2's fused
    qkv); any missing/unexpected key or shape mismatch is an AdlError."""
    tensors = read_safetensors(path)
    cfg = getattr(unwrap(model), "config", None)
    if cfg is not None and hasattr(cfg, "family"):
        from adl_cli.models import family

        tensors = family(cfg.family).upgrade_state(tensors)
    assign_state(model, tensors, f"{what} {path}")


def assign_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """``tensors`` into ``model``; a missing, unexpected or misshapen tensor is an AdlError naming it."""
    target = unwrap(model)
    expected = model_tensors(target)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise AdlError(f"{where} does not match the model: {detail}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise AdlError(
                f"{where} does not match the model: '{name}' has shape {tuple(t.shape)}, "
                f"the model expects {tuple(expected[name].shape)}"
            )
    target.load_state_dict(tensors, strict=False)


# ----------------------------------------------------------------------------- optimizer


def flatten_optimizer(states: dict[int, dict[str, Any]], groups: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state keyed by parameter index -> safetensors entries ``state.I.KEY`` and a JSON
    part (param groups, non-tensor state). The one flattener: plain and sharded (FSDP) runs both use it."""
    tensors, scalars = {}, {}
    for idx, state in states.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """The inverse of ``flatten_optimizer``: (state keyed by parameter index, param groups)."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    for name, value in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return state, meta["param_groups"]


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    return flatten_optimizer(sd["state"], sd["param_groups"])


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state, groups = unflatten_optimizer(tensors, meta)
    if len(groups) != len(opt.param_groups) or any(len(a["params"]) != len(b["params"]) for a, b in zip(groups, opt.param_groups)):
        raise AdlError("the checkpoint's optimizer state does not match the model's parameters")
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, RuntimeError, KeyError) as e:
        raise AdlError(f"the checkpoint's optimizer state does not match: {e}") from None


# ----------------------------------------------------------------------------- checkpoints


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def flatten_state(prefix: str, state: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """A state dict (a batch source's epoch order, generator, buffer) as safetensors entries: its
    tensors under ``prefix.key`` and everything else as one JSON text ``prefix.__json__``."""
    if state is None:
        return {}
    out = {f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in state.items() if torch.is_tensor(v)}
    rest = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    out[f"{prefix}.__json__"] = torch.frombuffer(bytearray(json.dumps(rest).encode("utf-8")), dtype=torch.uint8).clone()
    return out


def unflatten_state(prefix: str, tensors: dict[str, torch.Tensor], state: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The inverse of ``flatten_state`` (None when the checkpoint holds no such state)."""
    key = f"{prefix}.__json__"
    if key not in tensors:
        return None
    out = json.loads(bytes(tensors[key].tolist()).decode("utf-8"))
    head = f"{prefix}."
    out.update({k[len(head):]: v for k, v in tensors.items() if k.startswith(head) and k != key})
    return out


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that train (requires_grad), named as in the state dict: what a checkpoint of a
    run over a frozen base (an adapter) needs to hold."""
    return {name.replace(COMPILE_PREFIX, ""): p.detach().contiguous().cpu()
            for name, p in unwrap(model).named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], keep: int = 2,
                    extra: dict[str, torch.Tensor] | None = None, trainable_only: bool = False) -> Path:
    """Write checkpoints/step-N atomically and point ``latest`` at it; keep the newest ``keep``.
    ``extra`` tensors (EMA weights, a batch source's state) go beside the optimizer's;
    ``trainable_only``: the weights that train, not the frozen base (rebuilt from its run)."""
    tensors, meta = optimizer_tensors(opt)
    weights = trainable_tensors(model) if trainable_only else model_tensors(model)
    return write_checkpoint(run_dir, step, weights, tensors, meta, state, keep=keep, extra=extra)


def write_checkpoint(
    run_dir: Path, step: int, weights: dict[str, torch.Tensor], opt_tensors: dict[str, torch.Tensor], opt_meta: dict[str, Any], state: dict[str, Any], keep: int = 2,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """save_checkpoint from tensors already gathered (e.g. the full state of a sharded model)."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = make_temp_dir(root, f".tmp-step-{step}-")
    meta = opt_meta
    old = None
    try:
        save_safetensors(weights, tmp / "model.safetensors")
        tensors = {**opt_tensors, **rng_tensors(), **(extra or {})}
        save_safetensors(tensors, tmp / "optimizer.safetensors")
        atomic_write_text(tmp / "state.json", json.dumps({"step": step, **state, "optimizer": meta}, indent=1))
        if final.exists():  # re-saving a step: move the old folder aside, never delete it before the new one is in place
            old = root / f".old-step-{step}-{tmp.name.rsplit('-', 1)[-1]}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    atomic_write_text(root / "latest", f"step-{step}\n")
    olds = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in olds[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _recover_moved(root: Path) -> None:
    """A crash between moving a re-saved step aside and renaming its replacement in: move it back."""
    for old in root.glob(".old-step-*"):
        final = root / ("step-" + old.name.split("-")[2])
        if (old / "state.json").exists() and not final.exists():
            os.replace(old, final)


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    _recover_moved(root)
    marker = root / "latest"
    if marker.exists():
        path = root / marker.read_text().strip()
        if (path / "state.json").exists():
            return path
    done = [p for p in root.glob("step-*") if (p / "state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state, weights, optimizer+RNG tensors) of a checkpoint folder, without loading them anywhere."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise AdlError(f"cannot read {path / 'state.json'}: {e}") from None
    return state, read_safetensors(path / "model.safetensors"), read_safetensors(path / "optimizer.safetensors")


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None,
                    trainable_only: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore weights, optimizer and RNG from a checkpoint folder; returns its state dict and the
    tensors beside the optimizer's (EMA, batch-source state). ``trainable_only``: the checkpoint
    holds the tensors that train, and exactly those."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise AdlError(f"cannot read {path / 'state.json'}: {e}") from None
    if trainable_only:
        weights = read_safetensors(path / "model.safetensors")
        expected = trainable_tensors(model)
        if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
            odd = sorted(set(weights) ^ set(expected))[:3] or [k for k in weights if weights[k].shape != expected[k].shape][:3]
            raise AdlError(f"checkpoint {path} does not match the model's trainable tensors: {odd}")
        unwrap(model).load_state_dict(weights, strict=False)
    else:
        load_weights(model, path / "model.safetensors")
    tensors = read_safetensors(path / "optimizer.safetensors")
    if opt is not None:
        load_optimizer(opt, tensors, state.pop("optimizer"))
    restore_rng(tensors)
    return state, tensors
