"""`adl rlhf dpo`: direct preference optimisation of a chat run (DPO, conservative DPO, IPO).

The policy starts from a chat run (``init.from``, an SFT run) and trains in full or through LoRA,
DoRA or QLoRA (``method``, ``[lora]``, ``[qlora]``, as in ``adl lora``). The reference is frozen:
by default the starting run itself, else ``dpo.reference`` (a run of the same shape and tokenizer).
Its summed answer log-probabilities are computed once, before the first step, for every training
and held-out pair (under the training precision), and kept in the run folder
(``reference_logps.safetensors``), so a resumed run reads them back; a LoRA policy computes them
with its adapters turned off (no second copy of the model). Dropout is off in the policy.

Each step logs the loss, the implicit rewards beta log(pi / pi_ref) of chosen and rejected
answers, their margin, the preference accuracy, the mean log-ratio on the batch's answers and
(``dpo.step_kl``) ``ref_kl``, the exact KL(pi || pi_ref) over the chosen answers' positions;
each evaluation adds the same on held-out pairs and KL(pi || pi_ref) on answers the policy samples
for held-out prompts (``common.sampled_kl``). The report sets held-out preference accuracy beside
the length-only baselines, and, for the built-in sets, how often the greedy reply is the chosen
answer before and after.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adl_cli.adapters.lora import LoraSection
from adl_cli.adapters.qlora import QloraSection
from adl_cli.data.chat import ChatTemplate
from adl_cli.data.packing import IGNORE
from adl_cli.engine.checkpoint import atomic_write_text, read_safetensors, save_safetensors
from adl_cli.engine.distributed import resolve_grad_accum
from adl_cli.engine.trainer import TrainConfig, Trainer
from adl_cli.errors import AdlError
from adl_cli.methods.finetune import param_groups, prepare_model, save_result, trainable_counts
from adl_cli.methods.pretrain import InitSection, start_run
from adl_cli.methods.rlhf.common import (PairData, answer_logps, baselines_by_source, build_pairs, chat_base, check_policy, check_same_tokenizer,
                                         chosen_match, disable_dropout, load_policy_recipe, pair_batches, per_source, reference_logits,
                                         rows_logps, sampled_kl, source_counts, split_pair, spread, token_kl)
from adl_cli.methods.sft import Outcome
from adl_cli.nn.preference import PREFERENCE_LOSSES, preference_loss
from adl_cli.recipe import dump_recipe
from adl_cli.runs import load_run, parent_entry, write_lineage

REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class DPOSection:
    loss: str = "dpo"  # dpo | ipo
    beta: float = 0.1  # the strength of the tie to the reference (DPO: inverse temperature; IPO: target gap 1 / (2 beta))
    label_smoothing: float = 0.0  # > 0: conservative DPO (each label taken as flipped with this probability; dpo loss only)
    sft_weight: float = 0.0  # > 0: add this times the chosen answers' mean token NLL (RPO, Pang et al. 2024; trl's rpo_alpha)
    reference: str = ""  # the frozen reference run (default: init.from); same shape and tokenizer as the policy's
    step_kl: bool = True  # log KL(policy || reference) on each step's chosen answers as ref_kl (one more reference forward, no gradient)
    kl_prompts: int = 64  # held-out prompts whose sampled answers measure KL(policy || reference) at each evaluation (0: off)
    kl_tokens: int = 16  # the longest sampled answer, in tokens
    match_prompts: int = 200  # held-out prompts whose greedy reply is compared with the chosen answer, before and after (0: off)

    def validate(self) -> None:
        if self.loss not in PREFERENCE_LOSSES:
            raise ValueError(f"dpo.loss must be one of {', '.join(PREFERENCE_LOSSES)}, got {self.loss!r}")
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            raise ValueError(f"dpo.sft_weight must be >= 0, got {self.sft_weight}")
        if self.label_smoothing and self.loss != "dpo":
            raise ValueError("dpo.label_smoothing (conservative DPO) applies to dpo.loss = 'dpo' only")
        for key in ("kl_prompts", "kl_tokens", "match_prompts"):
            if getattr(self, key) < 0:
                raise ValueError(f"dpo.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class DPORecipe:
    name: str = "dpo"
    description: str = ""
    method: str = "full"  # full | lora | dora | qlora: how the policy trains
    adapter_lr: float = 0.0  # LoRA methods: the adapter tensors' peak lr (0: train.lr)
    init: InitSection = field(default_factory=InitSection)
    data: PairData = field(default_factory=PairData)
    dpo: DPOSection = field(default_factory=DPOSection)
    lora: LoraSection = field(default_factory=LoraSection)
    qlora: QloraSection = field(default_factory=QloraSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, batch_size=16, lr=1e-5, min_lr=1e-6, warmup=10, weight_decay=0.0))

    def validate(self) -> None:
        check_policy(self)


def load_dpo_recipe(path: str | Path, overrides: list[str] | None = None) -> DPORecipe:
    return load_policy_recipe(path, DPORecipe, overrides, "runs/addition")


def check_reference(policy_run, ref_run, where: str) -> None:
    """The reference must read the same tokens the same way: its shape and tokenizer equal the policy's."""
    a, b = policy_run.config.to_dict(), ref_run.config.to_dict()
    diff = [k for k in a if k != "dropout" and a.get(k) != b.get(k)]
    if diff:
        shown = ", ".join(f"{k} {b.get(k)!r} vs {a.get(k)!r}" for k in diff[:3])
        raise AdlError(f"{where}: the reference and the policy differ in shape ({shown}); the reference must be the policy's architecture")
    check_same_tokenizer(policy_run.tokenizer, ref_run.tokenizer, f"{where}: the reference")


