"""Sampling from a GPT with a KV cache; the rules (temperature, top-k, top-p, min-p, repetition
penalty) are adl_cli.inference.sampling's.

The prompt runs once through the model filling its decode state (``model.setup_cache``:
per-layer caches preallocated to the context, written in place); each new token then costs
one position. Past the context window the state is reset and refilled from the last
block_size tokens (positions stay within what the model was trained on).
"""

from __future__ import annotations

import torch

from adl_cli.errors import AdlError, opt
from adl_cli.inference.sampling import SamplingParams, sample_next


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int, *,
                   min_p: float | None = None, repetition_penalty: float = 1.0) -> SamplingParams:
    """The sampling settings, checked (one clear error for a bad one)."""
    if max_new_tokens < 0:
        raise AdlError(f"{opt('max_new_tokens')} must be >= 0, got {max_new_tokens}")
    return SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty).validate()


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
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """Extend idx (B, T) by up to max_new_tokens sampled tokens; temperature 0 is greedy.

    With ``stop_token`` each row ends on its own when it samples it: later positions of a
    finished row hold ``stop_token``; generation ends when every row has finished."""
    params = check_sampling(temperature, top_k, top_p, max_new_tokens, min_p=min_p, repetition_penalty=repetition_penalty)
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
        history = out if params.repetition_penalty != 1.0 else None
        nxt = sample_next(logits[:, -1, :], params, history=history, generator=generator)[0][:, None]
        if stop_token is not None:
            nxt = nxt.masked_fill(finished, stop_token)
            finished |= nxt == stop_token
        out = torch.cat((out, nxt), dim=1)
        if stop_token is not None and bool(finished.all()):
            break
    return out
