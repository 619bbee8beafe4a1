"""Pretraining a GPT on a corpus: recipe -> tokens -> model -> the trainer -> report + sample.

The training objective is next-token cross-entropy, L = -mean_t log p(x_{t+1} | x_<=t);
bits per byte = L * tokens / bytes / ln 2 makes it comparable across tokenizers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adl_cli.data.tokens import DataSection, TokenData, WindowBatches, load_tokens
from adl_cli.engine.checkpoint import atomic_write_text, latest_checkpoint, unwrap
from adl_cli.engine.distributed import make_accelerator, resolve_grad_accum
from adl_cli.engine.trainer import TrainConfig, Trainer, TrainResult
from adl_cli.errors import AdlError, opt
from adl_cli.models import ModelConfig, build_model
from adl_cli.models.gpt import GPTConfig
from adl_cli.recipe import dump_recipe, load_recipe
from adl_cli.runs import init_from, parent_entry, read_config, save_run, write_config, write_lineage


@dataclass
class InitSection:
    """Where the weights start: ``from = "runs/tiny"`` loads a run's weights and tokenizer (its
    [model] shape must match); empty: a fresh initialisation."""

    from_: str = field(default="", metadata={"key": "from"})


@dataclass
class PretrainRecipe:
    name: str = "pretrain"
    description: str = ""
    sample_prompt: str = ""
    sample_tokens: int = 120
    model: ModelConfig = field(default_factory=GPTConfig)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: InitSection = field(default_factory=InitSection)


def load_pretrain_recipe(path: str | Path, overrides: list[str] | None = None) -> PretrainRecipe:
    return load_recipe(path, PretrainRecipe, overrides)


def _check_resume_shape(run_dir: Path, cfg) -> None:
    if not (run_dir / "config.json").exists():
        return
    old = read_config(run_dir).to_dict()
    new = cfg.to_dict()
    for key in ("family", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head", "block_size", "attention", "position", "bias"):
        if key in old and old[key] != new.get(key) and not (key == "n_kv_head" and (old[key] or new["n_head"]) == (new[key] or new["n_head"])):
            raise AdlError(
                f"{opt('resume')}: the checkpoint in {run_dir} was trained with {key}={old[key]!r}, the recipe now says {new.get(key)!r}; "
                f"use the run's own recipe.toml or a new {opt('out')}"
            )


RUN_FILES = ("model.safetensors", "config.json", "metrics.jsonl", "summary.json", "report.md", "checkpoints")
# what --resume may change without --force: the length of the run and how often it logs, evaluates and saves
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "name", "description", "sample_prompt", "sample_tokens")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("model", "data", "train", "init", "template"):
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def prepare_run_folder(out: Path, recipe, *, resume: bool, force: bool, main: bool = True, load=None) -> tuple[Any, list[str]]:
    """Refuse to replace or mix into an existing run unless asked; returns (the run's old recipe, changed keys).

    Without --resume a folder that holds a run is refused (or, with --force, its run files are
    removed first). With --resume, any change to the recipe other than RESUMABLE_KEYS is refused
    unless --force. ``load`` reads the run's own recipe (default: a pretraining recipe)."""
    import shutil

    from adl_cli.recipe import recipe_dict

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdlError(f"{opt('out')} {out} is a file, not a folder")
    present = [name for name in RUN_FILES if (out / name).exists()]
    if not resume:
        if present and not force:
            raise AdlError(f"{out} already holds a run ({', '.join(present[:3])}); continue it with {opt('resume')}, write elsewhere with {opt('out')} DIR, or replace it with {opt('force')}")
        if present and main:
            for name in present:
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        return None, []
    old_path = out / "recipe.toml"
    if not old_path.exists():
        return None, []
    try:
        old = (load or load_pretrain_recipe)(old_path)
    except AdlError as e:
        raise AdlError(f"{opt('resume')}: cannot read the run's own recipe ({e})") from None
    a, b = _flat(recipe_dict(old)), _flat(recipe_dict(recipe))
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    blocked = [k for k in changed if k not in RESUMABLE_KEYS]
    if blocked and not force:
        detail = ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in blocked[:3])
        raise AdlError(f"{opt('resume')}: the recipe differs from the run's own ({detail}); only train.steps and the log/eval/checkpoint cadence may change; "
                       f"resume with {old_path}, or pass {opt('force')} to continue with the new settings")
    return old, changed


