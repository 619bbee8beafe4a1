"""The run folder: the one module that writes and reads a run, for every model family.

    RUN/
      config.json            {"family": "gpt", ...}: the family's config (families.py registry)
      model.safetensors      the final weights (model.ema.safetensors: their moving average)
      tokenizer.json (+ tokenizer.tiktoken)   language-model runs
      recipe.toml            the resolved recipe (written by the method)
      lineage.json           what the run was made from: [{"kind": "init", "path", "sha256", ...}]
      adapter.json + adapter.safetensors      an adapter run: its kind, config and base run
      quantization.json      a quantized run (adl quantize): its layers' kinds; quantization/store.py
      metrics.jsonl, summary.json, report.md, checkpoints/step-N/

``load_run(path)`` gives the model (any family), its config and tokenizer; a run that
holds only an adapter loads its base run first and applies the adapter (``ADAPTERS``). A
folder without a final model loads its latest checkpoint. config.json without a
``family`` key is a GPT (folders written before families existed); weights in an older
layout of a family are upgraded by the family's ``upgrade_state``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adl_cli.engine.checkpoint import (
    assign_state,
    latest_checkpoint,
    load_weights,
    model_tensors,
    read_safetensors,
    save_safetensors,
    save_weights,
    unwrap,
)
from adl_cli.errors import AdlError
from adl_cli.fileio import atomic_write
from adl_cli.models import build_model, config_from_dict, family
from adl_cli.registry import Registry

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model.ema.safetensors"
LINEAGE = "lineage.json"
ADAPTER = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"

# Adapter kinds: name -> apply(model, config: dict, tensors: dict) -> model. The LoRA issue adds its own.
ADAPTERS = Registry("adapter kind")


@dataclass
class Run:
    path: Path
    config: Any
    model: nn.Module
    lineage: list[dict[str, Any]] = field(default_factory=list)
    weights: Path | None = None  # the file the weights came from
    tokenizer_dir: Path | None = None  # where tokenizer.json lives (None: the run has no tokenizer)
    _tokenizer: Any = None

    @property
    def tokenizer(self):
        """The run's tokenizer, read on first use (None when the run has none)."""
        if self._tokenizer is None and self.tokenizer_dir is not None:
            from adl_cli.data.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.load(self.tokenizer_dir)
        return self._tokenizer


# ----------------------------------------------------------------------------- reading


def read_json(path: Path, what: str = "") -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdlError(f"{path.parent} has no {path.name}: is it an adl run folder?") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise AdlError(f"cannot read {path}{what}: {e}") from None


def read_config(run_dir: Path):
    """The run's model config, as its family's config class."""
    run_dir = _run_dir(run_dir)
    path = run_dir / CONFIG
    data = read_json(path)
    if isinstance(data, dict) and ("architectures" in data or "model_type" in data):
        raise AdlError(f"{run_dir} is a transformers folder, not an adl run: bring it in with `adl import hf-gpt2 {run_dir} --out RUN`")
    try:
        return config_from_dict(data)
    except AdlError as e:
        raise AdlError(f"{path}: {e}") from None
    except (ValueError, TypeError) as e:
        raise AdlError(f"cannot read {path}: {e}") from None


def weights_path(run_dir: Path, *, ema: bool = False) -> Path:
    """The run's final weights, else its latest checkpoint's."""
    run_dir = _run_dir(run_dir)
    name = EMA_WEIGHTS if ema else WEIGHTS
    if (run_dir / name).exists():
        return run_dir / name
    ck = latest_checkpoint(run_dir)
    if ck is not None and (ck / name).exists():
        return ck / name
    if ema:
        raise AdlError(f"{run_dir} has no {EMA_WEIGHTS}: the run was not trained with train.ema")
    raise AdlError(f"{run_dir} has no {WEIGHTS} and no checkpoint")


def load_run(run_dir: Path, device: str | torch.device = "cpu", *, ema: bool = False) -> Run:
    """Model (eval mode, on ``device``), config, tokenizer (read on first use) and lineage of any run folder."""
    run_dir = _run_dir(run_dir)
    if (run_dir / ADAPTER).exists():
        return _load_adapter_run(run_dir, device)
    cfg = read_config(run_dir)
    model = build_model(cfg)
    path = weights_path(run_dir, ema=ema)
    from adl_cli.quantization.store import install_quantized

    quantized = install_quantized(run_dir, model)  # a quantized run: its layers' shells first
    load_weights(model, path, what="weights")
    model = model.to(device).eval()
    if quantized is not None:  # the kernels' forms, on the device
        from adl_cli.quantization.apply import prepare_all

        prepare_all(model)
    tok_dir = run_dir if (run_dir / "tokenizer.json").exists() else None
    return Run(run_dir, cfg, model, read_lineage(run_dir), path, tok_dir)


