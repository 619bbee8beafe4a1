"""Supervised fine-tuning: a run's model taught to answer through a chat template.

The recipe starts from a run (``init.from``): its weights and tokenizer, to which the template's
markers are added as special tokens (the embedding and head grow by as many rows, each the mean
of the old rows), with numbers split into single digits unless ``data.digits = "bpe"``. The
examples are built-in tasks (``adl_cli.data.tasks``, generated with disjoint held-out problems)
and JSONL files (``adl_cli.data.chat``); the loss covers the assistant's tokens and its end
marker only (``data.train_on_prompt`` covers all). Examples are packed into rows with a
segment mask and positions restarting per example (``data.pack``), and the trainer weighs each
micro-batch by the targets it trains. Evaluation: held-out loss, and exact match of greedy
answers per task (during training on a few problems, at the end on ``data.eval_examples``, for
the base run too), with Wilson 95% intervals.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from adl_cli.data.chat import ChatTemplate, TemplateSection, read_jsonl
from adl_cli.data.packing import IGNORE, RowBatches, encode_conversations, pack, unpacked
from adl_cli.data.tasks import TASKS, make_task, split_problems
from adl_cli.engine.checkpoint import atomic_write_text
from adl_cli.engine.distributed import resolve_grad_accum
from adl_cli.engine.trainer import TrainConfig, Trainer, TrainResult
from adl_cli.errors import AdlError
from adl_cli.methods.exact_match import exact_match
from adl_cli.methods.pretrain import InitSection, start_run
from adl_cli.recipe import dump_recipe, load_recipe
from adl_cli.runs import init_from, load_run, parent_entry, read_config, save_run, write_config, write_lineage


@dataclass
class SFTData:
    """The recipe's ``[data]``: which examples, how they become rows, what is evaluated."""

    tasks: list[str] = field(default_factory=list)  # built-in tasks (`adl sft tasks`)
    files: list[str] = field(default_factory=list)  # JSONL files: Alpaca or chat shape
    train_examples: int = 20000  # training problems per task
    val_examples: int = 200  # held-out problems per task for the held-out loss
    eval_examples: int = 1000  # held-out problems per task for the final exact match
    eval_examples_during: int = 100  # ... and for the exact match at each evaluation during training
    val_fraction: float = 0.05  # of each JSONL file's examples held out (after a seeded shuffle)
    scratchpad: bool = False  # arithmetic answers show their steps before the result
    operand_digits: int = 3  # addition operands below 10^k (multiplication: at most 2 digits)
    short_operands: float = 0.25  # share of training problems with operands of 1..k digits (held-out problems stay uniform)
    seed: int = 0  # problems, the held-out split and the packing order
    digits: Literal["single", "bpe"] = "single"  # numbers pre-split into digits, or the base tokenizer's pieces
    truncation: Literal["drop", "left"] = "drop"  # an example longer than the context: dropped, or its prompt cut from the left
    pack: bool = True  # several examples per row (segment mask, positions restart); false: one per row, padded
    train_on_prompt: bool = False  # the loss covers every token, not just the assistant's

    def validate(self) -> None:
        if not self.tasks and not self.files:
            raise ValueError("data.tasks or data.files must name some examples")
        for name in self.tasks:
            TASKS.get(name)
        for key in ("train_examples", "val_examples", "eval_examples", "eval_examples_during", "operand_digits"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if not 1 <= self.operand_digits <= 9:
            raise ValueError(f"data.operand_digits must be 1 to 9, got {self.operand_digits}")
        if not 0.0 <= self.short_operands <= 1.0:
            raise ValueError(f"data.short_operands must be in [0, 1], got {self.short_operands}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class SFTRecipe:
    name: str = "sft"
    description: str = ""
    samples: int = 3  # generated answers per task shown in the report
    init: InitSection = field(default_factory=InitSection)
    data: SFTData = field(default_factory=lambda: SFTData(tasks=["addition"]))
    template: TemplateSection = field(default_factory=TemplateSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=500, lr=3e-4, min_lr=3e-5, warmup=20, weight_decay=0.0))


def load_sft_recipe(path: str | Path, overrides: list[str] | None = None) -> SFTRecipe:
    recipe = load_recipe(path, SFTRecipe, overrides)
    if not recipe.init.from_:
        raise AdlError(f"{path}: init.from must name the run to fine-tune (e.g. --set init.from=runs/tiny)")
    return recipe


# ----------------------------------------------------------------------------- data


@dataclass
class SFTDataset:
    rows: Any  # packed or unpacked training rows
    val_rows: Any  # held-out examples, one per row
    eval_sets: dict[str, list]  # task -> held-out problems for the final exact match
    tasks: dict[str, Any]  # task name -> Task
    counts: dict[str, Any]


def build_dataset(recipe: SFTRecipe, tokenizer, template: ChatTemplate, block: int) -> SFTDataset:
    d = recipe.data
    tasks = {name: make_task(name, scratchpad=d.scratchpad, operand_digits=d.operand_digits) for name in d.tasks}
    train_convs, val_convs = [], []
    sources: list[str] = []
    for name, task in tasks.items():
        train_task = make_task(name, scratchpad=d.scratchpad, operand_digits=d.operand_digits, short_operands=d.short_operands)
        train = split_problems(train_task, d.train_examples, held_out=False, seed=d.seed)
        val = split_problems(task, d.val_examples, held_out=True, seed=d.seed, stream="loss")
        train_convs += [p.messages() for p in train]
        val_convs += [p.messages() for p in val]
        sources += [name] * len(train)
    for path in d.files:
        convs = read_jsonl(path)
        random.Random(f"{d.seed}:{path}").shuffle(convs)
        n_val = int(round(len(convs) * d.val_fraction))
        val_convs += convs[:n_val]
        train_convs += convs[n_val:]
    train = encode_conversations(template, train_convs, block, truncation=d.truncation, train_on_prompt=d.train_on_prompt)
    val = encode_conversations(template, val_convs, block, truncation=d.truncation, train_on_prompt=d.train_on_prompt)
    if not train.examples:
        raise AdlError(f"data: no training example fits the context of {block} tokens (data.truncation = {d.truncation!r})")
    rows = pack(train.examples, block, seed=d.seed) if d.pack else unpacked(train.examples, block)
    eval_sets = {name: split_problems(task, d.eval_examples, held_out=True, seed=d.seed) for name, task in tasks.items()}
    total = sum(len(e) for e in train.examples)
    counts = {
        "train_examples": len(train.examples), "val_examples": len(val.examples), "dropped": train.dropped + val.dropped,
        "truncated": train.truncated + val.truncated, "train_tokens": total,
        "trained_tokens": sum(e.trained for e in train.examples), "rows": len(rows),
        "fill": total / (len(rows) * block) if d.pack else None,
        "eval_problems": {k: len(v) for k, v in eval_sets.items()},
    }
    return SFTDataset(rows, unpacked(val.examples, block) if val.examples else None, eval_sets, tasks, counts)


def start_tokenizer(base_tok, recipe: SFTRecipe):
    """(the SFT run's tokenizer, its template): the base's with single digits (unless bpe) and the markers."""
    tok = base_tok.with_single_digits() if recipe.data.digits == "single" else base_tok
    if base_tok.chat:  # fine-tuning a chat run again: keep its markers
        old = ChatTemplate.of(base_tok)
        section = TemplateSection(**{**old.markers, "default_system": recipe.template.default_system})
        if section.markers() != recipe.template.markers():
            raise AdlError(f"init.from: the run already has the chat template {old.markers}; the recipe's [template] must match it")
    try:
        return ChatTemplate.attach(tok, recipe.template)
    except ValueError as e:
        raise AdlError(f"template: {e}") from None


def load_base(path: str, what: str = "SFT"):
    """The run a fine-tuning starts from (``init.from``), checked: a GPT with its tokenizer."""
    if not Path(path).is_dir():
        makers = {"runs/tiny": "`make run` writes the main job, runs/tiny, where the shipped recipes start",
                  "runs/addition": "`adl sft addition` writes it from runs/tiny; the preference recipes start there"}
        hint = f" ({makers[path]})" if path in makers else ""
        raise AdlError(f"init.from {path}: no run folder there{hint}; set another with --set init.from=RUN")
    base = load_run(path)
    if base.tokenizer is None:
        raise AdlError(f"init.from {path}: the run has no tokenizer.json; {what} needs the tokenizer the model was trained with")
    if base.config.family != "gpt":
        raise AdlError(f"init.from {path}: {what} fine-tunes GPT runs, this one is a '{base.config.family}' model")
    return base


# ----------------------------------------------------------------------------- evaluation


def task_settings(run_dir: Path) -> tuple[int, dict]:
    """(split seed, task options) a run was fine-tuned with (its recipe.toml), so evaluating it
    later asks the same held-out problems; defaults for a run that is not an SFT run."""
    path = Path(run_dir) / "recipe.toml"
    try:
        recipe = load_recipe(path, SFTRecipe) if path.exists() else None
    except AdlError:
        recipe = None  # a pretraining recipe
    if recipe is None:
        return 0, {"scratchpad": False, "operand_digits": 3}
    return recipe.data.seed, {"scratchpad": recipe.data.scratchpad, "operand_digits": recipe.data.operand_digits}


def heldout_loss(model, rows, batch_size: int) -> float:
    """Mean loss per trained target over held-out examples (each alone in its row)."""
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), 0
    for start in range(0, len(rows), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(rows)))
        width = int(rows.lengths[idx].max())
        x, y = rows.inputs[idx, :width].to(device), rows.targets[idx, :width].to(device)
        n = int((y != IGNORE).sum())
        if n:
            total += model(x, y)[1].float() * n
            count += n
    return total.item() / max(1, count)