def resume_grad_accum(ck_state: dict, recipe: PretrainRecipe, world: int, accum: int, *, force: bool, log) -> int:
    """Keep the checkpoint's global batch when the number of processes changed (or refuse)."""
    tc, block = recipe.train, recipe.model.block_size
    old_world, old_accum = int(ck_state.get("world_size", world)), int(ck_state.get("grad_accum", accum))
    step, units = int(ck_state.get("step", 0)), int(ck_state.get("units", 0))
    warmups = tc.seq_len_warmup or tc.batch_size_warmup  # the early steps were smaller: the full batch is the recipe's
    old_global = units // step if step and not warmups else tc.batch_size * block * old_accum * old_world
    new_global = tc.batch_size * block * accum * world
    if old_global == new_global:
        return accum
    per = tc.batch_size * block * world
    if not tc.global_batch_tokens and old_global % per == 0:
        kept = old_global // per
        log(f"[yellow]note:[/] resuming on {world} process(es) instead of {old_world}: train.grad_accum {accum} -> {kept} keeps the global batch at {old_global:,} tokens")
        return kept
    if force:
        log(f"[yellow]note:[/] --force: the global batch changes from {old_global:,} to {new_global:,} tokens")
        return accum
    raise AdlError(f"{opt('resume')}: the checkpoint was trained with a global batch of {old_global:,} tokens ({old_world} process(es)), this launch gives {new_global:,}; "
                   f"set train.global_batch_tokens={old_global} or a train.grad_accum that keeps it, or pass {opt('force')}")


@dataclass
class RunStart:
    """What every training method settles first: the accelerator (main process, world size), the
    log (silent on the other ranks), the checkpoint to resume and the run folder's old recipe."""

    acc: Any
    main: bool
    world: int
    log: Any
    checkpoint: Path | None
    ck_state: dict | None
    old_recipe: Any
    changed: list[str]


def start_run(recipe, out: Path, *, resume: bool, resume_from: Path | None = None, force: bool = False, accelerator=None, log=print,
              load=None) -> RunStart:
    """The accelerator, the checkpoint to resume, and the run folder made safe to write
    (``prepare_run_folder``); every process calls it."""
    acc = accelerator or make_accelerator(recipe.train.log_with, out)
    main, world = acc.is_main_process, acc.num_processes
    if not main:
        log = _quiet
    checkpoint = _resume_checkpoint(out, resume_from) if resume else None
    ck_state = _read_state(checkpoint) if checkpoint is not None else None
    if ck_state is not None:
        log(f"resuming from step {ck_state.get('step')} ({checkpoint})")
    old_recipe, changed = prepare_run_folder(out, recipe, resume=resume, force=force, main=main, load=load)
    acc.wait_for_everyone()
    if changed:
        log("[yellow]note:[/] resuming with changed settings: " + ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else ""))
    return RunStart(acc, main, world, log, checkpoint, ck_state, old_recipe, changed)


@dataclass
class PretrainOutcome:
    run_dir: Path
    result: TrainResult
    summary: dict[str, Any]
    sample: str
    main: bool = True  # False on the other ranks of a multi-process run: they print and write nothing


