"""Exact match of generated answers on verifiable tasks, with Wilson 95% intervals.

A chat model (a run whose tokenizer carries a chat template) is asked through its template and
answers until the template's end; a base model is asked ``question + "\\n"`` and its answer is
the first line it writes. Decoding is greedy and batched (the inference engine, left-padded
rows). Besides accuracy the result counts the rows that stopped by themselves (an end token,
not the length limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from adl_cli.data.chat import ChatTemplate
from adl_cli.data.tasks import Problem, Task
from adl_cli.inference.engine import generate_batch
from adl_cli.inference.sampling import SamplingParams


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class TaskScore:
    task: str
    n: int = 0
    correct: int = 0
    stopped: int = 0  # rows that ended on their own (end token), not at the length limit
    samples: list[tuple[str, str, bool]] = field(default_factory=list)  # (question, answer, correct)
    outcomes: list[bool] = field(default_factory=list)  # per problem, in order (a question too long counts False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.n)

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {"task": self.task, "n": self.n, "correct": self.correct, "accuracy": self.accuracy, "ci95": [lo, hi],
                "stopped": self.stopped, "samples": [{"question": q, "answer": a, "correct": c} for q, a, c in self.samples]}


def _prompts(tokenizer, template: ChatTemplate | None, problems: list[Problem]) -> list[list[int]]:
    if template is not None:
        return [template.question(p.question) for p in problems]
    return [list(map(int, ids)) for ids in tokenizer.encode_batch([p.question + "\n" for p in problems])]


@torch.no_grad()
def answers(model, tokenizer, task: Task, problems: list[Problem], *, n: int = 1, params: SamplingParams = SamplingParams(temperature=0.0),
            seed: int = 0, batch_size: int = 64) -> list[list | None]:
    """``n`` answers (Completions, ``text`` set) to each problem, or None for a question longer than
    the context (it cannot be asked). Sampled answers draw from one generator per (problem, sample),
    seeded from ``seed`` and the problem's index: the same draws whatever the batch size."""
    from adl_cli.inference.engine import row_generators

    template = ChatTemplate.of(tokenizer)
    block = model.config.block_size
    prompts = _prompts(tokenizer, template, problems)
    if template is not None:
        eos, stop = sorted(template.stop_ids), ()
    else:
        eos, stop = tokenizer.eot_id, ("\n",)
    out: list[list | None] = [None] * len(problems)
    asked = [len(p) for p in prompts if len(p) + 1 <= block]
    budget = min(task.max_answer_tokens, block - max(asked)) if asked else 0  # one budget for all: answers do not depend on the batch
    per = max(1, batch_size // n)
    device = next(model.parameters()).device
    for start in range(0, len(problems), per):
        idx = [i for i in range(start, min(start + per, len(problems))) if len(prompts[i]) + 1 <= block]
        if not idx:
            continue
        ids = [prompts[i] for i in idx]
        gens = None
        if params.temperature > 0:
            gens = [g for i in idx for g in row_generators(seed + 7919 * i, n, device)]
        done = generate_batch(model, ids, budget, params, n=n, eos_id=eos, stop=stop, decode=tokenizer.decode, generator=gens)
        for j, i in enumerate(idx):
            rows = done[j * n:(j + 1) * n]
            for c in rows:
                if c.text is None:
                    c.text = tokenizer.decode(c.tokens)
            out[i] = rows
    return out


@torch.no_grad()
def exact_match(model, tokenizer, task: Task, problems: list[Problem], *, batch_size: int = 64, keep_samples: int = 3) -> TaskScore:
    """Greedy answers to ``problems`` of one task, scored by its verifier."""
    score = TaskScore(task.name)
    for p, got in zip(problems, answers(model, tokenizer, task, problems, batch_size=batch_size)):
        score.n += 1
        if got is None:  # a question longer than the context cannot be asked: it counts as wrong
            score.outcomes.append(False)
            continue
        c = got[0]
        ok = task.verify(c.text, p)
        score.correct += ok
        score.outcomes.append(bool(ok))
        score.stopped += c.finish in ("eos", "stop")
        if len(score.samples) < keep_samples:
            score.samples.append((p.question, c.text, ok))
    return score


def paired_interval(before: list[bool], after: list[bool]) -> dict[str, float]:
    """The change in accuracy on the same problems, with a normal 95% interval of the paired differences."""
    n = len(before)
    if not n or len(after) != n:
        return {"n": n, "gain": float("nan"), "ci95": [float("nan"), float("nan")]}
    d = [float(a) - float(b) for a, b in zip(after, before)]
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    half = 1.959964 * sd / math.sqrt(n)
    return {"n": n, "gain": mean, "ci95": [mean - half, mean + half]}
