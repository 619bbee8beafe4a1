"""`adl rlhf ppo`: InstructGPT-style PPO of a chat run (Ouyang et al. 2022; Ziegler et al. 2019;
Stiennon et al. 2020), with a value head, GAE, clipped policy and value losses, a per-token KL
penalty to the reference (fixed or adaptive) and optional PPO-ptx.

Each step draws ``train.batch_size`` training problems of the recipe's tasks, samples
``ppo.samples`` answers to each (cached decoding, dropout off) and scores every answer: by the
tasks' verifiers (correct + ``format_weight`` x well-formed) or, with ``ppo.reward`` naming a
reward run (`adl rlhf reward`), by the reward model at the answer's last token (shifted and scaled
once, before the first step, so that the starting policy's answers score mean 0 and standard
deviation 1: ``normalize_reward``). At rollout time
one forward of the policy gives the old log-probs and the old values, one of the reference its
log-probs; the per-token reward is

    r_t = -beta (log pi_old(y_t) - log pi_ref(y_t))  + [t = last] score,

and GAE (gamma, lambda) over the answer's tokens gives advantages (whitened over the batch's
tokens) and returns. The update minimises the clipped surrogate (token mean, clip ``ppo.clip``)
plus ``vf_coef`` x the clipped value loss, plus with ``ptx_coef`` > 0 that multiple of the
language-model loss on windows of a text corpus (InstructGPT's PPO-ptx, against the alignment
tax). The value head is a linear map of the policy's final hidden states (one trunk for both).
With ``kl_target`` > 0 beta adapts after every batch (Ziegler et al.'s proportional rule) to keep
the sampled KL per answer near the target; beta travels in the checkpoints.

Logged each step: reward (the score, before the KL penalty), accuracy and format rate of the
sampled answers, completion length, KL per answer (k1 summed over its tokens), beta, clip
fraction, value loss, the value's explained variance and the seconds the rollouts took (sampling,
scoring, the old and reference forwards). At the end, on held-out problems:
greedy exact match before and after (paired 95% interval), the mean verifier reward of sampled
answers before and after, and the exact KL per sampled answer against the recipe's target.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adl_cli.data.chat import ChatTemplate
from adl_cli.data.packing import IGNORE
from adl_cli.engine.checkpoint import atomic_write_text
from adl_cli.engine.trainer import Trainer
from adl_cli.errors import AdlError
from adl_cli.methods.finetune import param_groups, save_result, trainable_counts
from adl_cli.methods.pretrain import start_run
from adl_cli.methods.rlhf.common import disable_dropout, load_policy_recipe, reference_logits, sampled_kl
from adl_cli.methods.rlhf.rl_run import RLRecipe, eval_exact, evaluate_start, exact_match_lines, make_reference, start_policy, summary_common
from adl_cli.methods.rlhf.rollouts import RolloutSource, completion_logps, draw_problems, rollout_seed, sample_answers
from adl_cli.methods.sft import Outcome
from adl_cli.nn.policy_gradient import AdaptiveKL, gae, policy_loss, value_loss


@dataclass
class PPOSection:
    samples: int = 1  # answers sampled per problem (InstructGPT: 1)
    max_new_tokens: int = 0  # 0: the task's own answer budget
    temperature: float = 1.0
    reward: str = "verifier"  # verifier (the tasks' own) | a reward run's folder (adl rlhf reward)
    normalize_reward: bool = True  # a reward model's scores shifted and scaled to mean 0, std 1 on the starting policy's answers
    format_weight: float = 0.2  # verifier reward = correct + format_weight x follows the format
    kl_coef: float = 0.05  # beta of the per-token KL penalty (the start value when adaptive)
    kl_target: float = 0.0  # > 0: beta adapts to keep the KL per sampled answer near this many nats
    kl_horizon: int = 10000  # answers over which the adaptive rule moves beta by its full step
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2  # the ratio's clip, both sides
    value_clip: float = 0.2
    vf_coef: float = 0.1
    whiten: bool = True  # advantages to mean 0, std 1 over the batch's answer tokens
    iterations: int = 1  # updates per batch of rollouts
    ptx_coef: float = 0.0  # > 0: PPO-ptx, this multiple of the LM loss on ptx_data
    ptx_data: str = "pydoc"  # built-in corpus name, file, folder or glob
    ptx_rows: int = 4  # context windows of ptx_data per batch
    eval_prompts: int = 200  # held-out problems per task for the exact match at each evaluation

    def validate(self) -> None:
        for key in ("samples", "iterations", "kl_horizon", "ptx_rows"):
            if getattr(self, key) < 1:
                raise ValueError(f"ppo.{key} must be >= 1, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ValueError(f"ppo.temperature must be > 0 (rollouts are sampled), got {self.temperature}")
        for key in ("gamma", "lam"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"ppo.{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("max_new_tokens", "format_weight", "kl_coef", "kl_target", "clip", "value_clip", "vf_coef", "ptx_coef", "eval_prompts"):
            if getattr(self, key) < 0:
                raise ValueError(f"ppo.{key} must be >= 0, got {getattr(self, key)}")
        if not self.reward:
            raise ValueError("ppo.reward must be 'verifier' or a reward run's folder")


@dataclass
class PPORecipe(RLRecipe):
    name: str = "ppo"
    ppo: PPOSection = field(default_factory=PPOSection)


def load_ppo_recipe(path: str | Path, overrides: list[str] | None = None) -> PPORecipe:
    return load_policy_recipe(path, PPORecipe, overrides, "runs/sft-tiny")


class ActorCritic(nn.Module):
    """The policy and a value head on its final hidden states: one trunk pass gives the logits and
    a value per position. ``ptx`` (inputs, targets) adds the policy's LM loss on those rows to the
    same forward (one call, so DDP sees every use of the weights)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.weight._muon_excluded = True

    def forward(self, idx: torch.Tensor, ptx: tuple[torch.Tensor, torch.Tensor] | None = None):
        h = self.policy.hidden(idx)
        logits, values = self.policy.logits(h), self.value_head(h).squeeze(-1).float()
        lm = None if ptx is None else self.policy.token_loss(self.policy.hidden(ptx[0]), ptx[1])
        return logits, values, lm


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The (biased) variance of ``x`` over the positions where ``mask`` holds."""
    m = mask.float()
    n = m.sum().clamp_min(1.0)
    mean = (x * m).sum() / n
    return (((x - mean) * m) ** 2).sum() / n


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``x`` shifted and scaled to mean 0, std 1 over the positions where ``mask`` holds (0 elsewhere)."""
    m = mask.float()
    mean = (x * m).sum() / m.sum().clamp_min(1.0)
    return (x - mean) * torch.rsqrt(masked_var(x, mask) + eps) * m


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B,) the last position where each row's ``mask`` holds."""
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, cols, torch.zeros_like(cols)).max(1).values


