"""Parameter-efficient fine-tuning (`adl lora`): a run adapted by LoRA, DoRA, QLoRA or bottleneck
adapters, or fully fine-tuned for comparison, on chat examples or on plain text.

The recipe starts from a run (``init.from``). On chat data (``data.tasks`` / ``data.files``, the
SFT issue's tasks and formats) the tokenizer gains the template's markers as in ``adl sft``; their
new embedding and head rows train beside the adapter through peft's trainable tokens
(``adapters/tokens.py``), the rest of both tables stays frozen. On plain text (``data.corpus``) the
base's tokenizer is kept and every token is a target.

``method``:
- ``full``: every weight trains (the reference the adapters are measured against); the result is
  a plain run folder.
- ``lora`` / ``dora``: ``[lora]`` (rank, alpha, dropout, targets, rsLoRA) through peft.
- ``qlora``: the blocks' linears frozen in NF4 (``[qlora]``: double quantization, compute dtype),
  LoRA on top in full precision; ``train.optimizer = "adamw8bit"`` and
  ``train.activation_checkpointing`` shrink the rest.
- ``adapter``: Houlsby bottlenecks (``[adapter]``).

The adapter tensors form their own parameter group whose peak lr is ``adapter_lr`` (``train.lr``
when 0); the other trainable tensors (new token rows, norms) take ``train.lr``. An adapter run's
folder holds the adapter and its tokenizer and names its base (``runs.save_adapter_run``):
``adl generate``, ``adl chat``, ``adl eval`` and ``adl export hf`` read it, ``adl lora merge``
folds it. Checkpoints hold only the tensors that train.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adl_cli.adapters.houlsby import BottleneckSection
from adl_cli.adapters.lora import LoraSection
from adl_cli.adapters.qlora import QloraSection
from adl_cli.data.chat import TemplateSection
from adl_cli.data.packing import Rows, collate
from adl_cli.engine.checkpoint import atomic_write_text
from adl_cli.engine.trainer import TrainConfig, Trainer, TrainResult
from adl_cli.errors import AdlError
from adl_cli.methods.pretrain import InitSection, start_run
from adl_cli.methods.sft import Outcome, SFTData, SFTDataset, build_dataset, evaluate_tasks, heldout_loss, load_base, row_training, start_tokenizer
from adl_cli.recipe import dump_recipe, load_recipe
from adl_cli.runs import parent_entry, save_adapter_run, save_run, transfer, write_lineage

METHODS = ("full", "lora", "dora", "qlora", "adapter", "longlora")
ROPE_FAMILY = ("rope", "pi", "ntk", "yarn")


@dataclass
class ContextSection:
    """The recipe's ``[context]``: fine-tune at a longer context than the base's (RoPE bases).
    Positions stretch by s = length / the base's context (``position``: pi, ntk, yarn; rope leaves
    them as they are); ``s2_group`` > 0 trains with S2-Attn (groups of that many tokens, half the
    heads shifted by half a group; LongLoRA uses length / 4); the saved run reads with the base's
    own attention, over the full context."""

    length: int = 0  # the context to fine-tune at, in tokens; 0: the base's own (no extension)
    position: str = "yarn"  # rope | pi | ntk | yarn
    s2_group: int = 0  # > 0: S2-Attn while training; method longlora: 0 means length / 4

    def validate(self) -> None:
        if self.length < 0:
            raise ValueError(f"context.length must be >= 0 (0: the base's context), got {self.length}")
        if self.position not in ROPE_FAMILY:
            raise ValueError(f"context.position must be one of {', '.join(ROPE_FAMILY)}, got {self.position!r}")
        if self.s2_group < 0:
            raise ValueError(f"context.s2_group must be >= 0 (0: full attention), got {self.s2_group}")


@dataclass
class FinetuneData(SFTData):
    """SFT's ``[data]`` (tasks, JSONL files, packing ...) or plain text."""

    corpus: str = ""  # plain text instead of chat examples: pydoc | stdlib | stdlib-tests | a file, folder or glob (its last val_fraction held out)
    val_windows: int = 64  # plain text: held-out windows in the held-out loss

    def validate(self) -> None:
        if self.corpus:
            if self.tasks or self.files:
                raise ValueError("data.corpus (plain text) and data.tasks / data.files (chat examples) exclude each other; set one")
            if not 0.0 < self.val_fraction < 0.5:
                raise ValueError(f"data.val_fraction must be in (0, 0.5) for plain text, got {self.val_fraction}")
            return
        super().validate()