def read_lineage(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / LINEAGE
    if not path.exists():
        return []
    data = read_json(path)
    return list(data.get("parents", [])) if isinstance(data, dict) else []


def _run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise AdlError(f"run folder not found: {run_dir}")
    if not run_dir.is_dir():
        raise AdlError(f"{run_dir} is a file, not a run folder")
    return run_dir


# ----------------------------------------------------------------------------- writing


def write_config(run_dir: Path, cfg) -> None:
    atomic_write(Path(run_dir) / CONFIG, json.dumps(cfg.to_dict(), indent=1))


def save_run(run_dir: Path, model: nn.Module, tokenizer=None, *, ema_tensors: dict[str, torch.Tensor] | None = None,
             lineage: list[dict[str, Any]] | None = None) -> None:
    """The run's final model: weights + config.json (+ EMA weights, tokenizer files, lineage)."""
    run_dir = Path(run_dir)
    m = unwrap(model)
    save_weights(m, run_dir / WEIGHTS, metadata={"format": "pt", "adl": m.config.family})
    if ema_tensors is not None:
        save_safetensors(ema_tensors, run_dir / EMA_WEIGHTS, metadata={"format": "pt", "adl": m.config.family})
    write_config(run_dir, m.config)
    if tokenizer is not None:
        tokenizer.save(run_dir)
    if lineage is not None:
        write_lineage(run_dir, lineage)


def write_lineage(run_dir: Path, parents: list[dict[str, Any]]) -> None:
    atomic_write(Path(run_dir) / LINEAGE, json.dumps({"parents": parents}, indent=1))


def parent_entry(kind: str, run: Run, **extra: Any) -> dict[str, Any]:
    """A lineage record of ``run`` (as given on the command line, with the digest of its weights)."""
    entry = {"kind": kind, "path": str(run.path), "family": run.config.family}
    if run.weights is not None:
        entry["weights"] = run.weights.name if run.weights.parent == run.path else str(run.weights.relative_to(run.path))
        entry["sha256"] = file_digest(run.weights)
    return {**entry, **extra}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- init.from


def init_from(path: str | Path, cfg, *, device: str | torch.device = "cpu", new_tokens: tuple[int, int] | None = None) -> tuple[nn.Module, Run]:
    """A model of ``cfg`` holding the weights of the run at ``path`` (``init.from``).

    The run's family must be the recipe's; a shape difference is an AdlError that names the
    config keys that differ. ``new_tokens = (old, new)``: the tokenizer grew from ``old`` to
    ``new`` ids (special tokens added); the vocabulary tables (embedding, head) get rows
    ``old:new`` set to the mean of rows ``:old``, growing when ``cfg.vocab_size`` is larger
    (the rows a table grows by past ``new`` take the same mean)."""
    run = load_run(path, device)
    return transfer(run, cfg, device=device, new_tokens=new_tokens, where=path), run


def transfer(run: Run, cfg, *, device: str | torch.device = "cpu", new_tokens: tuple[int, int] | None = None, where=None) -> nn.Module:
    """A model of ``cfg`` holding ``run``'s weights (``init_from`` for a run already loaded)."""
    path = where if where is not None else run.path
    if run.config.family != cfg.family:
        raise AdlError(f"init.from {path}: the run is a '{run.config.family}' model, the recipe's [model] is '{cfg.family}'")
    model = build_model(cfg)
    tensors = model_tensors(run.model)
    if new_tokens is not None:
        tensors = _grow_vocab(tensors, model.state_dict(), run.config.vocab_size, *new_tokens)
    try:
        assign_state(model, tensors, f"init.from {path}:")
    except AdlError as e:
        old, new = run.config.to_dict(), cfg.to_dict()
        diff = [f"{k} {old.get(k)!r} (run) vs {new.get(k)!r} (recipe)" for k in new if old.get(k) != new.get(k) and k not in ("dropout",)]
        hint = f"; the recipe's [model] differs in {', '.join(diff[:4])}" if diff else ""
        raise AdlError(f"{e}{hint}") from None
    return model.to(device)


def _grow_vocab(tensors: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], old_rows: int, old: int, new: int) -> dict[str, torch.Tensor]:
    """Vocabulary tables (first dimension ``old_rows``) with rows ``old:new`` the mean of rows
    ``:old``; a table that must grow gets that mean in its extra rows too."""
    out = {}
    for name, t in tensors.items():
        target = fresh.get(name)
        if t.ndim == 2 and t.shape[0] == old_rows and target is not None and target.shape[0] >= new and target.shape[1:] == t.shape[1:]:
            mean = t[:old].float().mean(0).to(t.dtype)
            grown = mean.expand(target.shape[0], *t.shape[1:]).clone()  # rows past the table's old end: the mean (deterministic, so an adapter's base regrows alike)
            grown[:old_rows] = t
            grown[old:new] = mean
            t = grown
        out[name] = t
    return out