def reference_cache(out: Path, n_train: int, n_val: int) -> dict[str, torch.Tensor] | None:
    """The reference log-probs a run already computed (resume), if they fit its pairs."""
    path = out / REFERENCE_FILE
    if not path.exists():
        return None
    t = read_safetensors(path)
    if t.get("train") is None or t["train"].shape != (n_train, 2) or (n_val and t.get("val", torch.zeros(0)).shape != (n_val, 2)):
        return None
    return t


def run_dpo(recipe: DPORecipe, out: Path, *, resume: bool = False, force: bool = False, progress: bool | None = True,
            accelerator=None, log=print, evaluate_base: bool = True) -> Outcome:
    out = Path(out)
    t0 = time.perf_counter()
    start = start_run(recipe, out, resume=resume, force=force, accelerator=accelerator, log=log, load=load_dpo_recipe)
    acc, main, world, log, checkpoint = start.acc, start.main, start.world, start.log, start.checkpoint
    tc, d = recipe.train, recipe.dpo
    base = chat_base(recipe.init.from_, "adl rlhf dpo")
    tok = base.tokenizer
    template = ChatTemplate.of(tok)
    ref_run = base
    if d.reference:
        if not Path(d.reference).is_dir():
            raise AdlError(f"dpo.reference {d.reference}: no run folder there")
        ref_run = load_run(d.reference)
        check_reference(base, ref_run, f"dpo.reference {d.reference}")
    data = build_pairs(recipe.data, template, base.config.block_size)
    c = data.counts
    log(f"data: {c['train_pairs']:,} training pairs, {c['val_pairs']:,} held out ({', '.join(c['sources'])}); {c['dropped']} longer than the context dropped")

    torch.manual_seed(tc.seed)
    prep = prepare_model(recipe, base, tok)
    policy = disable_dropout(prep.model)
    if getattr(policy.config, "mtp_heads", 0):  # DPO reads the next-token head only: multi-token heads stay as they are (and out of DDP)
        policy.mtp.requires_grad_(False)
    counts = trainable_counts(policy)
    adapter_reference = recipe.method != "full" and not d.reference
    log(f"policy: {recipe.method} on {recipe.init.from_}, {counts['trainable']:,} of {counts['total']:,} parameters train; "
        f"reference: {'the same model with its adapters off' if adapter_reference else ref_run.path}; {d.loss} loss, beta {d.beta}"
        + (f", label smoothing {d.label_smoothing}" if d.label_smoothing else ""))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        header = f"resolved recipe of the DPO run in {out.name}; `adl rlhf dpo {out / 'recipe.toml'} --out NEW_DIR` reproduces it"
        atomic_write_text(out / "recipe.toml", dump_recipe(recipe, header=header))
        tok.save(out)
        lineage = [parent_entry("init", base)] + ([parent_entry("reference", ref_run)] if d.reference else [])
        write_lineage(out, lineage)

    accum = resolve_grad_accum(0, tc.grad_accum, world, tc.batch_size, 1)
    batches = pair_batches(data.train, tc.batch_size, accum, tc.seed, world)
    ref: dict[str, torch.Tensor] = {}

    kl_prompts = [template.prompt(p.prompt) for p in spread(data.val_pairs, d.kl_prompts)]

    def reference_view():
        """What KL is measured against: a context that turns the policy's adapters off, or the reference model."""
        if adapter_reference:
            from adl_cli.adapters.lora import adapters_off

            return lambda: adapters_off(policy)
        return ref_run.model

    keep_reference = (d.kl_prompts or d.step_kl) and not adapter_reference  # KL needs the reference's whole distribution
    loss_fn = dpo_loss(ref, d, (reference_view, policy) if d.step_kl else None)

    def eval_fn(m):
        metrics = {}
        if data.val is not None:
            metrics.update(heldout_metrics(m, data.val, ref["val"], d, tc.batch_size))
        if kl_prompts and (adapter_reference or ref_run.model is not None):  # KL on answers the policy samples
            metrics.update({k: v for k, v in sampled_kl(m, reference_view(), kl_prompts, max_new_tokens=d.kl_tokens,
                                                        eos=sorted(template.stop_ids), seed=tc.seed).items()})
        return metrics

    trainer = Trainer(policy, tc, run_dir=out, batch_fn=batches, loss_fn=loss_fn, eval_fn=eval_fn, units_per_batch=tc.batch_size,
                      units_fn=lambda b: len(b["index"]), unit="pairs", param_groups=param_groups(recipe), accelerator=acc,
                      progress=None if progress is None else progress and main, grad_accum=accum, run_name=recipe.name,
                      frozen_base=recipe.method != "full")
    n_val = len(data.val) if data.val is not None else 0
    cached = reference_cache(out, len(data.train), n_val) if resume else None
    if cached is not None:
        ref.update(cached)
        log(f"reference log-probs: read from {out / REFERENCE_FILE}")
    else:
        t_ref = time.perf_counter()
        ref.update(compute_reference(trainer, policy if adapter_reference else ref_run.model, data, tc.batch_size, adapter_reference))
        if main:
            save_safetensors(ref, out / REFERENCE_FILE, metadata={"reference": str(ref_run.path), "adl": "reference-logps"})
        log(f"reference log-probs of {len(data.train) + n_val:,} pairs computed once in {time.perf_counter() - t_ref:.1f} s")
    base_match = None
    if main and evaluate_base and d.match_prompts and data.val_pairs:
        start_model = policy if adapter_reference else base.model
        with _adapters_off_if(adapter_reference, policy), trainer.autocast():
            base_match = chosen_match(start_model.to(trainer.device), template, spread(data.val_pairs, d.match_prompts))
    if ref_run is not base:
        base.model = None
    if keep_reference:  # it stays, frozen, for the KL
        ref_run.model = disable_dropout(ref_run.model).to(trainer.device)
    else:
        ref_run.model = None  # the reference lives in the cache (and the adapters-off policy): no second copy

    result = trainer.fit(resume=resume, checkpoint=checkpoint)
    if not main:
        return Outcome(out, result, {}, main=False)
    final = trainer.raw_model
    save_result(out, recipe, prep, final, tok, base)
    final.eval()
    with torch.no_grad(), trainer.autocast():
        held = heldout_metrics(final, data.val, ref["val"], d, tc.batch_size, detail=True) if data.val is not None else None
        match = chosen_match(final, template, spread(data.val_pairs, d.match_prompts)) if d.match_prompts and data.val_pairs else None
    from adl_cli.engine.report import read_metrics

    history = [r for r in read_metrics(out / "metrics.jsonl") if "val_margin" in r]
    summary = {
        "name": recipe.name, "kind": "dpo", "method": recipe.method, "init": recipe.init.from_, "reference": str(ref_run.path),
        "reference_kind": "adapters off" if adapter_reference else "cached", "loss": d.loss, "beta": d.beta, "label_smoothing": d.label_smoothing,
        "trainable_parameters": counts["trainable"], "parameters": counts["total"], "steps": result.steps, "pairs_seen": result.units,
        "train_wall_s": result.wall_s, "wall_s": time.perf_counter() - t0, "step_s": result.wall_s / max(1, result.steps),
        "train_loss": result.train_loss, "precision": result.precision, "device": result.device, "world_size": result.world_size,
        "counts": data.counts, "heldout": held, "sampled_kl": result.metrics.get("sampled_kl"),
        "sample_tokens": result.metrics.get("sample_tokens"), "ref_kl": result.train_metrics.get("ref_kl"),
        "margin_by_eval": [[r["step"], r["val_margin"]] for r in history],
        "length_baselines": baselines_by_source(data.val) if data.val is not None else {},
        "chosen_match": {"before": base_match, "after": match},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "report.md", report_markdown(summary))
    return Outcome(out, result, summary)


