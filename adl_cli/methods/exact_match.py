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
def exact_match(model, tokenizer, task: Task, problems: list[Problem], *, batch_size: int = 64, keep_samples: int = 3) -> TaskScore:
    """Greedy answers to ``problems`` of one task, scored by its verifier."""
    template = ChatTemplate.of(tokenizer)
    score = TaskScore(task.name)
    block = model.config.block_size
    prompts = _prompts(tokenizer, template, problems)
    if template is not None:
        eos, stop = sorted(template.stop_ids), ()
    else:
        eos, stop = tokenizer.eot_id, ("\n",)
    for start in range(0, len(problems), batch_size):
        group = problems[start:start + batch_size]
        ids = prompts[start:start + batch_size]
        fits = [len(p) + 1 <= block for p in ids]
        if not all(fits):  # a question longer than the context cannot be asked: it counts as wrong
            score.n += fits.count(False)
            score.outcomes += [False] * fits.count(False)
            group = [p for p, f in zip(group, fits) if f]
            ids = [i for i, f in zip(ids, fits) if f]
        if not ids:
            continue
        budget = min(task.max_answer_tokens, block - max(len(i) for i in ids))
        done = generate_batch(model, ids, budget, SamplingParams(temperature=0.0), eos_id=eos, stop=stop, decode=tokenizer.decode)
        for p, c in zip(group, done):
            text = c.text if c.text is not None else tokenizer.decode(c.tokens)
            ok = task.verify(text, p)
            score.n += 1
            score.correct += ok
            score.outcomes.append(bool(ok))
            score.stopped += c.finish in ("eos", "stop")
            if len(score.samples) < keep_samples:
                score.samples.append((p.question, text, ok))
    return score
