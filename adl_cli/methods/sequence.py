"""``adl sequence RECIPE``: a language-model family (gpt, mamba, mamba2, mlstm, slstm, rnn,
perceiver_ar) trained on a synthetic sequence task through the one trainer.

The recipe (recipes/sequence/<name>.toml) names the family in ``[model]`` (its vocabulary comes
from the task), the task in ``[task]`` (its name, the training length, the lengths to evaluate at,
the task's own options) and ``[train]``. A batch is generated from (seed, step, micro-batch, rank),
so resuming is exact. Scored on the answers only: accuracy per answer token and per example (all
its answers right), on a fixed evaluation set per length (its own seed; the validation set that
training logs and that picks a learning rate is another), at the training length
and at the longer ``eval_lengths``; a model whose positions stop at its context
(``model.block_size``) is not scored past it.

``task.name = "lm"``: language modelling instead, as an `adl pretrain` run of the recipe's
[model] and [train] on the main job's corpus and tokenizer (recipes/pretrain/tiny.toml's [data];
``task.options`` change its keys, e.g. ``{ corpus = "notes.txt", tokenizer = "bytes" }``) at
``task.length`` tokens of context, scored in validation bits per byte (``eval_lengths`` do not
apply).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adl_cli.data.sequence_tasks import SEQUENCE_TASKS, make_task
from adl_cli.engine.checkpoint import atomic_write_text
from adl_cli.engine.trainer import TrainConfig, Trainer
from adl_cli.errors import AdlError
from adl_cli.methods.pretrain import start_run
from adl_cli.models import ModelConfig, build_model
from adl_cli.models.gpt import GPTConfig
from adl_cli.recipe import dump_recipe, load_recipe
from adl_cli.runs import save_run


@dataclass
class TaskSection:
    name: str = "selective_copy"
    length: int = 64  # the training length (the task's length parameter)
    eval_lengths: list[int] = field(default_factory=lambda: [128, 256])  # longer lengths to score at
    eval_examples: int = 512
    options: dict[str, Any] = field(default_factory=dict)  # the task's own: k, data_vocab, keys, ...

    def validate(self) -> None:
        names = [*SEQUENCE_TASKS.names(), LM]
        if self.name not in names:
            raise ValueError(f"task.name must be one of {', '.join(names)}, got '{self.name}'")
        if self.length < 1 or self.eval_examples < 1 or any(n < 1 for n in self.eval_lengths):
            raise ValueError("task.length, task.eval_lengths and task.eval_examples must be >= 1")


@dataclass
class SequenceRecipe:
    name: str = "sequence"
    description: str = ""
    model: ModelConfig = field(default_factory=GPTConfig)
    task: TaskSection = field(default_factory=TaskSection)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if not hasattr(self.model, "vocab_multiple") or not hasattr(self.model, "block_size"):
            raise ValueError(f"model.family '{self.model.family}' is not a language model (gpt, mamba, rnn, perceiver_ar)")


def load_sequence_recipe(path: str | Path, overrides: list[str] | None = None) -> SequenceRecipe:
    return load_recipe(path, SequenceRecipe, overrides)


def _task(section: TaskSection):
    try:
        return make_task(section.name, **section.options)
    except TypeError as e:
        raise AdlError(f"task.options: {e}") from None


class TaskBatches:
    """Step -> batch: a fresh generated batch per (seed, step, micro-batch, rank)."""

    def __init__(self, task, length: int, batch_size: int, seed: int):
        self.task, self.length, self.batch_size, self.seed = task, length, batch_size, seed

    def __call__(self, step: int, micro: int, rank: int, world: int):
        gen = torch.Generator().manual_seed(hash((self.seed, step, micro, rank, world)) & 0x7FFF_FFFF)
        return self.task.batch(self.batch_size, self.length, gen)


LM = "lm"  # language modelling: the main job's corpus and tokenizer (recipes/pretrain/tiny.toml), in bits per byte


def lm_pretrain_recipe(model: ModelConfig, name: str, context: int, train: TrainConfig | None = None, data: dict[str, Any] | None = None):
    """A pretraining recipe for language modelling with ``model`` at ``context`` tokens:
    recipes/pretrain/tiny.toml's [data] (``data``: keys of it to change, e.g. the corpus) and its
    training settings unless ``train`` is given."""
    import dataclasses

    from adl_cli.cli.recipes import find_recipe
    from adl_cli.methods.pretrain import load_pretrain_recipe

    base = load_pretrain_recipe(find_recipe("pretrain/tiny"))
    keys = {f.name for f in dataclasses.fields(base.data)}
    unknown = sorted(set(data or {}) - keys)
    if unknown:
        raise AdlError(f"task.options: the lm task takes [data] keys of adl pretrain ({', '.join(sorted(keys))}), got {', '.join(unknown)}")
    corpus = dataclasses.replace(base.data, **(data or {}))
    try:
        corpus.validate()
    except ValueError as e:
        raise AdlError(f"task.options: {e}") from None
    return dataclasses.replace(base, name=name, description=f"{model.family} on the main job's corpus at {context} tokens",
                               model=dataclasses.replace(model, block_size=context), train=train or base.train, data=corpus, sample_tokens=1)


VALIDATION = 1  # the seed of the validation sets (choosing a learning rate); the scores use seed 0


@torch.no_grad()
def task_scores(model, task, length: int, examples: int, seed: int = 0, batch_size: int = 128) -> dict[str, Any]:
    """Accuracy on the answers of a fixed evaluation set at ``length``: per answer token and per
    example (every answer right); loss over the answers."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    x, y = task.batch(examples, length, torch.Generator().manual_seed(10_007 + seed))
    right = total = whole = 0
    loss = 0.0
    try:
        for i in range(0, examples, batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            logits = model(xb)[0].float()
            logits = logits[:, -yb.shape[1]:]  # (a Perceiver AR predicts its last positions only)
            mask = yb != -100
            hit = (logits.argmax(-1) == yb) & mask
            right += int(hit.sum())
            total += int(mask.sum())
            whole += int((hit.sum(1) == mask.sum(1)).sum())
            loss += float(torch.nn.functional.cross_entropy(logits[mask], yb[mask], reduction="sum"))
    finally:
        model.train(was)
    return {"length": length, "examples": examples, "accuracy": right / total, "exact": whole / examples, "loss": loss / total}


@dataclass
class SequenceOutcome:
    run_dir: Path
    summary: dict[str, Any]
    main: bool = True


def run_sequence(recipe: SequenceRecipe, out: Path, *, resume: bool = False, force: bool = False, progress: bool | None = True,
                 accelerator=None, log=print) -> SequenceOutcome:
    out = Path(out)
    t0 = time.perf_counter()
    ts = recipe.task
    if ts.name == LM:
        return _run_lm(recipe, out, resume=resume, force=force, progress=progress, accelerator=accelerator, log=log)
    task = _task(ts)
    try:
        spec = task.spec(ts.length)
        task.batch(1, ts.length, torch.Generator())  # the task's own checks, before anything is written
    except ValueError as e:
        raise AdlError(f"task: {e}") from None
    cfg = recipe.model.with_vocab(spec.vocab_size)
    fixed = not getattr(cfg, "recurrent", False)  # positions or a context stop at model.block_size
    if fixed and spec.seq_len > cfg.block_size:
        raise AdlError(f"task.length {ts.length} makes examples of {spec.seq_len} tokens, longer than model.block_size {cfg.block_size}")
    start = start_run(recipe, out, resume=resume, force=force, accelerator=accelerator, log=log, load=load_sequence_recipe)
    acc, main, log = start.acc, start.main, start.log
    torch.manual_seed(recipe.train.seed)
    model = build_model(cfg)
    log(f"task: {ts.name} at length {ts.length} ({spec.seq_len} tokens, {spec.answers} answer(s), vocabulary {spec.vocab_size}); "
        f"model: {getattr(cfg, 'label', cfg.family)}, {model.num_params(non_embedding=False):,} parameters")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        header = f"resolved recipe of the sequence run in {out.name}; `adl sequence {out / 'recipe.toml'} --out NEW_DIR` reproduces it"
        atomic_write_text(out / "recipe.toml", dump_recipe(recipe, header=header))
    tc = recipe.train
    batches = TaskBatches(task, ts.length, tc.batch_size, tc.seed)

    def loss_fn(m, batch):
        x, y = batch
        return m(x, y)[1]

    def eval_fn(m):  # the validation set (seed 1): never the set the final scores come from
        s = task_scores(m, task, ts.length, min(ts.eval_examples, 256), seed=VALIDATION)
        return {"val_loss": s["loss"], "val_acc": s["accuracy"]}

    trainer = Trainer(model, tc, run_dir=out, batch_fn=batches, loss_fn=loss_fn, eval_fn=eval_fn, units_per_batch=tc.batch_size * spec.seq_len,
                      unit="tokens", flops_per_unit=model.flops_per_token(min(spec.seq_len, cfg.block_size)), accelerator=acc,
                      progress=None if progress is None else progress and main, run_name=recipe.name)
    result = trainer.fit(resume=resume, checkpoint=start.checkpoint)
    if not main:
        return SequenceOutcome(out, {}, main=False)
    final = trainer.raw_model.eval()
    save_run(out, final)
    lengths = [ts.length, *ts.eval_lengths]
    scores = []
    for n in lengths:
        if fixed and task.spec(n).seq_len > cfg.block_size:
            scores.append({"length": n, "skipped": f"{task.spec(n).seq_len} tokens exceed model.block_size {cfg.block_size}"})
            continue
        try:
            scores.append(task_scores(final, task, n, ts.eval_examples))
        except ValueError as e:  # the task cannot be posed at that length
            scores.append({"length": n, "skipped": str(e)})
    summary = {"name": recipe.name, "family": getattr(cfg, "label", cfg.family), "task": ts.name, "length": ts.length, "parameters": model.num_params(non_embedding=False),
               "steps": result.steps, "tokens_seen": result.units, "tokens_per_s": result.units_per_s, "train_wall_s": result.wall_s,
               "wall_s": time.perf_counter() - t0, "scores": scores,
               "val": task_scores(final, task, ts.length, ts.eval_examples, seed=VALIDATION)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "report.md", report_markdown(summary))
    return SequenceOutcome(out, summary)


def _run_lm(recipe: SequenceRecipe, out: Path, **kw) -> SequenceOutcome:
    """Language modelling as an `adl pretrain` run (its folder, report and checkpoints) of the
    recipe's [model] and [train] at task.length tokens; scored in validation bits per byte."""
    from adl_cli.methods.pretrain import load_pretrain_recipe, run_pretrain

    ts = recipe.task
    outcome = run_pretrain(lm_pretrain_recipe(recipe.model, recipe.name, ts.length, recipe.train, ts.options), out, load=load_pretrain_recipe, **kw)
    if not outcome.main:
        return SequenceOutcome(out, {}, main=False)
    p = outcome.summary
    return SequenceOutcome(out, {"name": recipe.name, "family": getattr(recipe.model, "label", recipe.model.family), "task": LM, "length": ts.length,
                                 "parameters": p["parameters"], "steps": p["steps"], "tokens_seen": p["tokens"], "tokens_per_s": p["tokens_per_s"],
                                 "train_wall_s": p["train_wall_s"], "scores": [{"length": ts.length, "bits_per_byte": p["val_bits_per_byte"]}]})


def report_markdown(s: dict[str, Any]) -> str:
    lines = [f"# {s['name']}: {s['family']} on {s['task']}", "",
             f"{s['parameters']:,} parameters; {s['steps']} steps, {s['tokens_seen']:,} tokens in {s['train_wall_s']:.0f} s; trained at length "
             f"{s['length']}.", "", "| length | answer accuracy | examples all right | loss |", "|---|---|---|---|"]
    for r in s["scores"]:
        if "skipped" in r:
            lines.append(f"| {r['length']} | - | - | {r['skipped']} |")
        else:
            lines.append(f"| {r['length']} | {r['accuracy']:.2%} | {r['exact']:.2%} | {r['loss']:.4f} |")
    return "\n".join(lines) + "\n"
