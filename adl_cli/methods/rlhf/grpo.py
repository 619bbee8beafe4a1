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
same values, without the extra forward). Logged every step: reward, accuracy, format rate,
completion length, KL to the reference, clip fraction, the share of groups whose rewards are all
equal (they carry no signal) and the seconds the step's rollouts took (sampling and scoring).
Evaluation: greedy exact match on held-out problems; at the end, before and after on the same
problems with a paired 95% interval.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adl_cli.data.chat import ChatTemplate
from adl_cli.data.packing import IGNORE
from adl_cli.engine.checkpoint import atomic_write_text
from adl_cli.engine.trainer import Trainer
from adl_cli.methods.finetune import param_groups, save_result
from adl_cli.methods.pretrain import start_run
from adl_cli.methods.rlhf.common import load_policy_recipe, reference_logits
from adl_cli.methods.rlhf.rl_run import RLRecipe, eval_exact, evaluate_start, exact_match_lines, make_reference, start_policy, summary_common
from adl_cli.methods.rlhf.rollouts import RolloutSource, completion_logps, draw_problems, rollout_seed, sample_answers
from adl_cli.methods.sft import Outcome
from adl_cli.nn.policy_gradient import LOSS_TYPES, group_advantages, kl_k3, policy_loss, token_weights


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
class GRPORecipe(RLRecipe):
    name: str = "grpo"
    grpo: GRPOSection = field(default_factory=GRPOSection)


def load_grpo_recipe(path: str | Path, overrides: list[str] | None = None) -> GRPORecipe:
    return load_policy_recipe(path, GRPORecipe, overrides, "runs/sft-tiny")


# ----------------------------------------------------------------------------- rollouts


class Rollouts(RolloutSource):
    """The trainer's batch source: a step's problems, their sampled answers, rewards, advantages
    and old log-probs. Rollouts are a function of (seed, step, micro-batch, rank) and the policy;
    with ``iterations`` > 1 the same rollouts serve that many consecutive steps."""

    def __init__(self, policy, template: ChatTemplate, tasks: dict, cfg: GRPOSection, problems: int, seed: int, autocast):
        self.policy, self.template, self.tasks, self.cfg, self.seed, self.autocast = policy, template, tasks, cfg, seed, autocast
        self.problems = problems

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
                with self.autocast():
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
                ref_lp = completion_logps(None, batch["inputs"], targets, reference_logits(reference(), policy, batch["inputs"]))
            k3 = kl_k3(logps, ref_lp) * mask
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
    acc, main, log, checkpoint = start.acc, start.main, start.log, start.checkpoint
    tc, g, d = recipe.train, recipe.grpo, recipe.data
    ps = start_policy(recipe, out, main, "adl rlhf grpo",
                      f"resolved recipe of the GRPO run in {out.name}; `adl rlhf grpo {out / 'recipe.toml'} --out NEW_DIR` reproduces it")
    policy = ps.policy
    log(f"policy: {recipe.method} on {recipe.init.from_}, {ps.counts['trainable']:,} of {ps.counts['total']:,} parameters train; "
        f"{tc.batch_size} problems x {g.group} answers a step ({', '.join(d.tasks)}); loss {g.loss_type}, advantage {g.advantage}"
        f"{'' if g.scale_std else ' (not scaled)'}, clip [{1 - g.eps_low:g}, {1 + g.eps_high:g}], kl_beta {g.kl_beta}")
    before = {}
    if main and evaluate_base and d.eval_examples:
        log(f"evaluating the starting run: greedy exact match on {d.eval_examples} held-out problems per task")
        before = evaluate_start(ps)
    reference, ref_model = make_reference(ps)
    holder: dict[str, Any] = {}
    rollouts = Rollouts(policy, ps.template, ps.tasks, g, tc.batch_size, tc.seed, lambda: holder["trainer"].autocast())
    trainer = Trainer(policy, tc, run_dir=out, batch_fn=rollouts, loss_fn=grpo_loss(g, reference, policy), eval_fn=eval_exact(ps, g.eval_prompts),
                      units_per_batch=tc.batch_size * g.group, units_fn=lambda b: b["inputs"].shape[0], unit="completions",
                      param_groups=param_groups(recipe), accelerator=acc, progress=None if progress is None else progress and main,
                      grad_accum=tc.grad_accum, run_name=recipe.name, frozen_base=ps.adapters)
    holder["trainer"] = trainer
    if ref_model is not None:
        ref_model.to(trainer.device)
    result = trainer.fit(resume=resume, checkpoint=checkpoint)
    if not main:
        return Outcome(out, result, {}, main=False)
    final = trainer.raw_model
    save_result(out, recipe, ps.prep, final, ps.tokenizer, ps.base)
    final.eval()
    summary = {"kind": "grpo", **summary_common(recipe, ps, result, final, before, g.eval_prompts, t0),
               "grpo": {k: getattr(g, k) for k in g.__dataclass_fields__}}
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

