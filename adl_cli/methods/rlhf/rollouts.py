"""What the RL methods (`adl rlhf grpo`, `adl rlhf ppo`) share while training: the verifiable tasks
that ask the questions, sampled answers scored by the tasks' verifiers, per-token log-probabilities
and the batch source that serves a batch of rollouts for ``iterations`` steps.

A batch of rollouts is a pure function of (seed, rollout index, micro-batch, rank) and the policy:
the problems come from a named stream of the training side of the split, the samples from one
generator per row, so a resumed run asks the same questions and draws the same samples.
Rollouts decode with the inference engine (KV cache, batched, dropout off: ``model.eval()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adl_cli.data.chat import ChatTemplate
from adl_cli.data.packing import IGNORE
from adl_cli.data.tasks import TASKS, split_problems


@dataclass
class TaskData:
    """The recipe's ``[data]``: which verifiable tasks ask the questions."""

    tasks: list[str] = field(default_factory=lambda: ["addition"])
    operand_digits: int = 3  # arithmetic operands below 10^k (as the SFT run was taught)
    scratchpad: bool = False  # answers show their steps first (as the SFT run was taught)
    eval_examples: int = 500  # held-out problems per task for the final exact match, before and after
    seed: int = 0

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("data.tasks must name at least one task (`adl sft tasks` lists them)")
        for name in self.tasks:
            TASKS.get(name)
        if not 1 <= self.operand_digits <= 9:
            raise ValueError(f"data.operand_digits must be 1 to 9, got {self.operand_digits}")
        if self.eval_examples < 0:
            raise ValueError(f"data.eval_examples must be >= 0, got {self.eval_examples}")


def completion_logps(model, inputs: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token log-probabilities (B, T) of ``targets`` (0 where IGNORE), from ``logits`` when given."""
    if logits is None:
        logits = model(inputs)[0]
    lp = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return lp.view(targets.shape)


@dataclass
class Sampled:
    """A batch of sampled answers: ``inputs``/``targets`` (N, T) right-padded (targets IGNORE off
    the answers), and per answer whether it is correct and well-formed, its length and text."""

    inputs: torch.Tensor
    targets: torch.Tensor
    correct: torch.Tensor
    formatted: torch.Tensor
    lengths: torch.Tensor
    texts: list[str]
    prompts: list[list[int]]
    problems: list


def draw_problems(tasks: dict, count: int, seed: int, stream: str) -> tuple[list, list[str]]:
    """``count`` training problems, the recipe's tasks in turn, from a named stream of the split."""
    names = list(tasks)
    problems, owners = [], []
    for k in range(count):
        name = names[k % len(names)]
        problems += split_problems(tasks[name], 1, held_out=False, seed=seed, stream=f"{stream}:{k}")
        owners.append(name)
    return problems, owners


@torch.no_grad()
def sample_answers(model, template: ChatTemplate, tasks: dict, problems: list, owners: list[str], *, n: int, temperature: float,
                   max_new_tokens: int, seed: int, autocast) -> Sampled:
    """``n`` answers to each problem (prompt-major), sampled by the inference engine with dropout
    off, each scored by its task's verifier: correct, and (apart) whether it has the answer's
    format and ended by itself."""
    from adl_cli.inference.engine import generate_batch, row_generators
    from adl_cli.inference.sampling import SamplingParams

    tok = template.tokenizer
    prompts = [template.question(p.question) for p in problems]
    block = model.config.block_size
    budget = max_new_tokens or max(tasks[o].max_answer_tokens for o in owners)
    budget = max(1, min(budget, block - max(len(p) for p in prompts)))
    was = model.training
    model.eval()
    try:
        with autocast():
            done = generate_batch(model, prompts, budget, SamplingParams(temperature=temperature), n=n, eos_id=sorted(template.stop_ids),
                                  decode=tok.decode, generator=row_generators(seed, len(prompts) * n))
    finally:
        model.train(was)
    rows, correct, formatted, lengths, texts = [], [], [], [], []
    for j, c in enumerate(done):
        i = j // n
        task, problem = tasks[owners[i]], problems[i]
        text = c.text if c.text is not None else tok.decode(c.tokens)
        texts.append(text)
        correct.append(float(task.verify(text, problem)))
        formatted.append(float(c.finish == "eos" and task.follows_format(text)))
        rows.append((prompts[i], list(c.tokens)))
        lengths.append(len(c.tokens))
    width = max(len(p) + len(t) for p, t in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (p, t) in enumerate(rows):
        ids = p + t
        inputs[r, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[r, len(p) - 1: len(ids) - 1] = torch.tensor(t)
    return Sampled(inputs, targets, torch.tensor(correct), torch.tensor(formatted), torch.tensor(lengths, dtype=torch.float32), texts,
                   [prompts[j // n] for j in range(len(done))], [problems[j // n] for j in range(len(done))])


class RolloutSource:
    """A trainer batch source of rollouts: ``rollout(index, micro, rank)`` makes one batch; with
    ``cfg.iterations`` > 1 the batch of index step // iterations serves that many steps (kept
    until the next index is asked for)."""

    cfg: object
    cache: dict

    def __call__(self, step: int, micro: int, rank: int, world: int) -> dict:
        key = (step // self.cfg.iterations, micro, rank)
        cache = getattr(self, "cache", None) or {}
        if key not in cache:
            cache = {k: v for k, v in cache.items() if k[0] == key[0]}
            cache[key] = self.rollout(*key)
        self.cache = cache
        return cache[key]

    def rollout(self, batch: int, micro: int, rank: int) -> dict:
        raise NotImplementedError


def rollout_seed(seed: int, batch: int, micro: int, rank: int) -> int:
    """The first row generator's seed of one batch of rollouts."""
    return seed * 1_000_003 + batch * 7919 + micro * 131 + rank