def dpo_loss(ref: dict[str, torch.Tensor], d: DPOSection, live=None):
    """The trainer's loss: the policy's summed answer log-probs of a batch of pairs against the
    reference's cached ones (``ref["train"]``, (N, 2), read by the batch's pair indices). With
    ``live = (a function giving the reference, the raw policy)`` it also logs ``ref_kl``: the exact
    KL(policy || reference) of the next-token distributions summed over each chosen answer's
    positions, averaged over the batch's pairs."""

    def loss_fn(m, batch):
        logps, logits = answer_logps(m, batch["inputs"], batch["targets"], with_logits=True)
        pw, pl = split_pair(logps)
        rw = ref["train"][batch["index"]].to(pw.device)
        loss, metrics = preference_loss(pw, pl, rw[:, 0], rw[:, 1], beta=d.beta, kind=d.loss, label_smoothing=d.label_smoothing)
        if d.sft_weight:  # the chosen answers' negative log-likelihood per token, beside the preference loss
            tokens = (batch["targets"][: pw.shape[0]] != IGNORE).sum()
            nll = -pw.sum() / tokens.clamp_min(1)
            loss = loss + d.sft_weight * nll
            metrics["chosen_nll"] = nll.detach()
        if live is not None:  # the chosen answers' positions: contexts the data prefers (a rejected answer's are off the policy)
            reference, policy = live
            chosen = slice(0, pw.shape[0])
            with torch.no_grad():
                q = reference_logits(reference(), policy, batch["inputs"][chosen])
                metrics["ref_kl"] = token_kl(logits[chosen].detach(), q, batch["targets"][chosen] != IGNORE).mean()
        return loss, metrics

    return loss_fn


