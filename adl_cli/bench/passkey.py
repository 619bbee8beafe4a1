"""Passkey retrieval (Mohtashami & Jaggi 2023, as LongLoRA reports it): a random 5-digit number
hidden at a random depth in filler text, asked for at the end.

Each trial is exactly ``length`` tokens the model reads::

    filler[:d]  "\\npass_key = 48213\\n"  filler[d:]  "\\nassert pass_key == "  48213

The filler is held-out text of the run's own corpus (a random stretch per trial), the depth d
uniform over it. The key counts as retrieved when the model's greedy choice at every one of its
tokens is that token (teacher forcing, so one forward pass scores a trial; the same outcome as
greedy decoding of the key after the question). The phrasing is code-like because the runs it is
made for read Python; a model must copy the number across the whole filler, which the positions
it was not trained at make hard.
"""

from __future__ import annotations

import numpy as np
import torch


def fits(tokenizer, length: int) -> bool:
    """Whether a trial of ``length`` tokens has room for the needle, the question, the key and some filler."""
    room = len(tokenizer.encode("\npass_key = 99999\n")) + len(tokenizer.encode("\nassert pass_key == ")) + len(tokenizer.encode("99999"))
    return length + 1 - room >= 8


def passkey_trials(tokenizer, val, length: int, trials: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(ids of length + 1, number of key tokens at the end) per trial."""
    rng = np.random.default_rng(seed)
    query = tokenizer.encode("\nassert pass_key == ").tolist()
    out = []
    for _ in range(trials):
        key = str(int(rng.integers(10000, 100000)))
        needle = tokenizer.encode(f"\npass_key = {key}\n").tolist()
        answer = tokenizer.encode(key).tolist()
        n_fill = length + 1 - len(needle) - len(query) - len(answer)
        if n_fill < 0:
            raise ValueError(f"passkey: a prompt does not fit in {length} tokens")
        if len(val) <= n_fill:
            raise ValueError(f"passkey: the held-out text ({len(val):,} tokens) is shorter than the filler of {n_fill:,}")
        start = int(rng.integers(0, len(val) - n_fill))
        filler = [int(t) for t in val[start:start + n_fill]]
        depth = int(rng.integers(0, n_fill + 1))
        out.append((filler[:depth] + needle + filler[depth:] + query + answer, len(answer)))
    return out


@torch.no_grad()
def passkey_accuracy(model, tokenizer, val, length: int, trials: int, *, seed: int = 0, batch: int = 8) -> float:
    """Share of ``trials`` prompts of ``length`` tokens whose key the model retrieves."""
    device = next(model.parameters()).device
    cases = passkey_trials(tokenizer, val, length, trials, seed)
    was = model.training
    model.eval()
    hits = 0
    try:
        for i in range(0, len(cases), batch):
            part = cases[i:i + batch]
            ids = torch.tensor([c[0] for c in part], device=device)
            logits = model(ids[:, :-1])[0]
            for row, (_, n) in enumerate(part):
                guess = logits[row, -n:].argmax(-1)
                hits += int(torch.equal(guess, ids[row, -n:]))
    finally:
        model.train(was)
    return hits / max(1, len(cases))