@dataclass
class FinetuneRecipe:
    name: str = "lora"
    description: str = ""
    method: str = "lora"  # full | lora | dora | qlora | adapter
    adapter_lr: float = 0.0  # the adapter tensors' peak lr (0: train.lr); new token rows and norms take train.lr
    samples: int = 3  # generated answers per task shown in the report
    init: InitSection = field(default_factory=InitSection)
    data: FinetuneData = field(default_factory=lambda: FinetuneData(tasks=["addition"]))
    template: TemplateSection = field(default_factory=TemplateSection)
    lora: LoraSection = field(default_factory=LoraSection)
    qlora: QloraSection = field(default_factory=QloraSection)
    adapter: BottleneckSection = field(default_factory=BottleneckSection)
    context: ContextSection = field(default_factory=ContextSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, lr=1e-3, min_lr=1e-4, warmup=20, weight_decay=0.0))

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.adapter_lr < 0:
            raise ValueError(f"adapter_lr must be >= 0 (0: train.lr), got {self.adapter_lr}")
        if self.method in ("lora", "dora", "qlora"):
            self.lora.validate()
        self.context.validate()
        if self.method == "longlora" and (not self.context.length or not self.data.corpus):
            raise ValueError("method longlora needs context.length (the longer context) and plain text (data.corpus)")
        if self.method == "adapter":
            self.adapter.validate()


def load_finetune_recipe(path: str | Path, overrides: list[str] | None = None) -> FinetuneRecipe:
    recipe = load_recipe(path, FinetuneRecipe, overrides)
    if not recipe.init.from_:
        raise AdlError(f"{path}: init.from must name the run to fine-tune (e.g. --set init.from=runs/tiny)")
    return recipe


# ----------------------------------------------------------------------------- data


def text_dataset(recipe: FinetuneRecipe, tokenizer, block: int) -> SFTDataset:
    """Plain text as rows of ``block`` tokens, every token a target: the corpus's training side as
    consecutive windows, ``data.val_windows`` windows of its held-out side for the loss."""
    from adl_cli.data.corpus import load_documents, split_documents

    d = recipe.data
    train_docs, val_docs = split_documents(load_documents(d.corpus), d.val_fraction)

    def windows(docs: list[str], limit: int | None) -> Rows | None:
        eot = np.array([tokenizer.eot_id], dtype=np.int64)
        ids = np.concatenate([part for doc in docs for part in (np.asarray(tokenizer.encode(doc), dtype=np.int64), eot)] or [eot])
        n = (len(ids) - 1) // block
        n = n if limit is None else min(n, limit)
        if n < 1:
            return None
        inputs = torch.from_numpy(ids[: n * block].reshape(n, block).copy())
        targets = torch.from_numpy(ids[1: n * block + 1].reshape(n, block).copy())
        return Rows(inputs, targets, None, torch.full((n,), block, dtype=torch.long))

    train, val = windows(train_docs, None), windows(val_docs, d.val_windows)
    if train is None or val is None:
        raise AdlError(f"data.corpus {d.corpus}: too little text for one window of {block + 1} tokens on each side of the split")
    tokens = len(train) * block
    counts = {"train_examples": len(train), "val_examples": len(val), "dropped": 0, "truncated": 0, "train_tokens": tokens,
              "trained_tokens": tokens, "rows": len(train), "fill": 1.0, "eval_problems": {}}
    return SFTDataset(train, val, {}, {}, counts)


# ----------------------------------------------------------------------------- the model