def evaluate_tasks(model, tokenizer, data: SFTDataset, limit: int | None, keep_samples: int = 3) -> dict[str, Any]:
    out = {}
    for name, problems in data.eval_sets.items():
        out[name] = exact_match(model, tokenizer, data.tasks[name], problems[:limit] if limit is not None else problems,
                                keep_samples=keep_samples)
    return out


def row_training(recipe, data: SFTDataset, tok, world: int, block: int):
    """(grad accumulation, batch source, loss, trained-target count, evaluation) for training on
    ``data``'s rows: the pieces `adl sft` and `adl lora` share."""
    tc = recipe.train
    accum = resolve_grad_accum(0, tc.grad_accum, world, tc.batch_size, block)
    try:
        batches = RowBatches(data.rows, tc.batch_size, accum, tc.seed, world)
    except ValueError as e:
        raise AdlError(f"data: {e}; lower train.batch_size or add examples") from None

    def loss_fn(m, batch):
        return m(batch["inputs"], batch["targets"], segment_ids=batch.get("segments"))[1]

    def units_fn(batch):
        return int((batch["targets"] != IGNORE).sum())

    def eval_fn(m):
        metrics = {}
        if data.val_rows is not None:
            metrics["val_loss"] = heldout_loss(m, data.val_rows, tc.batch_size)
        if recipe.data.eval_examples_during and data.eval_sets:
            for name, s in evaluate_tasks(m, tok, data, recipe.data.eval_examples_during, keep_samples=0).items():
                metrics[f"exact_{name}"] = s.accuracy
        return metrics

    return accum, batches, loss_fn, units_fn, eval_fn


