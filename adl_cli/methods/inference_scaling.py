"""Inference-time scaling on verifiable tasks: accuracy against the number of answers sampled per
problem (`adl eval RUN --task T --samples N`).

For each held-out problem the model writes one greedy answer and N sampled ones (temperature T).
With c of the n = N samples correct, for every k in 1, 2, 4, ..., N:

    pass@k        1 - C(n - c, k) / C(n, k), the unbiased estimate of "one of k samples is right"
                  (Chen et al. 2021): an oracle verifier picking among k samples
    majority@k    the most frequent final answer among k samples is right (self-consistency,
                  Wang et al. 2023); ties go to the answer seen first
    best-of-k     the answer with the highest reward-model score among k samples is right
                  (with a reward run); the verifier's own best-of-k is pass@k

majority@k and best-of-k are averaged over the N // k disjoint blocks of k samples (at k = 1 every
sample counts, as in pass@1), then over problems; majority@N is compared with greedy on the same problems by a
paired 95% interval.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from math import comb

import torch

from adl_cli.data.tasks import Problem, Task
from adl_cli.inference.sampling import SamplingParams
from adl_cli.methods.exact_match import answers, paired_interval


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n, c of them
    correct, is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority(finals: list[str | None]) -> str | None:
    """The most frequent answer (None: no answer, never elected); ties to the one seen first."""
    counts = Counter(f for f in finals if f is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(f for f in finals if f is not None and counts[f] == top)


def sample_budgets(n: int) -> list[int]:
    """1, 2, 4, ... up to n (n itself included)."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


@dataclass
class Scaling:
    task: str
    n: int  # problems
    samples: int
    temperature: float
    greedy: list[bool] = field(default_factory=list)
    correct: list[list[bool]] = field(default_factory=list)  # per problem, per sample
    finals: list[list[str | None]] = field(default_factory=list)
    rewards: list[list[float]] | None = None

    def rows(self) -> list[dict]:
        out = []
        for k in sample_budgets(self.samples):
            row = {"k": k, "pass": sum(pass_at_k(self.samples, sum(c), k) for c in self.correct) / self.n,
                   "majority": sum(self._blocks(self._vote, i, k) for i in range(self.n)) / self.n}
            if self.rewards is not None:
                row["best_of"] = sum(self._blocks(self._best, i, k) for i in range(self.n)) / self.n
            out.append(row)
        return out

    def _blocks(self, rule, i: int, k: int) -> float:
        """``rule`` on each disjoint block of k of problem i's samples, averaged (N // k blocks: every
        sample counts at k = 1, as in pass@1)."""
        blocks = range(0, self.samples - k + 1, k)
        return sum(rule(i, s, s + k) for s in blocks) / len(blocks)

    def _vote(self, i: int, lo: int, hi: int) -> bool:
        pick = majority(self.finals[i][lo:hi])
        return pick is not None and any(f == pick and ok for f, ok in zip(self.finals[i][lo:hi], self.correct[i][lo:hi]))

    def _best(self, i: int, lo: int, hi: int) -> bool:
        r = self.rewards[i][lo:hi]
        return self.correct[i][lo + max(range(len(r)), key=r.__getitem__)]

    def to_dict(self) -> dict:
        votes = [self._vote(i, 0, self.samples) for i in range(self.n)]
        return {"task": self.task, "n": self.n, "samples": self.samples, "temperature": self.temperature,
                "greedy": sum(self.greedy) / self.n, "sample_accuracy": sum(map(sum, self.correct)) / (self.n * self.samples),
                "rows": self.rows(), "majority_vs_greedy": paired_interval(self.greedy, votes)}


@torch.no_grad()
def reward_scores(reward_model, tokenizer, problems: list[Problem], got: list[list | None], batch_size: int = 64) -> list[list[float]]:
    """The reward model's score of every sampled answer (prompt and answer through the chat template,
    read at the answer's last token)."""
    from adl_cli.data.chat import ChatTemplate

    template = ChatTemplate.of(tokenizer)
    device = next(reward_model.parameters()).device
    rows, where = [], []
    for i, (p, g) in enumerate(zip(problems, got)):
        for j, c in enumerate(g or []):
            rows.append(template.question(p.question) + list(c.tokens))
            where.append((i, j))
    scores = [[float("-inf")] * len(g or []) for g in got]
    block = reward_model.config.block_size
    for start in range(0, len(rows), batch_size):
        chunk = [r[:block] for r in rows[start:start + batch_size]]
        width = max(len(r) for r in chunk)
        x = torch.tensor([r + [0] * (width - len(r)) for r in chunk], device=device)
        last = torch.tensor([len(r) - 1 for r in chunk], device=device)
        for (i, j), v in zip(where[start:start + batch_size], reward_model(x, last=last).float().tolist()):
            scores[i][j] = v
    return scores


def sample_scaling(model, tokenizer, task: Task, problems: list[Problem], *, samples: int, temperature: float = 1.0, seed: int = 0,
                      reward_model=None, batch_size: int = 64) -> Scaling:
    """Greedy and ``samples`` sampled answers to every problem, scored (module docstring)."""
    greedy = answers(model, tokenizer, task, problems, batch_size=batch_size)
    sampled = answers(model, tokenizer, task, problems, n=samples, params=SamplingParams(temperature=temperature), seed=seed, batch_size=batch_size)
    out = Scaling(task.name, len(problems), samples, temperature)
    for p, g, s in zip(problems, greedy, sampled):
        out.greedy.append(bool(g) and task.verify(g[0].text, p))
        texts = [c.text for c in s] if s else [""] * samples
        out.correct.append([bool(s) and task.verify(t, p) for t in texts])
        out.finals.append([task.final_of(t) if s else None for t in texts])
    if reward_model is not None:
        out.rewards = reward_scores(reward_model, tokenizer, problems, sampled, batch_size)
        out.rewards = [r if r else [0.0] * samples for r in out.rewards]
    return out