def run_pretrain(
    recipe: PretrainRecipe, out: Path, *, resume: bool = False, resume_from: Path | None = None, force: bool = False,
    progress: bool | None = True, accelerator=None, log=print, objective=None, load=None,
) -> PretrainOutcome:
    """Train; under torchrun / accelerate launch every process calls this, only the main one
    prints (``log``) and writes files; the others return an outcome with ``main=False``.
    ``objective(tokenizer, model config, device)``: an object whose ``loss(m, inputs, targets)``
    replaces cross-entropy, with ``prepare(model)`` / ``finish(model)`` around training (adl
    distill); ``load`` reads the run folder's own recipe on a resume."""
    out = Path(out)
    t0 = time.perf_counter()
    resume = resume or resume_from is not None
    start = start_run(recipe, out, resume=resume, resume_from=resume_from, force=force, accelerator=accelerator, log=log, load=load)
    acc, main, world, log = start.acc, start.main, start.world, start.log
    checkpoint, ck_state, old_recipe, changed = start.checkpoint, start.ck_state, start.old_recipe, start.changed
    log(f"data: corpus [bold]{recipe.data.corpus}[/], tokenizer {recipe.data.tokenizer}")
    tokenizer, base, vocab = _start_point(recipe, out, resume, log)
    with acc.main_process_first():  # one process tokenizes (and trains a BPE) into the cache; the others read it
        data: TokenData = load_tokens(recipe.data, tokenizer=tokenizer)
    gcfg = recipe.model.with_vocab(data.tokenizer.vocab_size)
    if vocab is not None:  # the starting run's table, as it is (an imported GPT-2 keeps its 50257 rows)
        gcfg = dataclasses.replace(gcfg, vocab_size=vocab)
    if resume:
        _check_resume_shape(out, gcfg)
    torch.manual_seed(recipe.train.seed)
    if base is not None:
        model, _ = init_from(base.path, gcfg)
        lineage = [parent_entry("init", base)]
    else:
        model, lineage = build_model(gcfg), None
    log(
        f"model: {model.num_params(non_embedding=False) / 1e6:.2f}M parameters, {gcfg.n_layer}L/{f'{gcfg.n_head}H/' if gcfg.n_head else ''}{gcfg.n_embd}, "
        f"block {gcfg.block_size}, vocab {gcfg.vocab_size} ({data.tokenizer.describe()}), attention {gcfg.attention}, position {gcfg.position}; "
        f"data: {len(data.train):,} train / {len(data.val):,} val tokens"
    )
    goal = objective(data.tokenizer, gcfg, acc.device) if objective is not None else None  # checked before anything is written
    if goal is not None:
        goal.prepare(model)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if old_recipe is not None and changed:  # keep the recipe that governed the steps so far beside the new one
            kept = out / f"recipe.until-step-{ck_state.get('step', 0)}.toml"
            if not kept.exists():
                atomic_write_text(kept, (out / "recipe.toml").read_text(encoding="utf-8"))
        header = f"resolved recipe of the run in {out.name}; `adl pretrain {out / 'recipe.toml'} --out NEW_DIR` reproduces it, `--resume` continues it"
        atomic_write_text(out / "recipe.toml", dump_recipe(recipe, header=header))
        data.tokenizer.save(out)
        write_config(out, gcfg)
        if lineage is not None:
            write_lineage(out, lineage)
    tc = recipe.train
    accum = resolve_grad_accum(tc.global_batch_tokens, tc.grad_accum, world, tc.batch_size, gcfg.block_size)
    if ck_state is not None:
        accum = resume_grad_accum(ck_state, recipe, world, accum, force=force, log=log)
        old_steps = old_recipe.train.steps if old_recipe is not None else tc.steps
        if tc.steps != old_steps:
            log(f"[yellow]note:[/] train.steps is now {tc.steps} (was {old_steps}): the lr schedule is recomputed for the new length")
    if tc.global_batch_tokens and tc.grad_accum not in (1, accum):
        log(f"[yellow]note:[/] train.grad_accum={tc.grad_accum} is ignored: train.global_batch_tokens={tc.global_batch_tokens:,} sets it to {accum}")
    if world > 1 or accum > 1:
        log(
            f"parallel: {world} process(es), {tc.distributed if world > 1 else 'single'}; global batch {tc.batch_size} x {gcfg.block_size} tokens "
            f"x {accum} accumulation x {world} = {tc.batch_size * gcfg.block_size * accum * world:,} tokens"
        )
    try:
        batches = WindowBatches(data.train, gcfg.block_size, tc.batch_size, accum, tc.seed, align=recipe.data.align, eot_id=data.tokenizer.eot_id,
                                seq_warmup=tc.seq_len_warmup, seq_start=tc.seq_len_start, batch_warmup=tc.batch_size_warmup, batch_start=tc.batch_size_start)
    except ValueError as e:
        raise AdlError(f"data: {e}") from None

    def loss_fn(m, batch):
        x, y = batch
        if goal is not None:
            return goal.loss(m, x, y)
        loss = m(x, y)[1]
        return loss, dict(unwrap(m).aux_metrics) if gcfg.mtp_heads else {}

    train_slice = _train_probe(data, tc.seed)
    scored = getattr(gcfg, "latents", None)  # Perceiver AR predicts only its latents' positions

    def eval_fn(m):
        """Loss over the held-out split (every token once, up to eval_batches batches) and over an
        equally long, fixed stretch of the training stream measured the same way (eval mode, same
        windowing): the gap between them is the generalisation gap."""
        return {"val_loss": split_loss(m, data.val, gcfg.block_size, tc.batch_size, tc.eval_batches, scored),
                "train_eval_loss": split_loss(m, train_slice, gcfg.block_size, tc.batch_size, tc.eval_batches, scored)}

    trainer = Trainer(
        model,
        tc,
        run_dir=out,
        batch_fn=batches,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        units_per_batch=tc.batch_size * gcfg.block_size,
        units_fn=(lambda b: b[0].numel()) if batches.varies else None,  # warm-ups change the batch shape: count each batch
        unit="tokens",
        flops_per_unit=model.flops_per_token(gcfg.block_size),
        accelerator=acc,
        progress=None if progress is None else progress and main,
        grad_accum=accum,
        run_name=recipe.name,
    )
    result = trainer.fit(resume=resume, checkpoint=checkpoint)
    weights = trainer.full_model_state() if trainer.sharded else None  # collective: the full weights on the main process
    if not main:
        return PretrainOutcome(out, result, {}, "", main=False)
    final = trainer.raw_model
    if goal is not None:
        goal.finish(final)
    if trainer.sharded:  # the trained model lives in shards: rebuild a plain one for saving and sampling
        final = build_model(gcfg)
        final.load_state_dict(weights, strict=False)
        final.to(trainer.device)
    save_run(out, final, data.tokenizer, ema_tensors=trainer.ema_model_state())
    sample = sample_text(final, data.tokenizer, recipe.sample_prompt, recipe.sample_tokens, seed=tc.seed)
    summary = summarize(recipe, model, data, result, sample, time.perf_counter() - t0)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return PretrainOutcome(out, result, summary, sample)