# ----------------------------------------------------------------------------- the run


@dataclass
class Outcome:
    """What a fine-tuning run (adl sft, adl lora) returns; ``main`` is False on the other processes."""

    run_dir: Path
    result: TrainResult
    summary: dict[str, Any]
    main: bool = True


def run_sft(recipe: SFTRecipe, out: Path, *, resume: bool = False, force: bool = False, progress: bool | None = True,
            accelerator=None, log=print, evaluate_base: bool = True, objective=None, load=None) -> Outcome:
    """``objective`` and ``load``: as run_pretrain's (adl distill on the tasks)."""
    out = Path(out)
    t0 = time.perf_counter()
    start = start_run(recipe, out, resume=resume, force=force, accelerator=accelerator, log=log, load=load or load_sft_recipe)
    acc, main, world, log, checkpoint = start.acc, start.main, start.world, start.log, start.checkpoint

    base = load_base(recipe.init.from_)
    if resume:
        from adl_cli.data.tokenizer import Tokenizer

        tok = Tokenizer.load(out)
        template = ChatTemplate.of(tok)
        gcfg = read_config(out)
    else:
        tok, template = start_tokenizer(base.tokenizer, recipe)
        gcfg = base.config
        if tok.vocab_size > gcfg.vocab_size:
            gcfg = gcfg.with_vocab(tok.vocab_size)
    block = gcfg.block_size
    log(f"init: {recipe.init.from_} ({base.weights.name}); template markers {' '.join(template.markers.values())} "
        f"(ids {min(template.ids.values())}-{max(template.ids.values())}), numbers as {'single digits' if tok.single_digits else 'BPE pieces'}")
    data = build_dataset(recipe, tok, template, block)
    c = data.counts
    log(f"data: {c['train_examples']:,} training examples ({c['train_tokens']:,} tokens, {c['trained_tokens']:,} trained), "
        f"{c['val_examples']:,} held out; {c['dropped']} dropped and {c['truncated']} truncated at {block} tokens "
        f"({recipe.data.truncation}); " + (f"packed into {c['rows']:,} rows ({c['fill']:.0%} filled)" if recipe.data.pack else f"{c['rows']:,} unpacked rows"))

    torch.manual_seed(recipe.train.seed)
    if resume:
        from adl_cli.models import build_model

        model = build_model(gcfg)
    else:
        model, _ = init_from(base.path, gcfg, new_tokens=(base.tokenizer.vocab_size, tok.vocab_size))
    goal = objective(tok, gcfg, acc.device) if objective is not None else None  # checked before anything is written
    if goal is not None:
        goal.prepare(model)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        header = f"resolved recipe of the SFT run in {out.name}; `adl sft {out / 'recipe.toml'} --out NEW_DIR` reproduces it"
        atomic_write_text(out / "recipe.toml", dump_recipe(recipe, header=header))
        tok.save(out)
        write_config(out, gcfg)
        if not resume:
            write_lineage(out, [parent_entry("init", base)])
    tc = recipe.train
    accum, batches, loss_fn, units_fn, eval_fn = row_training(recipe, data, tok, world, block)
    if goal is not None:
        def loss_fn(m, batch):
            return goal.loss(m, batch["inputs"], batch["targets"], batch.get("segments"))

    trainer = Trainer(model, tc, run_dir=out, batch_fn=batches, loss_fn=loss_fn, eval_fn=eval_fn, units_per_batch=tc.batch_size * block,
                      units_fn=units_fn, unit="tokens", flops_per_unit=model.flops_per_token(block), accelerator=acc,
                      progress=None if progress is None else progress and main, grad_accum=accum, run_name=recipe.name)
    result = trainer.fit(resume=resume, checkpoint=checkpoint)
    if not main:
        return Outcome(out, result, {}, main=False)
    final = trainer.raw_model
    if goal is not None:
        goal.finish(final)
    save_run(out, final, tok)
    log("evaluating: exact match of greedy answers on the held-out problems" + (" (the base run too)" if evaluate_base else ""))
    final.eval()
    sft_scores = evaluate_tasks(final, tok, data, None, keep_samples=recipe.samples)
    base_scores = evaluate_tasks(base.model, base.tokenizer, data, None, keep_samples=recipe.samples) if evaluate_base else {}
    summary = summarize(recipe, final, data, result, batches, sft_scores, base_scores, tok, time.perf_counter() - t0)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "report.md", report_markdown(summary))
    return Outcome(out, result, summary)


