"""The generation engine: batches of prompts, each row on its own.

    prefill   the prompts, left-padded to one length, in one forward pass over a preallocated
              decode state (``state.pad`` gives each row its own positions and masks its padding),
              so every row computes what it would alone
    samples   N samples of one prompt share its prefill: the state's rows are repeated
    decode    one token a step for every unfinished row; a row ends at EOS, at a stop string or
              after max_new_tokens, and leaves the batch (its cache rows are dropped)
    context   past the context window a row drops the oldest quarter of its window and the cache
              is refilled from the rest, in one prefill; every command decodes this way (adl
              generate, adl chat, speculative decoding). In a batch a row slides when its own
              window is full (the batch is refilled, the other rows' windows unchanged), so it
              still equals the row alone; padding sits in spare columns past the context

Each row draws from its own generator (``row_generators``), so a prompt's sample does not
depend on the other prompts of its batch. Log-probabilities are the model's own (the softmax of
its logits at temperature 1, before any sampling rule): what alignment and distillation score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from adl_cli.errors import AdlError, opt
from adl_cli.inference.sampling import SamplingParams, sample_next, token_logprobs


@dataclass
class Completion:
    """One row's result. ``tokens`` are every sampled id (an EOS or the tokens of a stop string
    included); ``text`` is their decoding without them; ``finish`` is eos, stop or length."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str = "length"
    text: str | None = None
    stop: str | None = None


def eos_ids(eos_id: int | Sequence[int] | None) -> frozenset[int]:
    """The ids that end a row: none, one, or several."""
    if eos_id is None:
        return frozenset()
    return frozenset([int(eos_id)] if isinstance(eos_id, int) else (int(i) for i in eos_id))


def row_generators(seed: int, count: int, device=None) -> list[torch.Generator]:
    """Generator r is seeded with seed + r: row r's draws are the same whatever else is batched."""
    return [torch.Generator(device=device or "cpu").manual_seed(seed + r) for r in range(count)]