def _start_point(recipe: PretrainRecipe, out: Path, resume: bool, log):
    """(tokenizer, base run, vocab size) for ``init.from``: the base run's on a new run; on a resume,
    the run folder's own (its weights come from the checkpoint). All None without init.from."""
    if not recipe.init.from_:
        return None, None, None
    if resume:
        from adl_cli.data.tokenizer import Tokenizer

        return Tokenizer.load(out), None, read_config(out).vocab_size
    from adl_cli.runs import load_run

    base = load_run(recipe.init.from_)
    if base.tokenizer is None:
        raise AdlError(f"init.from {recipe.init.from_}: the run has no tokenizer.json, so it cannot continue on text")
    log(f"init: weights and tokenizer from {recipe.init.from_} ({base.weights})")
    return base.tokenizer, base, base.config.vocab_size


def split_loss(model, tokens, block: int, batch_size: int, max_batches: int, score_last: int | None = None) -> float:
    """Mean next-token loss over consecutive windows of a split (each token scored once), summed on
    the device: one host sync. ``score_last``: score each window's last that many positions only
    (split_windows; a model with ``latents`` in its config, Perceiver AR, predicts no others)."""
    from adl_cli.data.tokens import split_windows

    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    count = 0
    for x, y in split_windows(tokens, block, batch_size, max_batches, score_last=score_last):
        n = int((y != -100).sum())
        total += model(x.to(device), y.to(device))[1].float() * n
        count += n
    return total.item() / max(1, count)


