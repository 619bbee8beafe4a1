"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) and prompt-lookup decoding.

A cheap proposer drafts k tokens; the target scores all of them in one forward pass over k + 1
positions and keeps a prefix, so each target pass yields between 1 and k + 1 tokens:

    for i = 1..k:  accept draft d_i with probability min(1, p_i(d_i) / q_i(d_i))
                   else emit a token from norm(max(0, p_i - q_i)) and stop
    all accepted:  emit a bonus token from p_{k+1}

p_i and q_i are the target's and the proposer's next-token distributions after the sampling
rules (adl_cli.inference.sampling); the emitted tokens are distributed exactly as sampling the
target alone. Greedy (temperature 0) keeps drafts while they equal the target's argmax and
then emits that argmax, so the output is the target's greedy output token for token.

Proposers: a draft model (its own decode state; sharing the tokenizer), or prompt lookup
(Saxena 2023): the tokens that followed the latest earlier occurrence of the context's last
n-gram (n = ngram .. 1), with q a point mass on each draft. Rejected drafts are rolled back
from both decode states (``DecodeState.truncate``). Batch 1. Past the context window it follows the
engine's policy (adl_cli/inference/engine.py): a pass never reads past the window, and a full
window keeps its last three quarters, so the greedy output is plain greedy decoding's throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adl_cli.errors import AdlError, opt
from adl_cli.inference.engine import keep_room
from adl_cli.inference.sampling import SamplingParams, process_logits


@dataclass
class SpecStats:
    new_tokens: int = 0
    target_forwards: int = 0  # decoding passes of the target (the prompt's prefill not counted)
    drafted: int = 0
    accepted: int = 0
    slides: int = 0  # times the context window was full and refilled from its last three quarters

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, token: int) -> float:
    """min(1, p(token) / q(token)) for next-token distributions p, q (V,)."""
    qt = float(q[token])
    return 1.0 if qt <= 0.0 else min(1.0, float(p[token]) / qt)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where a rejected draft's replacement comes from. (It has mass
    whenever a rejection is possible: a draft is rejected only where q > p somewhere.)"""
    r = (p - q).clamp(min=0)
    total = r.sum()
    return r / total if total > 0 else p


def verify(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int], *, greedy: bool,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """(how many drafts are kept, the token emitted after them). p: (k + 1, V) target
    distributions (greedy: any scores, argmax taken); q: (k, V) proposer distributions, or None
    for point masses on the drafts (prompt lookup)."""
    for i, d in enumerate(drafts):
        if greedy:
            best = int(p[i].argmax())
            if d != best:
                return i, best
            continue
        qi = q[i] if q is not None else torch.nn.functional.one_hot(torch.tensor(d), p.shape[-1]).to(p.dtype)
        if float(torch.rand((), generator=generator)) < acceptance_probability(p[i], qi, d):
            continue
        return i, int(torch.multinomial(residual(p[i], qi), 1, generator=generator))
    last = p[len(drafts)]
    return len(drafts), int(last.argmax()) if greedy else int(torch.multinomial(last, 1, generator=generator))


def lookup_drafts(seq: list[int], k: int, ngram: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of seq's last n-gram (the
    longest n <= ngram that occurs earlier); [] when none does."""
    for n in range(min(ngram, len(seq) - 1), 0, -1):
        tail = seq[-n:]
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start:start + n] == tail:
                return seq[start + n:start + n + k]
    return []