def keep_room(block: int) -> int:
    """How many of a row's last tokens a slide keeps: three quarters of the window (at least one)."""
    return max(1, block - block // 4)


def prefill(model, state, windows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``state`` and fill it with the rows' token windows, left-padded to one width; returns
    (the logits of each row's last position (B, V), each row's padding (B,))."""
    device = next(model.parameters()).device
    width = max(len(w) for w in windows)
    pad = torch.tensor([width - len(w) for w in windows], device=device)
    tokens = torch.tensor([[w[0]] * (width - len(w)) + list(w) for w in windows], device=device)
    state.reset()
    state.pad = pad if bool(pad.any()) else None
    return last_logits(model, tokens, state), pad


def last_logits(model, tokens: torch.Tensor, state) -> torch.Tensor:
    """The next-token logits (B, V) after ``tokens``: the vocabulary projection of the last position only."""
    return model.logits(model.hidden(tokens, state)[:, -1])


_COMPILED: dict[tuple[int, bool], tuple[object, Callable]] = {}  # a few models' graphs (target and draft), oldest dropped


def compiled_step(model, *, every_position: bool = False) -> Callable:
    """torch.compile of a static decoding step (``DecodeState.make_static``): (tokens, state) ->
    the last position's logits (B, V), or every position's (B, T, V); made once per model."""
    key = (id(model), every_position)
    entry = _COMPILED.get(key)
    if entry is None or entry[0] is not model:
        if every_position:
            fn = torch.compile(lambda tokens, state: model.logits(model.hidden(tokens, state)), dynamic=False)
        else:
            fn = torch.compile(lambda tokens, state: last_logits(model, tokens, state), dynamic=False)
        while len(_COMPILED) >= 4:
            del _COMPILED[next(iter(_COMPILED))]
        entry = _COMPILED[key] = (model, fn)
    return entry[1]


def cache_length(prompts: Sequence[Sequence[int]], max_new_tokens: int, block: int) -> int:
    """Positions the batch's decode state needs: the longest prompt plus the new tokens when no row
    can reach the context; else the context plus spare columns for left padding (a row's positions
    count from its first real token): the longest prompt's lead, or a quarter window, the larger."""
    width = max(map(len, prompts))
    if width + max_new_tokens <= block:
        return width + max_new_tokens
    return block + max(width - min(map(len, prompts)), block // 4)


def check_prompts(prompts: Sequence[Sequence[int]], block: int) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise AdlError(f"prompt {i + 1} is empty")
        if len(p) > block:
            raise AdlError(f"prompt {i + 1} has {len(p)} tokens, more than the model's context of {block}: shorten it")


class StopStrings:
    """Finds the first stop string in a row's text (only where the newest token can have completed one)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        if len(self.stops) != len(list(stops)):
            raise AdlError(f"{opt('stop')} strings must not be empty")

    def find(self, text: str, previous_len: int) -> tuple[int, str] | None:
        hits = []
        for s in self.stops:
            at = text.find(s, max(0, previous_len - len(s) + 1))
            if at >= 0:
                hits.append((at, s))
        return min(hits) if hits else None

    def held_back(self, text: str) -> int:
        """Length of the longest end of ``text`` that may begin a stop string (not shown yet)."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


@torch.no_grad()
def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(temperature=0.0),
    *,
    n: int = 1,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    eos_id: int | Sequence[int] | None = None,
    stop: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    logprobs: bool = False,
    on_token: Callable[[int, int], None] | None = None,
    compile: bool = False,
) -> list[Completion]:
    """Complete every prompt ``n`` times; returns len(prompts) * n completions, prompt-major.

    ``generator``: one for the whole batch or one per row (``row_generators``); ``stop`` needs
    ``decode`` (ids -> text); ``eos_id``: one id or several (a chat model ends a reply with its
    template's end); ``on_token(row, id)`` is called for every new token of a running row.
    ``compile``: decoding steps run through torch.compile over a static cache (full key/value
    caches only); finished rows then stay in the batch (ignored) so that shapes never change."""
    params.validate()
    if max_new_tokens < 0:
        raise AdlError(f"{opt('max_new_tokens')} must be >= 0, got {max_new_tokens}")
    if n < 1:
        raise AdlError(f"{opt('num_samples')} must be >= 1, got {n}")
    stops = StopStrings(stop)
    eos = eos_ids(eos_id)
    if stops.stops and decode is None:
        raise ValueError("stop strings need a decode function")
    block = model.config.block_size
    check_prompts(prompts, block)
    rows = [Completion(list(p)) for p in prompts for _ in range(n)]
    if max_new_tokens == 0 or not rows:
        for r in rows:
            r.text = decode([]) if decode else None
        return rows
    model.eval()
    device = next(model.parameters()).device
    if isinstance(generator, Sequence) and len(generator) != len(rows):
        raise ValueError(f"{len(generator)} generators for {len(rows)} rows")

    length = cache_length(prompts, max_new_tokens, block)
    if compile:  # a compiled step is traced per cache shape: lengths in steps of 128 share graphs
        length = min(-(-length // 128) * 128, cache_length(prompts, block + 1, block))
    state = model.setup_cache(len(prompts), length)
    logits, pad = prefill(model, state, prompts)
    if n > 1:
        share = torch.arange(len(prompts), device=device).repeat_interleave(n)
        state.reorder(share)
        pad, logits = pad[share], logits[share]

    static = compile and state.can_be_static
    step_fn = compiled_step(model) if static else None
    checked = False  # whether a static step has run since the state was last made static
    if static:
        state.make_static()
    seqs = [list(r.prompt) for r in rows]  # every row's whole text so far (prompt + new tokens)
    starts = [0] * len(rows)  # where each row's window begins in seqs (moved by a slide)
    active = list(range(len(rows)))  # the batch's rows, in order (finished ones leave unless static)
    done = [False] * len(rows)
    texts = [""] * len(rows)
    for step in range(max_new_tokens):
        history = None
        if params.repetition_penalty != 1.0:
            longest = max(len(seqs[r]) for r in active)
            history = torch.tensor([seqs[r] + [-1] * (longest - len(seqs[r])) for r in active], device=device)
        gens = generator if not isinstance(generator, Sequence) else [generator[r] for r in active]
        if params.greedy and history is None:
            nxt = logits.argmax(dim=-1)
        else:
            nxt = sample_next(logits, params, history=history, generator=gens)[0]
        lps = token_logprobs(logits, nxt).tolist() if logprobs else None
        keep = []
        finished_before = [done[r] for r in active]
        for i, (r, t) in enumerate(zip(active, nxt.tolist())):
            if finished_before[i]:
                continue
            row = rows[r]
            row.tokens.append(t)
            seqs[r].append(t)
            if lps is not None:
                row.logprobs.append(lps[i])
            if on_token is not None:
                on_token(r, t)
            if t in eos:
                row.finish, done[r] = "eos", True
                continue
            if stops.stops:
                before = len(texts[r])
                texts[r] = decode(row.tokens)
                hit = stops.find(texts[r], before)
                if hit is not None:
                    row.finish, row.stop, done[r] = "stop", hit[1], True
                    texts[r] = texts[r][: hit[0]]
                    continue
            keep.append(i)
        if not keep or step == max_new_tokens - 1:
            break
        if static:  # every row stays (fixed shapes): a finished row decodes on, its tokens not returned
            keep = list(range(len(active)))
            for i, r in enumerate(active):
                if finished_before[i]:  # (a row that finished at this step has its token already)
                    seqs[r].append(int(nxt[i]))
        if len(keep) < len(active):  # finished rows leave the batch
            index = torch.tensor(keep, device=device)
            state.reorder(index)
            pad, nxt = pad[index], nxt[index]
            active = [active[i] for i in keep]
        filled = state.length - pad  # each row's real positions in the cache
        if bool((filled >= block).any()) or state.length >= state.max_len:
            # A full row slides its own window (alone it would slide now too); the others keep theirs.
            for i, r in enumerate(active):
                if int(filled[i]) >= block:
                    starts[r] = len(seqs[r]) - keep_room(block)
            logits, pad = prefill(model, state, [seqs[r][starts[r]:] for r in active])
            if static:
                state.make_static()
                checked = False
        elif static:
            # The first step after make_static checks the compiled graph's guards; later steps feed
            # the same shapes and objects, so only what tells cached graphs apart is checked.
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=checked):
                logits = step_fn(nxt[:, None], state)
            checked = True
            state.advance()
        else:
            logits = last_logits(model, nxt[:, None], state)
    for r, row in enumerate(rows):
        if decode is not None:
            if row.finish == "stop":
                row.text = texts[r]
            else:
                row.text = decode(row.tokens[:-1] if row.finish == "eos" else row.tokens)
    return rows


@torch.no_grad()
def score(model, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *, batch_size: int = 16) -> list[list[float]]:
    """log p(each continuation token | the prompt and the continuation before it), under the
    model's own softmax; one cache-free forward pass per ``batch_size`` pairs, right-padded (a
    causal model never reads the padding after a position)."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts for {len(continuations)} continuations")
    block = model.config.block_size
    check_prompts(prompts, block)
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        if len(p) + len(c) - 1 > block:
            raise AdlError(f"prompt {i + 1} and its continuation need {len(p) + len(c) - 1} positions, more than the context of {block}")
    model.eval()
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for b in range(0, len(prompts), batch_size):
        pairs = list(zip(prompts[b:b + batch_size], continuations[b:b + batch_size]))
        inputs = [list(p) + list(c)[:-1] if c else list(p) for p, c in pairs]
        width = max(map(len, inputs))
        idx = torch.tensor([x + [0] * (width - len(x)) for x in inputs], device=device)
        logits = model(idx)[0]
        for row, (p, c) in enumerate(pairs):
            at = torch.arange(len(p) - 1, len(p) - 1 + len(c), device=device)
            out.append(token_logprobs(logits[row, at], torch.tensor(list(c), device=device, dtype=torch.long)).tolist())
    return out


class TextStream:
    """Text of one row as its tokens come: ``push`` returns what may be shown now (nothing while
    the bytes of a character are incomplete or the end may begin a stop string)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = (), eos_id: int | Sequence[int] | None = None):
        self.decode, self.stops, self.eos = decode, StopStrings(stop), eos_ids(eos_id)
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        if token in self.eos:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        end = len(text) - self.stops.held_back(text)
        hit = self.stops.find(text, self.shown)
        if hit is not None:
            end = min(end, hit[0])
        out, self.shown = text[self.shown:end], max(self.shown, end)
        return out

    def finish(self, text: str) -> str:
        """The rest of the row's final text (stop string cut)."""
        return text[self.shown:]
