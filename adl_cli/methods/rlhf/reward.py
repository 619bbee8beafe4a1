"""`adl rlhf reward`: a reward model trained on preference pairs (Bradley-Terry).

The recipe starts from a chat run (``init.from``, an SFT run): its GPT becomes the trunk of a
reward model (``models/reward.py``: a scalar head on the last token, the answer's end marker),
trained on ``[data]``'s pairs with -log sigma(r_w - r_l - margin) (``nn/preference.py``). Every
trunk weight trains (``train.lr``); the head takes ``head_lr`` when set. Evaluation: held-out pair
accuracy (r_w > r_l) per set beside the length-only baselines, the held-out loss, the reward
margin. The run folder is a run of family "reward" (``load_run`` gives it back; the RL issue
scores rollouts with it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adl_cli.data.chat import ChatTemplate
from adl_cli.engine.checkpoint import atomic_write_text
from adl_cli.engine.distributed import resolve_grad_accum
from adl_cli.engine.trainer import TrainConfig, Trainer
from adl_cli.errors import AdlError
from adl_cli.methods.pretrain import InitSection, start_run
from adl_cli.methods.rlhf.common import (PairData, baselines_by_source, build_pairs, chat_base, check_same_tokenizer, disable_dropout, pair_batches,
                                         per_source, source_counts, split_pair)
from adl_cli.methods.sft import Outcome
from adl_cli.models.reward import RewardModel, from_language_model
from adl_cli.nn.preference import bradley_terry_loss
from adl_cli.recipe import dump_recipe, load_recipe
from adl_cli.runs import parent_entry, read_config, save_run, transfer, write_config, write_lineage


@dataclass
class RewardRecipe:
    name: str = "reward"
    description: str = ""
    margin: float = 0.0  # the Bradley-Terry margin m: -log sigma(r_w - r_l - m)
    head_lr: float = 0.0  # the score head's peak lr (0: train.lr)
    init: InitSection = field(default_factory=InitSection)
    data: PairData = field(default_factory=PairData)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=16, lr=1e-4, min_lr=1e-5, warmup=20, weight_decay=0.0))

    def validate(self) -> None:
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.head_lr < 0:
            raise ValueError(f"head_lr must be >= 0 (0: train.lr), got {self.head_lr}")


def load_reward_recipe(path: str | Path, overrides: list[str] | None = None) -> RewardRecipe:
    recipe = load_recipe(path, RewardRecipe, overrides)
    if not recipe.init.from_:
        raise AdlError(f"{path}: init.from must name the chat run to start from (e.g. --set init.from=runs/addition)")
    return recipe


def load_reward(path: str | Path, tokenizer, device: str | torch.device = "cpu"):
    """A reward run (family "reward") to score answers written with ``tokenizer``: its model in
    eval mode, checked to read the same tokens (the RL methods score rollouts with it)."""
    from adl_cli.runs import load_run

    run = load_run(Path(path), device)
    if run.config.family != "reward":
        raise AdlError(f"{path} is not a reward run (its family is '{run.config.family}'); `adl rlhf reward` trains one")
    check_same_tokenizer(tokenizer, run.tokenizer, f"the reward run {path}")
    return run


def reward_loss(margin: float):
    def loss_fn(model, batch):
        r_w, r_l = split_pair(model(batch["full"], last=batch["last"]))
        return bradley_terry_loss(r_w, r_l, margin)

    return loss_fn


@torch.no_grad()
def pair_rewards(model, rows, batch_size: int) -> torch.Tensor:
    """(N, 2): the reward of every pair's chosen and rejected answer."""
    device = next(model.parameters()).device
    out = torch.zeros(len(rows), 2)
    for start in range(0, len(rows), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(rows)))
        b = rows.collate(idx)
        r = model(b["full"].to(device), last=b["last"].to(device)).float().cpu()
        out[idx, 0], out[idx, 1] = split_pair(r)
    return out


def evaluate_rewards(model, rows, batch_size: int, margin: float) -> dict[str, Any]:
    r = pair_rewards(model, rows, batch_size)
    loss, _ = bradley_terry_loss(r[:, 0], r[:, 1], margin)
    correct = (r[:, 0] > r[:, 1]).float()
    return {"val_loss": float(loss), "val_accuracy": float(correct.mean()), "val_margin": float((r[:, 0] - r[:, 1]).mean()),
            "by_source": per_source(correct, rows.sources), "n_by_source": source_counts(rows.sources), "reward_chosen": float(r[:, 0].mean()), "reward_rejected": float(r[:, 1].mean()),
            "reward_std": float(r.std())}