@dataclass
class Prepared:
    model: torch.nn.Module
    kind: str | None  # the adapter kind saved (lora | adapter), None for full fine-tuning
    config: dict[str, Any]  # what adapter.json records
    grow: dict[str, Any] | None
    read: dict[str, Any] = field(default_factory=dict)  # config changes the run is read with ([context])
    train: dict[str, Any] = field(default_factory=dict)  # ... and those only while training (S2-Attn)


def context_config(recipe: FinetuneRecipe, base_cfg) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config changes the run is read with, the extra ones while training) for ``[context]``:
    the longer block and stretched positions; S2-Attn only while training."""
    c = getattr(recipe, "context", None)
    if c is None:  # a method without [context] (adl rlhf dpo)
        return {}, {}
    if recipe.method == "longlora" and c.length <= base_cfg.block_size:
        raise AdlError(f"method longlora: context.length ({c.length}) must be longer than the base's context ({base_cfg.block_size})")
    if not c.length or c.length == base_cfg.block_size:
        return {}, {}
    if base_cfg.position not in ROPE_FAMILY:
        raise AdlError(f"context.length: the base uses {base_cfg.position!r} positions; extending the context needs a RoPE base")
    if c.length < base_cfg.block_size:
        raise AdlError(f"context.length {c.length} is shorter than the base's context {base_cfg.block_size}")
    from adl_cli.bench.context import position_options

    opts = position_options(c.position, dict(base_cfg.position_options), c.length / base_cfg.block_size, base_cfg.block_size)
    read = {"block_size": c.length, "position": c.position, "position_options": opts}
    group = c.s2_group or (c.length // 4 if recipe.method == "longlora" else 0)
    train = {}
    if group:
        if c.length % group:
            raise AdlError(f"context.s2_group {group} must divide context.length {c.length}")
        train = {"attention": "s2", "attention_options": {"group": group}}
    return read, train


def use_attention(model, name: str, options: dict) -> None:
    """Every attention block of ``model`` computes with kernel ``name`` (S2-Attn while training,
    the base's attention to read)."""
    from adl_cli.nn.attention import ATTENTION

    for m in model.modules():
        if hasattr(m, "kernel") and hasattr(m, "kernel_options"):
            m.kernel, m.kernel_options = ATTENTION.get(name), dict(options)
    model.config.attention, model.config.attention_options = name, dict(options)


def grown_base(base, tok, changes: dict[str, Any] | None = None):
    """(the base's weights with its tables grown for ``tok``'s new tokens and its config changed by
    ``changes`` (context), adapter.json's ``grow``, (old, new) ids or None)."""
    gcfg = dataclasses.replace(base.config, **changes) if changes else base.config
    grow, new_tokens = None, None
    if tok.vocab_size > base.tokenizer.vocab_size:
        new_tokens = (base.tokenizer.vocab_size, tok.vocab_size)
        if tok.vocab_size > gcfg.vocab_size:
            gcfg = gcfg.with_vocab(tok.vocab_size)
        grow = {"tokens": list(new_tokens), "vocab_size": gcfg.vocab_size}
    return transfer(base, gcfg, new_tokens=new_tokens), grow, new_tokens


def prepare_model(recipe: FinetuneRecipe, base, tok) -> Prepared:
    """The base's weights (its tables grown for new tokens), with the method's trainable parts."""
    read, train = context_config(recipe, base.config)
    model, grow, new_tokens = grown_base(base, tok, {**read, **train})
    method = recipe.method
    if method == "full":
        model.requires_grad_(True)
        return Prepared(model, None, {}, grow, read, train)
    config: dict[str, Any] = {}
    if new_tokens is not None:
        from adl_cli.adapters.tokens import add_token_rows

        model.requires_grad_(False)
        model = add_token_rows(model, list(range(*new_tokens)))
        config["token_rows"] = list(range(*new_tokens))
    if method == "adapter":
        from adl_cli.adapters.houlsby import add_bottlenecks

        model = add_bottlenecks(model, recipe.adapter)
        return Prepared(model, "adapter", {**recipe.adapter.to_dict(), **config}, grow, read, train)
    section = LoraSection(**{**recipe.lora.to_dict(), "dora": recipe.lora.dora or method == "dora"})
    if method == "longlora" and not section.modules_to_save:  # LongLoRA's "+": embeddings and norms train too
        norms = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n.split(".")[-1].startswith("ln_")})
        section.modules_to_save = ["wte", *norms]
    if "lm_head" in section.targets and new_tokens is not None:
        raise AdlError("lora.targets: lm_head cannot take a LoRA adapter while the chat template's new token rows train in it")
    if method == "qlora":
        from adl_cli.adapters.qlora import quantize

        model = quantize(model, recipe.qlora)
        config["qlora"] = recipe.qlora.to_dict()
    from adl_cli.adapters.lora import add_lora

    model = add_lora(model, section)
    return Prepared(model, "lora", {**section.to_dict(), **config}, grow, read, train)


