"""What the preference methods share: the ``[data]`` section, pair data sets, answer log-probs,
sampled KL to a reference, and the chat run they start from."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from adl_cli.data.batches import EpochBatches
from adl_cli.data.chat import ChatTemplate
from adl_cli.data.preferences import PAIR_SETS, Pair, PairRows, encode_pairs, length_baselines, make_pairs, read_pairs
from adl_cli.errors import AdlError


@dataclass
class PairData:
    """The recipe's ``[data]``: built-in preference sets and/or JSONL files of pairs."""

    sets: list[str] = field(default_factory=lambda: ["arithmetic"])  # built-in sets (`adl rlhf pairs`)
    files: list[str] = field(default_factory=list)  # JSONL files of {prompt, chosen, rejected}
    train_pairs: int = 4000  # training pairs per built-in set
    val_pairs: int = 500  # held-out pairs per built-in set
    val_fraction: float = 0.1  # of each file's pairs held out (after a seeded shuffle)
    operand_digits: int = 3  # the built-in sets' addition problems: operands below 10^k
    seed: int = 0  # problems, wrong answers, the held-out split and the batch order

    def validate(self) -> None:
        if not self.sets and not self.files:
            raise ValueError("data.sets or data.files must name some preference pairs")
        for name in self.sets:
            PAIR_SETS.get(name)
        for key in ("train_pairs", "val_pairs"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if not 1 <= self.operand_digits <= 9:
            raise ValueError(f"data.operand_digits must be 1 to 9, got {self.operand_digits}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class PairDataset:
    train: PairRows
    val: PairRows | None
    val_pairs: list[Pair]  # the held-out pairs that fit (prompts for sampling, chosen answers to match)
    counts: dict[str, Any]


def build_pairs(data: PairData, template: ChatTemplate, block: int) -> PairDataset:
    train: list[Pair] = []
    val: list[Pair] = []
    for name in data.sets:
        train += make_pairs(name, data.train_pairs, held_out=False, seed=data.seed, operand_digits=data.operand_digits)
        val += make_pairs(name, data.val_pairs, held_out=True, seed=data.seed, operand_digits=data.operand_digits)
    for path in data.files:
        pairs = read_pairs(path)
        random.Random(f"{data.seed}:{path}").shuffle(pairs)
        n_val = int(round(len(pairs) * data.val_fraction))
        val += pairs[:n_val]
        train += pairs[n_val:]
    train_rows = encode_pairs(template, train, block)
    if not len(train_rows):
        raise AdlError(f"data: no training pair fits the context of {block} tokens")
    val_rows = encode_pairs(template, val, block) if val else None
    kept_val = [val[i] for i in val_rows.kept] if val_rows is not None else []
    counts = {"train_pairs": len(train_rows), "val_pairs": len(val_rows) if val_rows is not None else 0,
              "dropped": train_rows.dropped + (val_rows.dropped if val_rows is not None else 0),
              "sources": sorted(set(train_rows.sources))}
    return PairDataset(train_rows, val_rows if val_rows is not None and len(val_rows) else None, kept_val, counts)


POLICY_METHODS = ("full", "lora", "dora", "qlora")  # how a policy trains (the adapters of `adl lora` that peft disables)


def check_policy(recipe) -> None:
    """A policy recipe's ``method``, ``adapter_lr`` and ``[lora]`` (DPO, GRPO)."""
    if recipe.method not in POLICY_METHODS:
        raise ValueError(f"method must be one of {', '.join(POLICY_METHODS)}, got {recipe.method!r}")
    if recipe.adapter_lr < 0:
        raise ValueError(f"adapter_lr must be >= 0 (0: train.lr), got {recipe.adapter_lr}")
    if recipe.method != "full":
        recipe.lora.validate()


def load_policy_recipe(path, cls, overrides, example: str):
    """A recipe of ``cls`` whose ``init.from`` names the chat run to start from."""
    from adl_cli.recipe import load_recipe

    recipe = load_recipe(path, cls, overrides)
    if not recipe.init.from_:
        raise AdlError(f"{path}: init.from must name the chat run to start from (e.g. --set init.from={example})")
    return recipe


def spread(pairs: list[Pair], n: int) -> list[Pair]:
    """Up to ``n`` of ``pairs`` taken in turn from each source (set or file), so a sample of prompts
    covers every set rather than the first."""
    by: dict[str, list[Pair]] = {}
    for p in pairs:
        by.setdefault(p.source, []).append(p)
    out: list[Pair] = []
    queues = list(by.values())
    i = 0
    while len(out) < n and any(i < len(q) for q in queues):
        out += [q[i] for q in queues if i < len(q)][: n - len(out)]
        i += 1
    return out


def pair_batches(rows: PairRows, batch_size: int, grad_accum: int, seed: int, world: int) -> EpochBatches:
    """Epochs over pairs in a seeded order (EpochBatches' state, so a resumed run sees the same order)."""
    try:
        return EpochBatches(len(rows), batch_size, grad_accum, seed, rows.collate, world)
    except ValueError as e:
        raise AdlError(f"data: {e} pairs; lower train.batch_size or add pairs") from None


def chat_base(path: str, what: str):
    """The run a preference method starts from: a GPT with a chat template (an SFT run)."""
    from adl_cli.methods.sft import load_base

    base = load_base(path, what)
    if ChatTemplate.of(base.tokenizer) is None:
        raise AdlError(f"init.from {path}: the run has no chat template; {what} starts from a chat model "
                       "(an SFT run: `adl sft addition` writes runs/addition, `adl sft tiny` runs/sft-tiny)")
    return base


PROBE = "What is 12 + 34? The answer is 46. def f(x): return x"  # text two tokenizers must split alike


def check_same_tokenizer(mine, theirs, what: str) -> None:
    """``theirs`` reads text as ``mine`` does (same ids, special tokens and chat template), else
    an AdlError: '<what> was trained with another tokenizer ...'."""
    same = theirs is not None and mine.vocab_size == theirs.vocab_size and mine.specials == theirs.specials and mine.chat == theirs.chat \
        and mine.single_digits == theirs.single_digits and mine.encode(PROBE).tolist() == theirs.encode(PROBE).tolist()
    if not same:
        raise AdlError(f"{what} was trained with another tokenizer (or chat template) than the policy; it cannot score the policy's tokens")


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout of ``model`` at p = 0: log-probabilities (and rewards) are deterministic, the
    policy's at step 0 equal the reference's."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def answer_logps(model, inputs: torch.Tensor, targets: torch.Tensor, *, with_logits: bool = False):
    """Summed log-probabilities (R,) of each row's target tokens (-100: not part of the answer),
    under ``model``'s softmax (float32); with ``with_logits``, (those, the logits)."""
    logits = model(inputs)[0]
    token = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none")
    sums = token.view(targets.shape).sum(1)
    return (sums, logits) if with_logits else sums


def token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row (R,): the sum over positions where ``mask`` holds of the exact divergence
    KL(p || q) = sum_v p(v) (log p(v) - log q(v)) of the two models' next-token distributions."""
    logp, logq = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    return ((logp.exp() * (logp - logq)).sum(-1) * mask).sum(1)


def reference_logits(reference, policy, inputs: torch.Tensor) -> torch.Tensor:
    """The reference's logits for ``inputs``: ``reference`` is a model, or a factory of a context
    in which the policy computes as its reference (its adapters off)."""
    if callable(reference) and not isinstance(reference, torch.nn.Module):
        with reference():
            return policy(inputs)[0]
    return reference(inputs)[0]


@torch.no_grad()
def rows_logps(model, rows: PairRows, batch_size: int) -> torch.Tensor:
    """(N, 2): the summed answer log-probs of every pair's chosen and rejected answer."""
    device = next(model.parameters()).device
    out = torch.zeros(len(rows), 2)
    was = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(rows)))
            b = rows.collate(idx)
            lp = answer_logps(model, b["inputs"].to(device), b["targets"].to(device)).float().cpu()
            out[idx, 0], out[idx, 1] = lp[: len(idx)], lp[len(idx):]
    finally:
        model.train(was)
    return out


