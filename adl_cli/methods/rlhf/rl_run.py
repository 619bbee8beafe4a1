"""The frame of an RL run (`adl rlhf grpo`, `adl rlhf ppo`): the recipe's shared tables, the policy
prepared from a chat run (in full or through adapters, dropout off), its reference, the held-out
problems, and the summary's shared figures (greedy exact match before and after, paired)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from adl_cli.adapters.lora import LoraSection
from adl_cli.adapters.qlora import QloraSection
from adl_cli.data.chat import ChatTemplate
from adl_cli.data.tasks import make_task, split_problems
from adl_cli.engine.checkpoint import atomic_write_text
from adl_cli.engine.trainer import TrainConfig
from adl_cli.methods.exact_match import exact_match, paired_interval
from adl_cli.methods.finetune import prepare_model, trainable_counts
from adl_cli.methods.pretrain import InitSection
from adl_cli.methods.rlhf.common import chat_base, check_policy, disable_dropout
from adl_cli.methods.rlhf.rollouts import TaskData
from adl_cli.recipe import dump_recipe
from adl_cli.runs import parent_entry, write_lineage


def _train_defaults() -> TrainConfig:
    return TrainConfig(steps=100, batch_size=8, lr=1e-5, min_lr=1e-6, warmup=5, weight_decay=0.0, grad_clip=1.0, eval_every=25,
                       checkpoint_every=50, log_every=1)


@dataclass
class RLRecipe:
    """What every RL recipe holds besides its method's own table."""

    name: str = "rl"
    description: str = ""
    method: str = "full"  # full | lora | dora | qlora
    adapter_lr: float = 0.0
    init: InitSection = field(default_factory=InitSection)
    data: TaskData = field(default_factory=TaskData)
    lora: LoraSection = field(default_factory=LoraSection)
    qlora: QloraSection = field(default_factory=QloraSection)
    train: TrainConfig = field(default_factory=_train_defaults)

    def validate(self) -> None:
        check_policy(self)


@dataclass
class PolicyStart:
    base: Any  # the chat run (its model is the reference of a full policy)
    tokenizer: Any
    template: ChatTemplate
    tasks: dict
    prep: Any  # finetune.Prepared
    policy: torch.nn.Module
    counts: dict[str, int]
    adapters: bool
    held: dict  # task -> held-out problems (the final exact match's)


def start_policy(recipe: RLRecipe, out: Path, main: bool, command: str, header: str) -> PolicyStart:
    """The policy from ``recipe.init.from`` (dropout off, multi-token heads frozen) and, on the main
    process, the run folder's recipe, tokenizer and lineage."""
    d = recipe.data
    base = chat_base(recipe.init.from_, command)
    tok = base.tokenizer
    tasks = {n: make_task(n, scratchpad=d.scratchpad, operand_digits=d.operand_digits) for n in d.tasks}
    torch.manual_seed(recipe.train.seed)
    prep = prepare_model(recipe, base, tok)
    policy = disable_dropout(prep.model)
    if getattr(policy.config, "mtp_heads", 0):
        policy.mtp.requires_grad_(False)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "recipe.toml", dump_recipe(recipe, header=header))
        tok.save(out)
        write_lineage(out, [parent_entry("init", base)])
    held = {n: split_problems(t, d.eval_examples, held_out=True, seed=d.seed) for n, t in tasks.items()}
    return PolicyStart(base, tok, ChatTemplate.of(tok), tasks, prep, policy, trainable_counts(policy), recipe.method != "full", held)


def evaluate_start(ps: PolicyStart) -> dict:
    """The starting run's greedy exact match on the held-out problems, per task."""
    return {n: exact_match(ps.base.model, ps.tokenizer, ps.tasks[n], ps.held[n], keep_samples=3) for n in ps.tasks}


def make_reference(ps: PolicyStart) -> tuple[Callable, torch.nn.Module | None]:
    """(a factory giving the reference, the frozen model to move to the trainer's device or None):
    the starting run's model, frozen; for an adapter policy the policy itself with its adapters
    off (no second copy: the base's model is released)."""
    if ps.adapters:
        from adl_cli.adapters.lora import adapters_off

        ps.base.model = None
        policy = ps.policy
        return (lambda: (lambda: adapters_off(policy))), None
    ref = disable_dropout(ps.base.model).eval().requires_grad_(False)
    return (lambda: ref), ref


def eval_exact(ps: PolicyStart, prompts: int, unwrap=lambda m: m):
    """The trainer's evaluation: greedy exact match on the first ``prompts`` held-out problems."""

    def eval_fn(m):
        return {f"exact_{n}": exact_match(unwrap(m), ps.tokenizer, ps.tasks[n], ps.held[n][:prompts], keep_samples=0).accuracy for n in ps.tasks}

    return eval_fn


def summary_common(recipe: RLRecipe, ps: PolicyStart, result, final, before: dict, prompts: int, t0: float) -> dict[str, Any]:
    """The figures every RL summary holds; the final model's greedy exact match beside the start's."""
    after = {n: exact_match(final, ps.tokenizer, ps.tasks[n], ps.held[n], keep_samples=3) for n in ps.tasks} if recipe.data.eval_examples else {}
    return {
        "name": recipe.name, "method": recipe.method, "init": recipe.init.from_, "tasks": recipe.data.tasks, "problems": recipe.train.batch_size,
        "trainable_parameters": ps.counts["trainable"], "parameters": ps.counts["total"], "steps": result.steps, "completions": result.units,
        "train_wall_s": result.wall_s, "wall_s": time.perf_counter() - t0, "step_s": result.wall_s / max(1, result.steps),
        "precision": result.precision, "device": result.device, "world_size": result.world_size, "last_step": result.train_metrics,
        "exact_start": {n: sum(before[n].outcomes[:prompts]) / max(1, len(before[n].outcomes[:prompts])) for n in before},
        "exact_match": {n: {"before": before[n].to_dict() if n in before else None, "after": after[n].to_dict(),
                            "paired": paired_interval(before[n].outcomes, after[n].outcomes) if n in before else None} for n in after},
    }


def exact_match_lines(exact: dict[str, Any]) -> list[str]:
    """The report's table of greedy exact match before and after, with the paired gain."""
    if not exact:
        return []
    lines = ["| task | n | before | after | paired gain (95% CI) |", "|---|---|---|---|---|"]
    for n, e in exact.items():
        b, a, p = e["before"], e["after"], e["paired"]
        gain = "-" if not p else f"{p['gain']:+.1%} ({p['ci95'][0]:+.1%} to {p['ci95'][1]:+.1%})"
        lines.append(f"| {n} | {a['n']} | {'-' if not b else format(b['accuracy'], '.1%')} | {a['accuracy']:.1%} | {gain} |")
    return lines