def _train_probe(data: TokenData, seed: int):
    """A fixed stretch of the corpus's own training text (not the extra_train corpora: the same
    kind of text as the held-out split) as long as the held-out split, at most all of it."""
    import numpy as np

    own = data.corpus_train
    n = min(len(data.val), len(own))
    start = int(np.random.default_rng([seed, 7]).integers(0, len(own) - n + 1))
    return own[start:start + n]


def _read_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise AdlError(f"cannot read {checkpoint / 'state.json'}: {e}") from None


def _resume_checkpoint(out: Path, resume_from: Path | None) -> Path:
    """The checkpoint folder to resume from: --resume-from PATH, else the run's latest."""
    if resume_from is None:
        ck = latest_checkpoint(out)
        if ck is None:
            raise AdlError(f"{opt('resume')}: no checkpoint in {out / 'checkpoints'} (train first, or check {opt('out')})")
        return ck
    ck = Path(resume_from)
    if not (ck / "state.json").exists():
        raise AdlError(f"{opt('resume_from')} {ck}: not a checkpoint folder (it holds no state.json); checkpoints live in {out / 'checkpoints'}/step-N")
    return ck


def _quiet(*args, **kwargs) -> None:
    pass


def sample_text(model, tokenizer, prompt: str, n: int, *, seed: int = 0, temperature: float = 0.8, top_k: int | None = 40) -> str:
    from adl_cli.methods.generate import generate

    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, n, temperature=temperature, top_k=top_k, generator=g)
    new = out[0, idx.shape[1]:].tolist()
    return (prompt if prompt else "") + tokenizer.decode(new)


def unigram_entropy(tokens, vocab: int) -> float:
    """Cross-entropy (nats) of the best context-free model: the baseline a trained model must beat."""
    import numpy as np

    counts = np.bincount(np.asarray(tokens[: min(len(tokens), 2_000_000)], dtype=np.int64), minlength=vocab).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def summarize(recipe, model, data: TokenData, result: TrainResult, sample: str, wall: float) -> dict[str, Any]:
    val = result.val_loss
    return {
        "name": recipe.name,
        "parameters": model.num_params(non_embedding=False),  # every stored tensor (tied once), as import/export count
        "parameters_non_embedding": model.num_params(),
        "steps": result.steps,
        "tokens": result.units,
        "tokens_per_s": result.units_per_s,
        "mfu": result.mfu,
        "mfu_peak_dtype": result.peak_dtype,
        "train_loss": result.train_loss,
        "val_loss": val,
        "train_eval_loss": result.metrics.get("train_eval_loss"),
        "val_tokens": len(data.val),
        "train_tokens_available": len(data.train),
        "ema_val_loss": result.metrics.get("ema_val_loss"),
        "optimizer_schedule": result.schedule,
        "val_bits_per_byte": val / math.log(2) / data.val_bytes_per_token if val is not None else None,
        "unigram_loss": unigram_entropy(data.train, data.tokenizer.vocab_size),
        "wall_s": wall,  # this session, end to end
        "train_wall_s": result.wall_s,  # training, summed over every session of the run (resumes included)
        "resumed": result.resumed_from,
        "precision": result.precision,
        "optimizer": result.optimizer,
        "compile_s": result.compile_s,
        "attention": model.config.attention,
        "device": result.device,
        "world_size": result.world_size,
        "parallel": result.parallel,
        "grad_accum": result.grad_accum,
        "global_batch_tokens": result.units // result.steps if result.steps else None,
        "tf32": result.tf32,
        "tokenizer": data.tokenizer.describe(),
        "sample": sample,
    }