def _adapters_off_if(flag: bool, model):
    import contextlib

    if not flag:
        return contextlib.nullcontext()
    from adl_cli.adapters.lora import adapters_off

    return adapters_off(model)


def compute_reference(trainer: Trainer, model, data, batch_size: int, adapters: bool) -> dict[str, torch.Tensor]:
    """Summed answer log-probs of the reference for every training and held-out pair, once, under
    the precision the policy trains in (so that at step 0 every log-ratio is 0 up to rounding)."""
    model = model.to(trainer.device)
    with _adapters_off_if(adapters, model), trainer.autocast():
        out = {"train": rows_logps(model, data.train, batch_size)}
        if data.val is not None:
            out["val"] = rows_logps(model, data.val, batch_size)
    return out


def heldout_metrics(model, rows, ref: torch.Tensor, d: DPOSection, batch_size: int, detail: bool = False) -> dict[str, Any]:
    lp = rows_logps(model, rows, batch_size)
    loss, m = preference_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], beta=d.beta, kind=d.loss, label_smoothing=d.label_smoothing)
    out = {"val_loss": float(loss), "val_accuracy": float(m["accuracy"]), "val_margin": float(m["margin"]),
           "val_reward_chosen": float(m["reward_chosen"]), "val_reward_rejected": float(m["reward_rejected"]), "val_mean_logratio": float(m["mean_logratio"])}
    if detail:
        correct = ((lp[:, 0] - ref[:, 0]) > (lp[:, 1] - ref[:, 1])).float()
        out["by_source"] = per_source(correct, rows.sources)
        out["n_by_source"] = source_counts(rows.sources)
    return out


def report_markdown(s: dict[str, Any]) -> str:
    lines = [f"# DPO run {s['name']} ({s['loss']}, beta {s['beta']}, {s['method']})", "",
             f"From `{s['init']}` against `{s['reference']}` ({s['reference_kind']}): {s['steps']} steps, {s['pairs_seen']:,} pairs in "
             f"{s['train_wall_s']:.0f} s on {s['device']} ({s['precision']}).", ""]
    h = s["heldout"]
    if h:
        kl = "-" if s.get("sampled_kl") is None else f"{s['sampled_kl']:.3f} nats per sampled answer"
        lines += [f"Held-out: loss {h['val_loss']:.3f}, preference accuracy {h['val_accuracy']:.1%}, reward margin {h['val_margin']:.3f} "
                  f"(chosen {h['val_reward_chosen']:+.3f}, rejected {h['val_reward_rejected']:+.3f}); KL(policy || reference) {kl}.", "",
                  "| set | held-out pairs | DPO preference accuracy | prefer shorter | prefer longer | greedy reply = chosen, before | after |",
                  "|---|---|---|---|---|---|---|"]
        before = (s["chosen_match"].get("before") or {}).get("by_source", {})
        after = (s["chosen_match"].get("after") or {}).get("by_source", {})
        for src, acc in h["by_source"].items():
            b = s["length_baselines"].get(src, {})
            f = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
            lines.append(f"| {src} | {h['n_by_source'][src]} | {acc:.1%} | {f(b.get('shorter'))} | {f(b.get('longer'))} | {f(before.get(src))} | {f(after.get(src))} |")
        if s["margin_by_eval"]:
            lines += ["", "Held-out reward margin by evaluation: " + ", ".join(f"step {st}: {m:.3f}" for st, m in s["margin_by_eval"]) + "."]
    return "\n".join(lines) + "\n"