def _distributions(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    z = process_logits(logits, params)
    return z if params.greedy else torch.softmax(z, dim=-1)


@torch.no_grad()
def speculative_generate(target, idx: torch.Tensor, max_new_tokens: int, *, params: SamplingParams = SamplingParams(temperature=0),
                         draft=None, lookahead: int = 4, lookup_ngram: int | None = None, stop_token: int | None = None,
                         generator: torch.Generator | None = None, compile: bool = False) -> tuple[torch.Tensor, SpecStats]:
    """Extend idx (1, T) by up to max_new_tokens tokens with a draft model (``draft``) or prompt
    lookup (``lookup_ngram``); returns (1, T + new) and the statistics. ``compile``: the draft's
    steps and the target's verification passes of lookahead + 1 tokens run through torch.compile
    over static caches (other passes, near the end, run eagerly)."""
    params.validate()
    if (draft is None) == (lookup_ngram is None):
        raise AdlError(f"speculative decoding takes a draft model or {opt('lookup')} (an n-gram length), one of them")
    if idx.shape[0] != 1 or idx.shape[1] < 1:
        raise AdlError("speculative decoding takes one non-empty prompt")
    if lookahead < 1:
        raise AdlError(f"{opt('lookahead')} must be >= 1, got {lookahead}")
    if lookup_ngram is not None and lookup_ngram < 1:
        raise AdlError(f"{opt('lookup')} must be >= 1, got {lookup_ngram}")
    if params.repetition_penalty != 1.0:
        raise AdlError(f"{opt('repetition_penalty')} is not supported with speculative decoding (each draft position has its own history)")
    block = target.config.block_size
    if draft is not None and draft.config.vocab_size != target.config.vocab_size:
        raise AdlError(f"the draft model's vocabulary ({draft.config.vocab_size}) is not the target's ({target.config.vocab_size})")
    if draft is not None and draft.config.block_size < block:
        raise AdlError(f"the draft model's context ({draft.config.block_size}) is shorter than the target's ({block})")
    if idx.shape[1] > block:
        raise AdlError(f"the prompt has {idx.shape[1]} tokens, more than the target's context of {block}")
    models = [target] + ([draft] if draft is not None else [])
    for m in models:
        m.eval()
    states = [m.setup_cache(1, block) for m in models]
    if not all(s.can_truncate for s in states):
        raise AdlError("speculative decoding rolls back rejected drafts: a sliding-window or recurrent decode state cannot")
    seq = idx[0].tolist()
    stats = SpecStats()
    start = 0  # the window's first token in seq (the context policy moves it)

    compile = compile and all(s.can_be_static for s in states)
    if compile:
        from adl_cli.inference.engine import compiled_step

        verify_fn = compiled_step(target, every_position=True)
        draft_fn = compiled_step(draft) if draft is not None else None

    def refill() -> None:  # every state holds seq[start:-1]; seq[-1] is the next input
        for m, s in zip(models, states):
            s.reset()
            if len(seq) - 1 > start:
                m(torch.tensor([seq[start:-1]]), state=s)
            if compile:
                s.make_static()

    def draft_step(token: int) -> torch.Tensor:  # the draft reads one token: its next-token logits (V,)
        if not compile:
            return draft(torch.tensor([[token]]), state=states[1])[0][0, -1]
        out = draft_fn(torch.tensor([[token]]), states[1])[0]
        states[1].advance()
        return out

    def target_pass(feed: list[int]) -> torch.Tensor:  # the target reads the fed tokens: logits (T, V)
        if compile and len(feed) == lookahead + 1:
            out = verify_fn(torch.tensor([feed]), states[0])[0]
            states[0].advance(len(feed))
            return out
        if compile:  # a pass of another length runs eagerly on the dynamic path, then static again
            states[0].make_dynamic()
        out = target(torch.tensor([feed]), state=states[0])[0][0]
        if compile:
            states[0].make_static()
        return out

    refill()
    while stats.new_tokens < max_new_tokens:
        room = block - (len(seq) - start)  # a pass feeds window positions len(seq) - 1 - start .. + k
        if room < 0:
            start = len(seq) - keep_room(block)
            stats.slides += 1
            refill()
            room = block - (len(seq) - start)
        k = min(lookahead, room, max_new_tokens - stats.new_tokens - 1)
        q = None
        if draft is not None:
            drafts, qs = [], []
            pending = seq[-1]
            for _ in range(k):
                dist = _distributions(draft_step(pending), params)
                pending = int(dist.argmax()) if params.greedy else int(torch.multinomial(dist, 1, generator=generator))
                drafts.append(pending)
                qs.append(dist)
            q = torch.stack(qs) if qs and not params.greedy else None
        else:
            drafts = lookup_drafts(seq, k, lookup_ngram) if k else []
        p = _distributions(target_pass([seq[-1], *drafts]), params)
        stats.target_forwards += 1
        kept, token = verify(p, q, drafts, greedy=params.greedy, generator=generator)
        stats.drafted += len(drafts)
        stats.accepted += kept
        new = drafts[:kept] + [token]
        base = len(seq) - start
        states[0].truncate(base + kept)
        if draft is not None:  # the draft read seq[-1] and drafts[:-1]; it must hold seq + kept drafts
            if kept < len(drafts):
                states[1].truncate(base + kept)
            else:  # all kept (or none drafted): it has not read the last of them yet
                draft_step(drafts[-1] if drafts else seq[-1])
        if stop_token is not None and stop_token in new:
            new = new[: new.index(stop_token) + 1]
        new = new[: max_new_tokens - stats.new_tokens]
        seq += new
        stats.new_tokens += len(new)
        if stop_token is not None and new[-1] == stop_token:
            break
    return torch.tensor([seq], dtype=idx.dtype), stats