def split_pair(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's 2B values as (chosen B, rejected B)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def per_source(correct: torch.Tensor, sources: list[str]) -> dict[str, float]:
    """Mean of ``correct`` (N,) within each source (built-in set or file)."""
    out: dict[str, list[float]] = {}
    for c, s in zip(correct.tolist(), sources):
        out.setdefault(s, []).append(float(c))
    return {s: sum(v) / len(v) for s, v in out.items()}


def source_counts(sources: list[str]) -> dict[str, int]:
    """How many rows each source (built-in set or file) holds."""
    return {s: sources.count(s) for s in sorted(set(sources))}


def baselines_by_source(rows: PairRows) -> dict[str, dict[str, float]]:
    """Length-only baselines (prefer the shorter / the longer answer) within each source."""
    out = {}
    for s in sorted(set(rows.sources)):
        idx = torch.tensor([i for i, x in enumerate(rows.sources) if x == s])
        out[s] = length_baselines(rows.answer_tokens[idx])
    return out


@torch.no_grad()
def sampled_kl(policy, reference, prompts: list[list[int]], *, max_new_tokens: int, eos: list[int], seed: int,
               batch_size: int = 32) -> dict[str, float]:
    """KL(pi || pi_ref) per answer, estimated on answers sampled from the policy (temperature 1):
    for each sampled answer y, the sum over its positions of the exact per-token divergence
    sum_v pi(v | x, y<t) (log pi(v | ...) - log pi_ref(v | ...)) (a lower-variance estimator than
    log pi(y) - log pi_ref(y), with the same mean); averaged over prompts. ``reference`` is a model
    or a context-manager factory that turns the policy into its reference (adapters off)."""
    from adl_cli.inference.engine import generate_batch, row_generators
    from adl_cli.inference.sampling import SamplingParams

    if not prompts:
        return {}
    device = next(policy.parameters()).device
    was = policy.training
    policy.eval()
    totals, lengths = [], []
    try:
        for start in range(0, len(prompts), batch_size):
            group = prompts[start:start + batch_size]
            done = generate_batch(policy, group, max_new_tokens, SamplingParams(temperature=1.0), eos_id=eos,
                                  generator=row_generators(seed + start, len(group), device))
            rows = [list(p) + list(c.tokens) for p, c in zip(group, done)]
            width = max(len(r) for r in rows) - 1
            x = torch.tensor([r[:-1] + [0] * (width - len(r) + 1) for r in rows], device=device)
            mask = torch.zeros(x.shape, dtype=torch.bool, device=device)
            for i, (p, c) in enumerate(zip(group, done)):
                mask[i, len(p) - 1: len(p) - 1 + len(c.tokens)] = True
            totals += token_kl(policy(x)[0], reference_logits(reference, policy, x), mask).tolist()
            lengths += [len(c.tokens) for c in done]
    finally:
        policy.train(was)
    return {"sampled_kl": sum(totals) / len(totals), "sample_tokens": sum(lengths) / len(lengths)}


@torch.no_grad()
def chosen_match(model, template: ChatTemplate, pairs: list[Pair], *, max_new_tokens: int = 16, batch_size: int = 64,
                 keep: int = 3) -> dict[str, Any]:
    """Share of held-out prompts whose greedy reply is exactly the chosen answer (the built-in
    sets' chosen answer is the one right reply), per source, with a few samples."""
    from adl_cli.inference.engine import generate_batch
    from adl_cli.inference.sampling import SamplingParams

    tok = template.tokenizer
    hits: dict[str, list[int]] = {}
    samples = []
    was = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            group = pairs[start:start + batch_size]
            ids = [template.prompt(p.prompt) for p in group]
            budget = min(max_new_tokens, model.config.block_size - max(len(i) for i in ids))
            done = generate_batch(model, ids, budget, SamplingParams(temperature=0.0), eos_id=sorted(template.stop_ids), decode=tok.decode)
            for p, c in zip(group, done):
                text = c.text if c.text is not None else tok.decode(c.tokens)
                ok = text.strip() == p.chosen.strip()
                hits.setdefault(p.source, []).append(int(ok))
                if len(samples) < keep:
                    samples.append({"prompt": p.prompt[-1]["content"], "reply": text, "chosen": p.chosen, "match": ok})
    finally:
        model.train(was)
    return {"by_source": {s: sum(v) / len(v) for s, v in hits.items()}, "n": {s: len(v) for s, v in hits.items()}, "samples": samples}