def run_reward(recipe: RewardRecipe, out: Path, *, resume: bool = False, force: bool = False, progress: bool | None = True,
               accelerator=None, log=print) -> Outcome:
    out = Path(out)
    t0 = time.perf_counter()
    start = start_run(recipe, out, resume=resume, force=force, accelerator=accelerator, log=log, load=load_reward_recipe)
    acc, main, world, log, checkpoint = start.acc, start.main, start.world, start.log, start.checkpoint
    tc = recipe.train
    base = chat_base(recipe.init.from_, "adl rlhf reward")
    tok = base.tokenizer
    template = ChatTemplate.of(tok)
    block = base.config.block_size
    data = build_pairs(recipe.data, template, block)
    c = data.counts
    log(f"data: {c['train_pairs']:,} training pairs, {c['val_pairs']:,} held out ({', '.join(c['sources'])}); {c['dropped']} longer than the context dropped")

    torch.manual_seed(tc.seed)
    if resume:
        model = RewardModel(read_config(out))
    else:
        model = from_language_model(transfer(base, base.config))
    disable_dropout(model)
    base.model = None  # the trunk is a copy; the SFT model is not needed any more
    if main:
        out.mkdir(parents=True, exist_ok=True)
        header = f"resolved recipe of the reward run in {out.name}; `adl rlhf reward {out / 'recipe.toml'} --out NEW_DIR` reproduces it"
        atomic_write_text(out / "recipe.toml", dump_recipe(recipe, header=header))
        tok.save(out)
        write_config(out, model.config)
        if not resume:
            write_lineage(out, [parent_entry("init", base)])
    accum = resolve_grad_accum(0, tc.grad_accum, world, tc.batch_size, 1)
    batches = pair_batches(data.train, tc.batch_size, accum, tc.seed, world)

    def groups(m) -> list[dict]:
        from adl_cli.engine.optim import param_groups as default

        out_groups = default(m, tc.weight_decay)
        if recipe.head_lr:
            head = m.score.weight
            for g in out_groups:
                g["params"] = [p for p in g["params"] if p is not head]
            out_groups.append({"params": [head], "weight_decay": 0.0, "lr_scale": recipe.head_lr / tc.lr})
        return [g for g in out_groups if g["params"]]

    def eval_fn(m):
        if data.val is None:
            return {}
        r = evaluate_rewards(m, data.val, tc.batch_size, recipe.margin)
        return {k: v for k, v in r.items() if k.startswith("val_")}

    trainer = Trainer(model, tc, run_dir=out, batch_fn=batches, loss_fn=reward_loss(recipe.margin), eval_fn=eval_fn,
                      units_per_batch=tc.batch_size, units_fn=lambda b: len(b["index"]), unit="pairs", param_groups=groups,
                      accelerator=acc, progress=None if progress is None else progress and main, grad_accum=accum, run_name=recipe.name)
    result = trainer.fit(resume=resume, checkpoint=checkpoint)
    if not main:
        return Outcome(out, result, {}, main=False)
    final = trainer.raw_model
    save_run(out, final, tok)
    final.eval()
    held = evaluate_rewards(final, data.val, tc.batch_size, recipe.margin) if data.val is not None else None
    summary = {
        "name": recipe.name, "kind": "reward", "init": recipe.init.from_, "margin": recipe.margin,
        "parameters": sum(p.numel() for p in final.parameters()), "steps": result.steps, "pairs_seen": result.units,
        "train_wall_s": result.wall_s, "wall_s": time.perf_counter() - t0, "step_s": result.wall_s / max(1, result.steps),
        "train_loss": result.train_loss, "precision": result.precision, "device": result.device, "world_size": result.world_size,
        "counts": data.counts, "heldout": held,
        "length_baselines": baselines_by_source(data.val) if data.val is not None else {},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "report.md", report_markdown(summary))
    return Outcome(out, result, summary)


def report_markdown(s: dict[str, Any]) -> str:
    lines = [f"# Reward model {s['name']}", "",
             f"From `{s['init']}`: {s['steps']} steps, {s['pairs_seen']:,} pairs in {s['train_wall_s']:.0f} s on {s['device']} "
             f"({s['precision']}); Bradley-Terry loss with margin {s['margin']}.", ""]
    h = s["heldout"]
    if h:
        lines += [f"Held-out loss {h['val_loss']:.3f}, pair accuracy {h['val_accuracy']:.1%}, mean margin r_w - r_l {h['val_margin']:.2f} "
                  f"(rewards: chosen {h['reward_chosen']:.2f}, rejected {h['reward_rejected']:.2f}).", "",
                  "| set | held-out pairs | reward model accuracy | prefer shorter | prefer longer |", "|---|---|---|---|---|"]
        for src, acc in h["by_source"].items():
            b = s["length_baselines"].get(src, {})
            lines.append(f"| {src} | {h['n_by_source'][src]} | {acc:.1%} | {b.get('shorter', float('nan')):.1%} | {b.get('longer', float('nan')):.1%} |")
    return "\n".join(lines) + "\n"