def is_adapter_tensor(name: str) -> bool:
    return "lora_" in name or name.startswith("bottlenecks.")


def param_groups(recipe: FinetuneRecipe):
    """Adapter tensors at ``adapter_lr`` (as a scale of train.lr), the other trainable tensors at train.lr."""
    tc = recipe.train

    def groups(model) -> list[dict]:
        if recipe.method == "full":
            from adl_cli.engine.optim import param_groups as default

            return default(model, tc.weight_decay)
        adapter, other = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (adapter if is_adapter_tensor(name) else other).append(p)
        scale = recipe.adapter_lr / tc.lr if recipe.adapter_lr else 1.0
        out = [{"params": adapter, "weight_decay": tc.weight_decay, "lr_scale": scale}, {"params": other, "weight_decay": 0.0}]
        return [g for g in out if g["params"]]

    return groups


def trainable_counts(model) -> dict[str, int]:
    """{"trainable": tensors that train, "total": every tensor's elements (4-bit weights at their
    logical size), each shared tensor once}."""
    seen, trainable, total = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen or ".original_module." in name:  # peft's frozen original beside a module it trains in full
            continue
        seen.add(id(p))
        n = p.numel()
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        if shape is not None:  # a packed 4-bit weight holds two values per byte
            n = int(torch.Size(shape).numel())
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable": trainable, "total": total}


# ----------------------------------------------------------------------------- the run


