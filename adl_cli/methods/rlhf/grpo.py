"""`adl rlhf grpo`: group-relative policy optimisation of a chat run on verifiable tasks (GRPO,
Dr. GRPO, DAPO's token-level loss and decoupled clip, RLOO advantages).

Each step draws ``train.batch_size`` training problems of the recipe's tasks (a pure function of the
seed and the step, so a resumed run asks the same questions), samples ``grpo.group`` answers to
each through the inference engine (cached decoding, temperature ``grpo.temperature``, dropout off),
and scores every answer with the task's verifier: reward = correct + ``format_weight`` x follows
the answer's format, the two logged apart. Advantages are group-relative (nn/policy_gradient.py);
the clipped surrogate is weighted per token by ``loss_type``; ``kl_beta`` > 0 adds k3 KL to the
reference (the starting run, or the same model with its adapters off for a LoRA policy). With
``grpo.iterations`` > 1 the old log-probs are the policy's own at rollout time (one forward, no
gradient), reused for that many updates; with 1 they are the update's own log-probs, detached (the
same values, without the extra forward). Logged every step: reward, accuracy, format rate, completion length,
KL to the reference, clip fraction, the share of groups whose rewards are all equal (they carry
no signal) and the seconds the step's rollouts took (sampling and scoring). Evaluation: greedy exact match on held-out problems; at the end, before and after on
the same problems with a paired 95% interval.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adl_cli.adapters.lora import LoraSection
from adl_cli.adapters.qlora import QloraSection
from adl_cli.data.chat import ChatTemplate
from adl_cli.data.packing import IGNORE
from adl_cli.data.tasks import make_task, split_problems
from adl_cli.engine.checkpoint import atomic_write_text
from adl_cli.engine.trainer import TrainConfig, Trainer
from adl_cli.methods.exact_match import exact_match, paired_interval
from adl_cli.methods.finetune import param_groups, prepare_model, save_result, trainable_counts
from adl_cli.methods.pretrain import InitSection, start_run
from adl_cli.methods.rlhf.common import chat_base, check_policy, disable_dropout, load_policy_recipe, reference_logits
from adl_cli.methods.rlhf.rollouts import TaskData, completion_logps, draw_problems, rollout_seed, sample_answers
from adl_cli.methods.sft import Outcome
from adl_cli.nn.policy_gradient import LOSS_TYPES, group_advantages, kl_k3, policy_loss, token_weights
from adl_cli.recipe import dump_recipe
from adl_cli.runs import parent_entry, write_lineage



@dataclass
class GRPOSection:
    group: int = 8  # answers sampled per problem
    max_new_tokens: int = 0  # 0: the task's own answer budget
    temperature: float = 1.0
    loss_type: str = "dapo"  # grpo (per-answer mean) | dapo (token-level) | dr_grpo (constant normaliser)
    advantage: str = "group"  # group (mean baseline) | rloo (leave-one-out baseline)
    scale_std: bool = True  # divide by the group's standard deviation (Dr. GRPO: false)
    eps_low: float = 0.2
    eps_high: float = 0.28  # DAPO's clip-higher; 0.2 for the symmetric PPO clip
    kl_beta: float = 0.0  # > 0: add beta x k3 KL to the reference to the loss (it is logged either way)
    iterations: int = 1  # updates per batch of rollouts (> 1: the clip matters)
    format_weight: float = 0.2  # reward = correct + format_weight x follows the format
    eval_prompts: int = 200  # held-out problems per task for the exact match at each evaluation

    def validate(self) -> None:
        for key in ("group", "iterations"):
            if getattr(self, key) < 1:
                raise ValueError(f"grpo.{key} must be >= 1, got {getattr(self, key)}")
        if self.group < 2:
            raise ValueError("grpo.group must be >= 2: advantages compare the answers to one problem")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"grpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.advantage not in ("group", "rloo"):
            raise ValueError(f"grpo.advantage must be group or rloo, got {self.advantage!r}")
        if self.temperature <= 0:
            raise ValueError(f"grpo.temperature must be > 0 (rollouts are sampled), got {self.temperature}")
        for key in ("eps_low", "eps_high", "kl_beta", "format_weight", "max_new_tokens", "eval_prompts"):
            if getattr(self, key) < 0:
                raise ValueError(f"grpo.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class GRPORecipe:
    name: str = "grpo"
    description: str = ""
    method: str = "full"  # full | lora | dora | qlora
    adapter_lr: float = 0.0
    init: InitSection = field(default_factory=InitSection)
    data: TaskData = field(default_factory=TaskData)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    lora: LoraSection = field(default_factory=LoraSection)
    qlora: QloraSection = field(default_factory=QloraSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, batch_size=8, lr=1e-5, min_lr=1e-6, warmup=5, weight_decay=0.0,
                                                                   grad_clip=1.0, eval_every=25, checkpoint_every=50, log_every=1))

    def validate(self) -> None:
        check_policy(self)


def load_grpo_recipe(path: str | Path, overrides: list[str] | None = None) -> GRPORecipe:
    return load_policy_recipe(path, GRPORecipe, overrides, "runs/sft-tiny")


# ----------------------------------------------------------------------------- rollouts


class Rollouts:
    """The trainer's batch source: a step's problems, their sampled answers, rewards, advantages
    and old log-probs. Rollouts are a function of (seed, step, micro-batch, rank) and the policy;
    with ``iterations`` > 1 the same rollouts serve that many consecutive steps."""

    def __init__(self, policy, template: ChatTemplate, tasks: dict, cfg: GRPOSection, problems: int, seed: int, autocast):
        self.policy, self.template, self.tasks, self.cfg, self.seed, self.autocast = policy, template, tasks, cfg, seed, autocast
        self.problems = problems
        self.cache: dict[tuple[int, int, int], dict] = {}

    def __call__(self, step: int, micro: int, rank: int, world: int) -> dict:
        key = (step // self.cfg.iterations, micro, rank)
        if key not in self.cache:
            self.cache = {k: v for k, v in self.cache.items() if k[0] == key[0]}
            self.cache[key] = self.rollout(*key)
        return self.cache[key]

    @torch.no_grad()
    def rollout(self, batch: int, micro: int, rank: int) -> dict:
        cfg, model = self.cfg, self.policy
        t0 = time.perf_counter()
        problems, owners = draw_problems(self.tasks, self.problems, self.seed, f"rl:{batch}:{micro}:{rank}")
        got = sample_answers(model, self.template, self.tasks, problems, owners, n=cfg.group, temperature=cfg.temperature,
                             max_new_tokens=cfg.max_new_tokens, seed=rollout_seed(self.seed, batch, micro, rank), autocast=self.autocast)
        rewards = got.correct + cfg.format_weight * got.formatted
        adv = group_advantages(rewards, cfg.group, scale=cfg.scale_std, rloo=cfg.advantage == "rloo")
        flat = (rewards.view(-1, cfg.group).std(1) == 0).float().mean()
        out = {"inputs": got.inputs, "targets": got.targets, "advantages": adv,
               "stats": {"reward": rewards.mean(), "accuracy": got.correct.mean(), "format": got.formatted.mean(),
                         "length": got.lengths.mean(), "flat_groups": flat}}
        if cfg.iterations > 1:  # old log-probs at rollout time; with one update the loss's own, detached, are the same values
            was = model.training
            model.eval()
            try:
                device = next(model.parameters()).device
                with torch.no_grad(), self.autocast():
                    out["old_logps"] = completion_logps(model, got.inputs.to(device), got.targets.to(device)).float().cpu()
            finally:
                model.train(was)
        out["stats"]["rollout_s"] = torch.tensor(time.perf_counter() - t0)
        return out


def grpo_loss(cfg: GRPOSection, reference, policy):
    """The trainer's loss on one batch of rollouts (and its per-step metrics)."""

    def loss_fn(m, batch):
        targets = batch["targets"]
        mask = targets != IGNORE
        logps = completion_logps(m, batch["inputs"], targets)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        loss, metrics = policy_loss(logps, old, batch["advantages"], mask, loss_type=cfg.loss_type,
                                    eps_low=cfg.eps_low, eps_high=cfg.eps_high)
        if reference is not None:
            with torch.no_grad():
                ref_logits = reference_logits(reference(), policy, batch["inputs"])
            ref_lp = -F.cross_entropy(ref_logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none").view(targets.shape)
            k3 = kl_k3(logps, ref_lp.detach()) * mask
            if cfg.kl_beta:
                loss = loss + cfg.kl_beta * (k3 * token_weights(mask, cfg.loss_type)).sum()
            metrics["kl"] = k3.detach().sum() / mask.sum().clamp_min(1)
        metrics.update({k: v.to(loss.device) for k, v in batch["stats"].items()})
        return loss, metrics

    return loss_fn


# ----------------------------------------------------------------------------- the run


def run_grpo(recipe: GRPORecipe, out: Path, *, resume: bool = False, force: bool = False, progress: bool | None = True,
             accelerator=None, log=print, evaluate_base: bool = True) -> Outcome:
    out = Path(out)
    t0 = time.perf_counter()
    start = start_run(recipe, out, resume=resume, force=force, accelerator=accelerator, log=log, load=load_grpo_recipe)
    acc, main, world, log, checkpoint = start.acc, start.main, start.world, start.log, start.checkpoint
    tc, g, d = recipe.train, recipe.grpo, recipe.data
    base = chat_base(recipe.init.from_, "adl rlhf grpo")
    tok = base.tokenizer
    template = ChatTemplate.of(tok)
    tasks = {n: make_task(n, scratchpad=d.scratchpad, operand_digits=d.operand_digits) for n in d.tasks}
    torch.manual_seed(tc.seed)
    prep = prepare_model(recipe, base, tok)
    policy = disable_dropout(prep.model)
    if getattr(policy.config, "mtp_heads", 0):
        policy.mtp.requires_grad_(False)
    counts = trainable_counts(policy)
    adapters = recipe.method != "full"
    log(f"policy: {recipe.method} on {recipe.init.from_}, {counts['trainable']:,} of {counts['total']:,} parameters train; "
        f"{tc.batch_size} problems x {g.group} answers a step ({', '.join(d.tasks)}); loss {g.loss_type}, advantage {g.advantage}"
        f"{'' if g.scale_std else ' (not scaled)'}, clip [{1 - g.eps_low:g}, {1 + g.eps_high:g}], kl_beta {g.kl_beta}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        header = f"resolved recipe of the GRPO run in {out.name}; `adl rlhf grpo {out / 'recipe.toml'} --out NEW_DIR` reproduces it"
        atomic_write_text(out / "recipe.toml", dump_recipe(recipe, header=header))
        tok.save(out)
        write_lineage(out, [parent_entry("init", base)])
    held = {n: split_problems(t, d.eval_examples, held_out=True, seed=d.seed) for n, t in tasks.items()}
    before = {}
    if main and evaluate_base and d.eval_examples:
        log(f"evaluating the starting run: greedy exact match on {d.eval_examples} held-out problems per task")
        before = {n: exact_match(base.model, tok, tasks[n], held[n], keep_samples=3) for n in tasks}

    if adapters:
        from adl_cli.adapters.lora import adapters_off

        base.model = None
        reference = lambda: (lambda: adapters_off(policy))  # noqa: E731
    else:
        ref_model = disable_dropout(base.model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
        reference = lambda: ref_model  # noqa: E731

    def eval_fn(m):
        return {f"exact_{n}": exact_match(m, tok, tasks[n], held[n][: g.eval_prompts], keep_samples=0).accuracy for n in tasks}

    holder: dict[str, Any] = {}
    rollouts = Rollouts(policy, template, tasks, g, tc.batch_size, tc.seed, lambda: holder["trainer"].autocast())
    trainer = Trainer(policy, tc, run_dir=out, batch_fn=rollouts, loss_fn=grpo_loss(g, reference, policy), eval_fn=eval_fn,
                      units_per_batch=tc.batch_size * g.group, units_fn=lambda b: b["inputs"].shape[0], unit="completions",
                      param_groups=param_groups(recipe), accelerator=acc, progress=None if progress is None else progress and main,
                      grad_accum=tc.grad_accum, run_name=recipe.name, frozen_base=adapters)
    holder["trainer"] = trainer
    if not adapters:
        ref_model.to(trainer.device)
    result = trainer.fit(resume=resume, checkpoint=checkpoint)
    if not main:
        return Outcome(out, result, {}, main=False)
    final = trainer.raw_model
    save_result(out, recipe, prep, final, tok, base)
    final.eval()
    after = {n: exact_match(final, tok, tasks[n], held[n], keep_samples=3) for n in tasks} if d.eval_examples else {}
    summary = {
        "name": recipe.name, "kind": "grpo", "method": recipe.method, "init": recipe.init.from_, "tasks": d.tasks,
        "grpo": {k: getattr(g, k) for k in g.__dataclass_fields__}, "problems": tc.batch_size, "trainable_parameters": counts["trainable"], "parameters": counts["total"],
        "steps": result.steps, "completions": result.units, "train_wall_s": result.wall_s, "wall_s": time.perf_counter() - t0,
        "step_s": result.wall_s / max(1, result.steps), "precision": result.precision, "device": result.device, "world_size": result.world_size,
        "last_step": result.train_metrics,
        "exact_start": {n: sum(before[n].outcomes[: g.eval_prompts]) / max(1, len(before[n].outcomes[: g.eval_prompts])) for n in before},
        "exact_match": {n: {"before": before[n].to_dict() if n in before else None, "after": after[n].to_dict(),
                            "paired": paired_interval(before[n].outcomes, after[n].outcomes) if n in before else None} for n in after},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "report.md", report_markdown(summary))
    return Outcome(out, result, summary)


def report_markdown(s: dict[str, Any]) -> str:
    g = s["grpo"]
    lines = [f"# GRPO run {s['name']} ({g['loss_type']}, {g['advantage']} advantages, {s['method']})", "",
             f"From `{s['init']}`: {s['steps']} steps, {s['completions']:,} sampled answers in {s['train_wall_s']:.0f} s on {s['device']} "
             f"({s['precision']}); {s['problems']} problems x {g['group']} answers a step.", ""]
    last = s.get("last_step") or {}
    if last:
        lines += ["Last logging step: " + ", ".join(f"{k} {v:.3g}" for k, v in last.items()) + ".", ""]
    lines += exact_match_lines(s["exact_match"])
    return "\n".join(lines) + "\n"


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