def ptx_tokens(spec: str, tokenizer) -> np.ndarray:
    from adl_cli.data.corpus import load_documents

    ids: list[int] = []
    for doc in load_documents(spec):
        ids += list(tokenizer.encode(doc)) + [tokenizer.eot_id]
    return np.asarray(ids, dtype=np.int64)


class PPORollouts(RolloutSource):
    """The trainer's batch source: a step's sampled answers with their scores, old log-probs, old
    values, advantages and returns. Rollouts are a function of (seed, step, micro-batch, rank), the
    policy and beta; with ``iterations`` > 1 the same rollouts serve that many steps. Its state
    (beta, a reward model's shift and scale) is saved in every checkpoint."""

    def __init__(self, model: ActorCritic, reference, template: ChatTemplate, tasks: dict, cfg: PPOSection, problems: int, seed: int,
                 autocast, scorer=None, ptx: np.ndarray | None = None):
        self.model, self.reference, self.template, self.tasks, self.cfg = model, reference, template, tasks, cfg
        self.problems, self.seed, self.autocast, self.scorer, self.ptx = problems, seed, autocast, scorer, ptx
        self.kl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0 else None
        self.beta = cfg.kl_coef
        self.shift, self.scale = 0.0, 1.0  # a reward model's scores become (score - shift) / scale

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "reward_shift": self.shift, "reward_scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.shift, self.scale = float(state.get("reward_shift", 0.0)), float(state.get("reward_scale", 1.0))
        if self.kl is not None:
            self.kl.beta = self.beta

    @torch.no_grad()
    def normalize_scores(self, answers: int = 256) -> dict[str, float]:
        """Fix the reward model's shift and scale so that the starting policy's own answers to
        training problems score mean 0, standard deviation 1 (InstructGPT normalises its reward
        model so its SFT model's answers average 0): the value head and the KL penalty then see
        rewards of a known scale, whatever scale the reward model learned."""
        n = self.cfg.samples
        problems, owners = draw_problems(self.tasks, max(1, answers // n), self.seed, "ppo:normalise")
        got = sample_answers(self.model.policy, self.template, self.tasks, problems, owners, n=n, temperature=self.cfg.temperature,
                             max_new_tokens=self.cfg.max_new_tokens, seed=rollout_seed(self.seed, -1, 0, 0), autocast=self.autocast)
        raw = self.scores(got, next(self.model.parameters()).device, raw=True)
        self.shift, self.scale = float(raw.mean()), float(raw.std().clamp_min(1e-6)) if raw.numel() > 1 else 1.0
        return {"reward_shift": self.shift, "reward_scale": self.scale, "answers": int(raw.numel())}

    def scores(self, got, device, raw: bool = False) -> torch.Tensor:
        if self.scorer is None:
            return got.correct + self.cfg.format_weight * got.formatted
        full = torch.cat([got.inputs, torch.zeros(len(got.inputs), 1, dtype=torch.long)], 1)
        mask = got.targets != IGNORE
        last = last_positions(mask)
        rows = torch.arange(len(full))
        full[rows, last + 1] = got.targets[rows, last]
        with torch.no_grad(), self.autocast():
            score = self.scorer(full.to(device), last=(last + 1).to(device)).float().cpu()
        return score if raw else (score - self.shift) / self.scale

    @torch.no_grad()
    def rollout(self, batch: int, micro: int, rank: int) -> dict:
        cfg, policy = self.cfg, self.model.policy
        t0 = time.perf_counter()
        problems, owners = draw_problems(self.tasks, self.problems, self.seed, f"ppo:{batch}:{micro}:{rank}")
        got = sample_answers(policy, self.template, self.tasks, problems, owners, n=cfg.samples, temperature=cfg.temperature,
                             max_new_tokens=cfg.max_new_tokens, seed=rollout_seed(self.seed, batch, micro, rank), autocast=self.autocast)
        device = next(self.model.parameters()).device
        inputs, targets = got.inputs.to(device), got.targets.to(device)
        mask = targets != IGNORE
        was = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                logits, values, _ = self.model(inputs)
                old = completion_logps(None, inputs, targets, logits)
                ref = completion_logps(None, inputs, targets, reference_logits(self.reference(), policy, inputs))
        finally:
            self.model.train(was)
        score = self.scores(got, device)
        k1 = (old - ref) * mask
        per_answer = k1.sum(1)
        rewards = -self.beta * k1
        rows = torch.arange(len(inputs), device=device)
        rewards[rows, last_positions(mask)] += score.to(device)
        values = values.float() * mask
        adv, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten:
            adv = whiten(adv, mask)
        out = {"inputs": got.inputs, "targets": got.targets, "old_logps": old.cpu(), "old_values": values.cpu(), "advantages": adv.cpu(),
               "returns": returns.cpu(),
               "stats": {"reward": score.mean(), "accuracy": got.correct.mean(), "format": got.formatted.mean(), "length": got.lengths.mean(),
                         "kl": per_answer.mean().cpu(), "kl_coef": torch.tensor(self.beta)}}
        if self.ptx is not None:
            out.update(self.ptx_rows(batch, micro, rank))
        if self.kl is not None:
            self.beta = self.kl.update(mean_over_ranks(float(per_answer.mean()), device), len(inputs))
        out["stats"]["rollout_s"] = torch.tensor(time.perf_counter() - t0)
        return out

    def ptx_rows(self, batch: int, micro: int, rank: int) -> dict:
        block = self.model.policy.config.block_size
        rng = random.Random(f"{self.seed}:ptx:{batch}:{micro}:{rank}")
        starts = [rng.randrange(0, len(self.ptx) - block - 1) for _ in range(self.cfg.ptx_rows)]
        rows = torch.from_numpy(np.stack([self.ptx[s:s + block + 1] for s in starts]))
        return {"ptx_inputs": rows[:, :-1].contiguous(), "ptx_targets": rows[:, 1:].contiguous()}


def mean_over_ranks(x: float, device) -> float:
    """``x`` averaged over the processes of a distributed run (itself on one); ``device``: where
    the process group's collectives run (the model's device: NCCL needs a GPU tensor)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def ppo_loss(cfg: PPOSection):
    """The trainer's loss on one batch of rollouts (and its per-step metrics)."""

    def loss_fn(m, batch):
        targets = batch["targets"]
        mask = targets != IGNORE
        ptx = (batch["ptx_inputs"], batch["ptx_targets"]) if "ptx_inputs" in batch else None
        logits, values, lm = m(batch["inputs"], ptx)
        logps = completion_logps(None, batch["inputs"], targets, logits)
        pl, metrics = policy_loss(logps, batch["old_logps"], batch["advantages"], mask, loss_type="dapo", eps_low=cfg.clip, eps_high=cfg.clip)
        vl = value_loss(values, batch["old_values"], batch["returns"], mask, clip=cfg.value_clip)
        loss = pl + cfg.vf_coef * vl
        ret = batch["returns"]
        explained = 1.0 - masked_var(ret - values.detach(), mask) / masked_var(ret, mask).clamp_min(1e-8)
        metrics.update({"policy_loss": pl.detach(), "value_loss": vl.detach(), "explained_var": explained})
        if lm is not None:
            loss = loss + cfg.ptx_coef * lm
            metrics["ptx_loss"] = lm.detach()
        metrics.update({k: v.to(loss.device) for k, v in batch["stats"].items()})
        return loss, metrics

    return loss_fn


@torch.no_grad()
def sampled_reward(model, template, tasks: dict, held: dict, cfg: PPOSection, seed: int, autocast, limit: int) -> dict[str, float]:
    """The mean verifier reward (and accuracy) of one answer sampled per held-out problem at the
    rollouts' temperature, with a fixed seed (the same draws before and after)."""
    out = {}
    for name, problems in held.items():
        ps = problems[:limit]
        if not ps:
            continue
        got = sample_answers(model, template, {name: tasks[name]}, ps, [name] * len(ps), n=1, temperature=cfg.temperature,
                             max_new_tokens=cfg.max_new_tokens, seed=seed, autocast=autocast)
        out[name] = {"reward": float((got.correct + cfg.format_weight * got.formatted).mean()), "accuracy": float(got.correct.mean()),
                     "format": float(got.formatted.mean()), "n": len(ps)}
    return out


def run_ppo(recipe: PPORecipe, out: Path, *, resume: bool = False, force: bool = False, progress: bool | None = True,
            accelerator=None, log=print, evaluate_base: bool = True) -> Outcome:
    out = Path(out)
    t0 = time.perf_counter()
    start = start_run(recipe, out, resume=resume, force=force, accelerator=accelerator, log=log, load=load_ppo_recipe)
    acc, main, log, checkpoint = start.acc, start.main, start.log, start.checkpoint
    tc, p, d = recipe.train, recipe.ppo, recipe.data
    ps = start_policy(recipe, out, main, "adl rlhf ppo",
                      f"resolved recipe of the PPO run in {out.name}; `adl rlhf ppo {out / 'recipe.toml'} --out NEW_DIR` reproduces it")
    tok, template, tasks, held = ps.tokenizer, ps.template, ps.tasks, ps.held
    scorer = None
    if p.reward != "verifier":
        from adl_cli.methods.rlhf.reward import load_reward

        scorer = disable_dropout(load_reward(p.reward, tok).model).eval().requires_grad_(False)
    ptx = None
    if p.ptx_coef > 0:
        ptx = ptx_tokens(p.ptx_data, tok)
        if len(ptx) < ps.base.config.block_size + 2:
            raise AdlError(f"ppo.ptx_data {p.ptx_data}: {len(ptx)} tokens, fewer than one context window of {ps.base.config.block_size}")
    model = ActorCritic(ps.policy)
    ps.counts = trainable_counts(model)
    kl_rule = f"adaptive toward {p.kl_target:g} nats per answer from beta {p.kl_coef:g}" if p.kl_target else f"fixed beta {p.kl_coef:g}"
    log(f"policy: {recipe.method} on {recipe.init.from_} with a value head, {ps.counts['trainable']:,} of {ps.counts['total']:,} parameters train; "
        f"{tc.batch_size} problems x {p.samples} answers a step ({', '.join(d.tasks)}), reward: {p.reward}; KL penalty {kl_rule}"
        f"{f'; PPO-ptx {p.ptx_coef:g} x LM loss on {p.ptx_data}' if ptx is not None else ''}")
    before, before_sampled = {}, {}
    if main and evaluate_base and d.eval_examples:
        log(f"evaluating the starting run: greedy exact match and sampled reward on {d.eval_examples} held-out problems per task")
        before = evaluate_start(ps)
        before_sampled = sampled_reward(ps.base.model.eval(), template, tasks, held, p, d.seed + 1, contextlib.nullcontext, d.eval_examples)
    reference, ref_model = make_reference(ps)
    holder: dict[str, Any] = {}
    autocast = lambda: holder["trainer"].autocast()  # noqa: E731
    rollouts = PPORollouts(model, reference, template, tasks, p, tc.batch_size, tc.seed, autocast, scorer=scorer, ptx=ptx)
    trainer = Trainer(model, tc, run_dir=out, batch_fn=rollouts, loss_fn=ppo_loss(p), eval_fn=eval_exact(ps, p.eval_prompts, lambda m: m.policy),
                      units_per_batch=tc.batch_size * p.samples, units_fn=lambda b: b["inputs"].shape[0], unit="completions",
                      param_groups=param_groups(recipe), accelerator=acc, progress=None if progress is None else progress and main,
                      grad_accum=tc.grad_accum, run_name=recipe.name, frozen_base=ps.adapters)
    holder["trainer"] = trainer
    if ref_model is not None:
        ref_model.to(trainer.device)
    norm = None
    if scorer is not None:
        scorer.to(trainer.device)
        if p.normalize_reward:
            norm = rollouts.normalize_scores()
            log(f"reward model {p.reward}: the starting policy's {norm['answers']} answers score {norm['reward_shift']:.3f} "
                f"+- {norm['reward_scale']:.3f}; rewards are (score {'+' if norm['reward_shift'] < 0 else '-'} {abs(norm['reward_shift']):.3f}) "
                f"/ {norm['reward_scale']:.3f}")
    result = trainer.fit(resume=resume, checkpoint=checkpoint)
    if not main:
        return Outcome(out, result, {}, main=False)
    final = trainer.raw_model.policy
    save_result(out, recipe, ps.prep, final, tok, ps.base)
    final.eval()
    after_sampled = sampled_reward(final, template, tasks, held, p, d.seed + 1, contextlib.nullcontext, d.eval_examples) if d.eval_examples else {}
    prompts = [template.question(q.question) for n in tasks for q in held[n][: p.eval_prompts]]
    budget = p.max_new_tokens or max(t.max_answer_tokens for t in tasks.values())
    kl = sampled_kl(final, reference(), prompts, max_new_tokens=budget, eos=sorted(template.stop_ids), seed=d.seed + 2) if prompts else {}
    summary = {
        "kind": "ppo", **summary_common(recipe, ps, result, final, before, p.eval_prompts, t0),
        "ppo": {k: getattr(p, k) for k in p.__dataclass_fields__}, "final_kl_coef": rollouts.beta,
        "sampled_kl": kl.get("sampled_kl"), "kl_target": p.kl_target or None, "reward_normalization": norm,
        "sampled_reward": {n: {"before": before_sampled.get(n), "after": a} for n, a in after_sampled.items()},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "report.md", report_markdown(summary))
    return Outcome(out, result, summary)


def report_markdown(s: dict[str, Any]) -> str:
    p = s["ppo"]
    kl = "-" if s["sampled_kl"] is None else f"{s['sampled_kl']:.3f}"
    target = f" (the recipe's target: {s['kl_target']:g})" if s["kl_target"] else ""
    lines = [f"# PPO run {s['name']} (reward: {p['reward']}, {s['method']})", "",
             f"From `{s['init']}`: {s['steps']} steps, {s['completions']:,} sampled answers in {s['train_wall_s']:.0f} s on {s['device']} "
             f"({s['precision']}); {s['problems']} problems x {p['samples']} answers a step; final beta {s['final_kl_coef']:.4g}.", "",
             f"KL(policy || reference) per sampled held-out answer: {kl} nats{target}.", ""]
    last = s.get("last_step") or {}
    if last:
        lines += ["Last logging step: " + ", ".join(f"{k} {v:.3g}" for k, v in last.items()) + ".", ""]
    lines += exact_match_lines(s["exact_match"])
    if s["sampled_reward"]:
        lines += ["", "| task | n | sampled reward before | after | sampled accuracy before | after |", "|---|---|---|---|---|---|"]
        for n, e in s["sampled_reward"].items():
            b, a = e["before"], e["after"]
            lines.append(f"| {n} | {a['n']} | {'-' if not b else format(b['reward'], '.3f')} | {a['reward']:.3f} | "
                         f"{'-' if not b else format(b['accuracy'], '.1%')} | {a['accuracy']:.1%} |")
    return "\n".join(lines) + "\n"