def run_finetune(recipe: FinetuneRecipe, out: Path, *, resume: bool = False, force: bool = False, progress: bool | None = True,
                 accelerator=None, log=print, evaluate_base: bool = True, measure_memory: bool = True) -> Outcome:
    out = Path(out)
    t0 = time.perf_counter()
    start = start_run(recipe, out, resume=resume, force=force, accelerator=accelerator, log=log, load=load_finetune_recipe)
    acc, main, world, log, checkpoint = start.acc, start.main, start.world, start.log, start.checkpoint
    tc = recipe.train
    if world > 1 and tc.distributed == "fsdp" and recipe.method != "full":
        raise AdlError("train.distributed = \"fsdp\" shards full fine-tuning only; adapters train under ddp")
    base = load_base(recipe.init.from_, "adl lora")
    text = bool(recipe.data.corpus)
    if text:
        tok, template = base.tokenizer, None
    else:
        tok, template = start_tokenizer(base.tokenizer, recipe)
    read, _ = context_config(recipe, base.config)
    block = read.get("block_size", base.config.block_size)
    data = text_dataset(recipe, tok, block) if text else build_dataset(recipe, tok, template, block)
    c = data.counts
    log(f"data: {c['train_examples']:,} training {'windows' if text else 'examples'} ({c['train_tokens']:,} tokens, {c['trained_tokens']:,} trained), "
        f"{c['val_examples']:,} held out" + ("" if text else f"; {c['dropped']} dropped and {c['truncated']} truncated at {block} tokens"))

    torch.manual_seed(tc.seed)
    prep = prepare_model(recipe, base, tok)
    model = prep.model
    counts = trainable_counts(model)
    log(f"method {recipe.method} on {recipe.init.from_}: {counts['trainable']:,} of {counts['total']:,} parameters train "
        f"({counts['trainable'] / counts['total']:.2%})" + (f"; {len(prep.config['token_rows'])} new token rows" if prep.config.get("token_rows") else ""))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        header = f"resolved recipe of the fine-tuning run in {out.name}; `adl lora {out / 'recipe.toml'} --out NEW_DIR` reproduces it"
        atomic_write_text(out / "recipe.toml", dump_recipe(recipe, header=header))
        tok.save(out)
        write_lineage(out, [parent_entry("init", base)])
    accum, batches, loss_fn, units_fn, eval_fn = row_training(recipe, data, tok, world, block)

    groups = param_groups(recipe)
    trainer = Trainer(model, tc, run_dir=out, batch_fn=batches, loss_fn=loss_fn, eval_fn=eval_fn, units_per_batch=tc.batch_size * block,
                      units_fn=units_fn, unit="tokens", param_groups=groups, accelerator=acc,
                      progress=None if progress is None else progress and main, grad_accum=accum, run_name=recipe.name,
                      frozen_base=recipe.method != "full")
    memory = measure_step(trainer, groups, collate(data.rows, torch.arange(tc.batch_size)), loss_fn) if measure_memory and main and not resume else None
    if memory is not None:
        log(f"memory: {memory['peak'] / 2**20:,.1f} MiB of tensors at the peak of a training step (model {memory['model'] / 2**20:,.1f}, "
            f"step {memory['step'] / 2**20:,.1f}: activations, gradients, optimizer state)")
    result = trainer.fit(resume=resume, checkpoint=checkpoint)
    if not main:
        return Outcome(out, result, {}, main=False)
    final = trainer.raw_model
    if prep.train:  # read with the base's own attention over the whole context
        use_attention(final, base.config.attention, base.config.attention_options)
    save_result(out, recipe, prep, final, tok, base)
    final.eval()
    val = heldout_loss(final, data.val_rows, tc.batch_size) if data.val_rows is not None else None
    scores, base_scores = {}, {}
    if data.eval_sets:
        log("evaluating: exact match of greedy answers on the held-out problems" + (" (the base run too)" if evaluate_base else ""))
        scores = evaluate_tasks(final, tok, data, None, keep_samples=recipe.samples)
        base_scores = evaluate_tasks(base.model, base.tokenizer, data, None, keep_samples=recipe.samples) if evaluate_base else {}
    base_val = None
    if evaluate_base and data.val_rows is not None:  # the base as fine-tuning starts from it (new rows at the mean)
        start_model = grown_base(base, tok, read)[0].eval()
        base_val = heldout_loss(start_model, data.val_rows, tc.batch_size)
    summary = summarize(recipe, data, result, batches, counts, memory, val, base_val, scores, base_scores, time.perf_counter() - t0)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "report.md", report_markdown(summary))
    return Outcome(out, result, summary)


def measure_step(trainer: Trainer, groups, batch, loss_fn) -> dict[str, int]:
    """Peak tensor memory of one training step (forward, backward, an optimizer step of the run's
    kind at lr 0 on a throw-away optimizer), the model's own tensors included; the model is left
    as it was (gradients dropped)."""
    import dataclasses

    from adl_cli.engine import optim
    from adl_cli.engine.memory import step_memory

    model, cfg = trainer.raw_model, trainer.cfg
    batch = trainer._to_device(batch)
    still = dataclasses.replace(cfg, lr=0.0, muon_lr=0.0, fused_adamw=False)  # every rate 0: the weights do not move
    opt, _ = optim.make_optimizer(cfg.optimizer, groups(model), still, trainer.device, trainer.amp_dtype)
    was = model.training

    def step():
        model.train()
        with trainer.autocast():
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()

    try:
        with trainer.rng_fork():  # dropout's draws here leave training's random stream as it was
            return step_memory(model, step, trainer.device)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
        del opt