# ----------------------------------------------------------------------------- adapters


def save_adapter_run(run_dir: Path, base: Path, kind: str, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                     grow: dict[str, Any] | None = None, model: dict[str, Any] | None = None) -> None:
    """An adapter run: ``adapter.safetensors`` + ``adapter.json`` naming its kind, its config and the
    base run (relative to this folder when possible, so the pair can move together). ``grow``
    (``{"tokens": [old, new], "vocab_size": n}``): the base's vocabulary tables grow first, as
    ``init_from`` grows them, for a tokenizer with new special tokens (saved in this folder).
    ``model``: config keys the base is read with instead of its own (a longer context, stretched
    positions)."""
    run_dir = Path(run_dir)
    _adapter_kind(kind)
    try:
        ref = Path(_relative(Path(base), run_dir))
    except ValueError:
        ref = Path(base)
    save_safetensors(tensors, run_dir / ADAPTER_WEIGHTS, metadata={"format": "pt", "adl": f"adapter:{kind}"})
    meta = {"kind": kind, "base": str(ref), "config": config, **({"grow": grow} if grow else {}), **({"model": model} if model else {})}
    atomic_write(run_dir / ADAPTER, json.dumps(meta, indent=1))


def _adapter_kind(kind: str) -> Callable:
    """The function that applies an adapter kind (adl's own kinds registered on first use)."""
    if kind not in ADAPTERS:
        from adl_cli.adapters import register_all

        register_all()
    return ADAPTERS.get(kind)


def _relative(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), start.resolve())


def adapter_meta(run_dir: Path) -> tuple[dict[str, Any], Path]:
    """(adapter.json, the base run's folder) of an adapter run, the base checked to be there."""
    meta = read_json(run_dir / ADAPTER)
    if not isinstance(meta, dict) or "kind" not in meta or "base" not in meta:
        raise AdlError(f"{run_dir / ADAPTER}: needs 'kind' and 'base'")
    base = Path(meta["base"])
    base = base if base.is_absolute() else run_dir / base
    if not base.is_dir():
        raise AdlError(f"{run_dir / ADAPTER}: its base run {base} is not there (move the adapter and its base together)")
    return meta, base


def _load_adapter_run(run_dir: Path, device) -> Run:
    meta, base = adapter_meta(run_dir)
    run = load_run(base, device)
    apply: Callable = _adapter_kind(str(meta["kind"]))
    config, tensors = dict(meta.get("config", {})), read_safetensors(run_dir / ADAPTER_WEIGHTS)
    model, cfg = run.model, run.config
    grow, changes = meta.get("grow"), meta.get("model") or {}
    if grow or changes:
        try:
            cfg = dataclasses.replace(cfg, **changes)
            new_tokens = None
            if grow:
                cfg = cfg.with_vocab(int(grow["vocab_size"]))
                new_tokens = (int(grow["tokens"][0]), int(grow["tokens"][1]))
            model = transfer(run, cfg, device=device, new_tokens=new_tokens)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise AdlError(f"{run_dir / ADAPTER}: its 'grow' (tokens [old, new], vocab_size) or 'model' changes do not fit the base: {e}") from None
    if config.get("token_rows"):
        from adl_cli.adapters.tokens import restore

        model = restore(model, config, tensors)
    model = apply(model, config, tensors)
    lineage = [{"kind": "adapter-base", "path": str(base), "family": run.config.family}, *read_lineage(run_dir)]
    tok_dir = run_dir if (run_dir / "tokenizer.json").exists() else run.tokenizer_dir
    return Run(run_dir, cfg, model.to(device).eval(), lineage, run_dir / ADAPTER_WEIGHTS, tok_dir)
