"""Sampling from a GPT: temperature, top-k and nucleus (top-p) sampling with a KV cache.

    p = softmax(logits / T);  keep the k most likely (top-k) and the smallest set whose
    mass reaches p (top-p, Holtzman et al. 2020); renormalise; sample.

The prompt runs once through the model filling its decode state (``model.setup_cache``:
per-layer caches preallocated to the context, written in place); each new token then costs
one position. Past the context window the state is reset and refilled from the last
block_size tokens (positions stay within what the model was trained on).
"""

from __future__ import annotations

import torch

from adl_cli.errors import AdlError, opt


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf everything outside the top-k / top-p set (logits: (B, V))."""
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
    return logits


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if temperature < 0:
        raise AdlError(f"{opt('temperature')} must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise AdlError(f"{opt('top_k')} must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise AdlError(f"{opt('top_p')} must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise AdlError(f"{opt('max_new_tokens')} must be >= 0, got {max_new_tokens}")


@torch.no_grad()
def generate(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
) -> torch.Tensor:
    """Extend idx (B, T) by up to max_new_tokens sampled tokens; temperature 0 is greedy.

    With ``stop_token`` each row ends on its own when it samples it: later positions of a
    finished row hold ``stop_token``; generation ends when every row has finished."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    model.eval()
    block = model.config.block_size
    out = idx
    state = model.setup_cache(idx.shape[0], block) if max_new_tokens else None
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    for i in range(max_new_tokens):
        if i == 0 or state.length >= block:
            state.reset()
            logits, _ = model(out[:, -block:], state=state)
        else:
            logits, _ = model(out[:, -1:], state=state)
        logits = logits[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k=top_k, top_p=top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        if stop_token is not None:
            nxt = nxt.masked_fill(finished, stop_token)
            finished |= nxt == stop_token
        out = torch.cat((out, nxt), dim=1)
        if stop_token is not None and bool(finished.all()):
            break
    return out
