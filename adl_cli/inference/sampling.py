"""Choosing the next token from a model's logits: the logits processors and the draw.

For a batch of next-token logits z (B, V), in this order (as transformers' ``generate``):

    repetition penalty   a token already in the row's history: z / r if z > 0, else z * r
                         (Keskar et al. 2019, CTRL; r > 1 discourages repeats)
    temperature          z / T; T = 0 is greedy (argmax, no draw)
    top-k                keep the k largest
    top-p (nucleus)      keep the smallest set of most likely tokens whose mass reaches p
                         (Holtzman et al. 2020); the most likely token always stays
    min-p                keep tokens whose probability is at least min_p x the top token's
                         (Nguyen et al. 2024): the cut follows the model's confidence

then p = softmax(z) and a draw from a seeded generator. Each step returns the tokens and their
log-probabilities under the distribution they were drawn from; ``token_logprobs`` gives the
log-probabilities of given tokens under plain logits (the scores alignment and distillation use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adl_cli.errors import AdlError, opt


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def validate(self) -> "SamplingParams":
        if not self.temperature >= 0:
            raise AdlError(f"{opt('temperature')} must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise AdlError(f"{opt('top_k')} must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise AdlError(f"{opt('top_p')} must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise AdlError(f"{opt('min_p')} must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise AdlError(f"{opt('repetition_penalty')} must be > 0, got {self.repetition_penalty}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """``history`` (B, L): each row's earlier token ids, -1 where a row has fewer (padding).
    Every id present in a row's history is penalised once, however often it occurs."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    B, V = logits.shape
    ids = torch.where(history >= 0, history, V)  # padding goes to a spare column, dropped below
    seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device).scatter_(1, ids, True)[:, :V]
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> torch.Tensor:
    """Set to -inf everything outside the top-k / top-p / min-p set (logits: (B, V)); the most
    likely token always stays."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None and min_p > 0.0:
        logp = torch.log_softmax(logits, dim=-1)
        floor = logp.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(min_p, dtype=logp.dtype))
        logits = logits.masked_fill(logp < floor, float("-inf"))
    return logits


def process_logits(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None) -> torch.Tensor:
    """The logits the draw reads: penalty, temperature (not for greedy), then the filters; fp32."""
    z = logits.float()
    if history is not None:
        z = apply_repetition_penalty(z, history, params.repetition_penalty)
    if params.greedy:
        return z
    return filter_logits(z / params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p)


def sample_next(logits: torch.Tensor, params: SamplingParams, *, history: torch.Tensor | None = None,
                generator: torch.Generator | list[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B,), their log-probabilities (B,)) for next-token logits (B, V). Greedy rows take
    the argmax, whose log-probability is under the penalised, untempered softmax. ``generator``:
    one for the batch, or a list with one per row (each row's draw then ignores the others)."""
    z = process_logits(logits, params, history)
    logp = torch.log_softmax(z, dim=-1)
    if params.greedy:
        tokens = z.argmax(dim=-1)
    elif isinstance(generator, (list, tuple)):
        probs = logp.exp()
        tokens = torch.cat([_draw(probs[i:i + 1], g) for i, g in enumerate(generator)]).squeeze(1)
    else:
        tokens = _draw(logp.exp(), generator).squeeze(1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row; a generator on another device (a CPU one for a model on a GPU) draws there."""
    if generator is not None and generator.device.type != probs.device.type:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) under softmax(logits): logits (..., V), tokens (...) -> (...), in fp32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