def summarize(recipe, model, data: SFTDataset, result: TrainResult, batches: RowBatches, sft, base, tok, wall: float) -> dict[str, Any]:
    rows = data.rows
    return {
        "name": recipe.name,
        "kind": "sft",
        "init": recipe.init.from_,
        "parameters": model.num_params(non_embedding=False),
        "steps": result.steps,
        "trained_tokens": result.units,  # loss targets (assistant tokens and their end)
        "tokens_seen": batches.tokens_seen,  # every real token the model read (prompts too; no padding)
        "trained_tokens_per_s": result.units_per_s,
        "tokens_seen_per_s": batches.tokens_seen / result.wall_s if result.wall_s else None,
        "train_wall_s": result.wall_s,
        "wall_s": wall,
        "train_loss": result.train_loss,
        "val_loss": result.metrics.get("val_loss"),
        "precision": result.precision,
        "device": result.device,
        "world_size": result.world_size,
        "packed": recipe.data.pack,
        "truncation": recipe.data.truncation,
        "single_digits": tok.single_digits,
        "data": data.counts,
        "rows_shape": list(rows.inputs.shape),
        "tasks": {name: {"sft": s.to_dict(), "base": base[name].to_dict() if name in base else None} for name, s in sft.items()},
    }


def report_markdown(summary: dict[str, Any]) -> str:
    c = summary["data"]
    lines = [f"# SFT run {summary['name']}", "",
             f"From `{summary['init']}`: {summary['steps']} steps, {summary['trained_tokens']:,} trained tokens "
             f"({summary['tokens_seen']:,} read, prompts included) in {summary['train_wall_s']:.0f} s on {summary['device']} ({summary['precision']}); "
             f"numbers as {'single digits' if summary['single_digits'] else 'BPE pieces'}; {'packed' if summary['packed'] else 'unpacked'} rows.",
             "", f"Data: {c['train_examples']:,} training examples ({c['train_tokens']:,} tokens, {c['trained_tokens']:,} trained), "
             f"{c['val_examples']:,} held out for the loss; {c['dropped']} dropped and {c['truncated']} truncated at the context "
             f"(data.truncation = {summary.get('truncation', 'drop')!r}).",
             "", f"Held-out loss {summary['val_loss']:.3f} nats per trained token; train loss {summary['train_loss']:.3f}." if summary["val_loss"] is not None else "",
             "", "| task | n | base exact match (95% CI) | SFT exact match (95% CI) | SFT stopped by itself |", "|---|---|---|---|---|"]
    for name, t in summary["tasks"].items():
        s, b = t["sft"], t["base"]
        fmt = lambda r: f"{r['accuracy']:.1%} ({r['ci95'][0]:.1%}-{r['ci95'][1]:.1%})"  # noqa: E731
        lines.append(f"| {name} | {s['n']} | {fmt(b) if b else 'not measured'} | {fmt(s)} | {s['stopped'] / max(1, s['n']):.1%} |")
    lines += ["", "## Generated answers", ""]
    for name, t in summary["tasks"].items():
        for smp in t["sft"]["samples"]:
            lines.append(f"- {name}: {smp['question']!r} -> {smp['answer']!r} ({'right' if smp['correct'] else 'wrong'})")
    return "\n".join(lines) + "\n"