def save_result(out: Path, recipe: FinetuneRecipe, prep: Prepared, model, tok, base) -> None:
    """Full fine-tuning: a plain run folder. An adapter: its tensors (and new token rows) and
    adapter.json naming the base, beside the tokenizer."""
    if prep.kind is None:
        save_run(out, model, tok)
        return
    from adl_cli.adapters.tokens import token_tensors

    if prep.kind == "adapter":
        from adl_cli.adapters.houlsby import adapter_tensors as bottleneck_tensors

        tensors = bottleneck_tensors(model, recipe.adapter)
    else:
        from adl_cli.adapters.lora import adapter_tensors

        tensors = adapter_tensors(model)
        tensors = {k: v for k, v in tensors.items() if "trainable_tokens" not in k}
    tensors.update(token_tensors(model))
    save_adapter_run(out, base.path, prep.kind, prep.config, {k: v.cpu() for k, v in tensors.items()}, grow=prep.grow, model=prep.read)


def summarize(recipe, data: SFTDataset, result: TrainResult, batches, counts, memory, val, base_val, scores, base_scores, wall: float) -> dict[str, Any]:
    return {
        "name": recipe.name,
        "kind": "finetune",
        "method": recipe.method,
        "init": recipe.init.from_,
        "data": "text: " + recipe.data.corpus if recipe.data.corpus else "chat: " + ", ".join(recipe.data.tasks + recipe.data.files),
        "trainable_parameters": counts["trainable"],
        "parameters": counts["total"],
        "trainable_share": counts["trainable"] / counts["total"],
        "peak_tensor_bytes": memory["peak"] if memory else None,
        "model_tensor_bytes": memory["model"] if memory else None,
        "steps": result.steps,
        "step_s": result.wall_s / max(1, result.steps),
        "trained_tokens": result.units,
        "tokens_seen": batches.tokens_seen,
        "train_wall_s": result.wall_s,
        "wall_s": wall,
        "train_loss": result.train_loss,
        "val_loss": val,
        "base_val_loss": base_val,
        "optimizer": result.optimizer,
        "precision": result.precision,
        "device": result.device,
        "counts": data.counts,
        "tasks": {name: {"sft": s.to_dict(), "base": base_scores[name].to_dict() if name in base_scores else None} for name, s in scores.items()},
    }


def report_markdown(s: dict[str, Any]) -> str:
    mem = f"{s['peak_tensor_bytes'] / 2**20:,.1f} MiB" if s.get("peak_tensor_bytes") else "not measured"
    lines = [f"# Fine-tuning run {s['name']} ({s['method']})", "",
             f"From `{s['init']}` on {s['data']}: {s['steps']} steps in {s['train_wall_s']:.0f} s ({s['step_s'] * 1e3:.0f} ms a step) "
             f"on {s['device']} ({s['precision']}, {s['optimizer']}).", "",
             "| trainable parameters | share | peak tensor memory | held-out loss | base held-out loss | train loss |", "|---|---|---|---|---|---|",
             f"| {s['trainable_parameters']:,} | {s['trainable_share']:.2%} | {mem} | {_f(s['val_loss'])} | {_f(s.get('base_val_loss'))} | {_f(s['train_loss'])} |"]
    if s["tasks"]:
        lines += ["", "| task | n | base exact match | exact match (95% CI) |", "|---|---|---|---|"]
        for name, t in s["tasks"].items():
            r, b = t["sft"], t["base"]
            lines.append(f"| {name} | {r['n']} | {'-' if not b else format(b['accuracy'], '.1%')} | {r['accuracy']:.1%} ({r['ci95'][0]:.1%}-{r['ci95'][1]:.1%}) |")
        lines += ["", "## Generated answers", ""]
        for name, t in s["tasks"].items():
            for smp in t["sft"]["samples"]:
                lines.append(f"- {name}: {smp['question']!r} -> {smp['answer']!r} ({'right' if smp['correct'] else 'wrong'})")
    return "\n".join(lines) + "\n"


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"
